"""Gemma-3 layout: q/k RMSNorm before rope; its sliding-window local layers stay plain."""

from mlx_lm.models import gemma3_text

from .llama import output, scale, softcap  # noqa: F401  (same as llama)
from .heads import split_heads

MODEL_TYPES = ("gemma3_text",)
ATTENTION = (gemma3_text.Attention,)


def project(attn, x):
    q = attn.q_norm(split_heads(attn.q_proj(x), attn.n_heads))
    k = attn.k_norm(split_heads(attn.k_proj(x), attn.n_kv_heads))
    v = split_heads(attn.v_proj(x), attn.n_kv_heads)
    return q, k, v


def is_sliding(layer, attn):
    return attn.is_sliding
