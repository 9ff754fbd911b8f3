"""Phi-3 layout: one fused qkv projection; rope may cover only part of each head."""

import mlx.core as mx
from mlx_lm.models import phi3

from .heads import split_heads
from .llama import is_sliding, output, scale, softcap  # noqa: F401  (same as llama)

MODEL_TYPES = ("phi3",)
ATTENTION = (phi3.Attention,)


def project(attn, x):
    q_size = attn.n_heads * attn.head_dim
    kv_size = attn.n_kv_heads * attn.head_dim
    q, k, v = mx.split(attn.qkv_proj(x), [q_size, q_size + kv_size], axis=-1)
    return split_heads(q, attn.n_heads), split_heads(k, attn.n_kv_heads), split_heads(v, attn.n_kv_heads)
