"""Phi-2 layout: biased projections, partial rotary, output through `dense`."""

from mlx_lm.models import phi

from .heads import merge_heads, split_heads

MODEL_TYPES = ("phi",)
ATTENTION = (phi.PhiAttention,)


def project(attn, x):
    q = split_heads(attn.q_proj(x), attn.num_heads)
    k = split_heads(attn.k_proj(x), attn.num_key_value_heads)
    v = split_heads(attn.v_proj(x), attn.num_key_value_heads)
    return q, k, v


def output(attn, o):
    return attn.dense(merge_heads(o))


def scale(attn):
    return attn.head_dim**-0.5


def softcap(attn):
    return None


def is_sliding(layer, attn):
    return False
