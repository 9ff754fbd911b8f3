"""Qwen3 layout: the llama projections plus per-head RMSNorm on q and k before rope."""

from mlx_lm.models import qwen3

from .heads import split_heads
from .llama import is_sliding, output, scale, softcap  # noqa: F401  (same as llama)

MODEL_TYPES = ("qwen3",)
ATTENTION = (qwen3.Attention,)


def project(attn, x):
    q = attn.q_norm(split_heads(attn.q_proj(x), attn.n_heads))
    k = attn.k_norm(split_heads(attn.k_proj(x), attn.n_kv_heads))
    v = split_heads(attn.v_proj(x), attn.n_kv_heads)
    return q, k, v
