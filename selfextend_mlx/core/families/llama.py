"""Llama layout (also Mistral, SOLAR, TinyLlama, SmolLM, Qwen2, Gemma): separate q/k/v/o projections."""

from mlx_lm.models import gemma, llama, qwen2

from .heads import merge_heads, split_heads

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
ATTENTION = (llama.Attention, qwen2.Attention, gemma.Attention)


def project(attn, x):
    q = split_heads(attn.q_proj(x), attn.n_heads)
    k = split_heads(attn.k_proj(x), attn.n_kv_heads)
    v = split_heads(attn.v_proj(x), attn.n_kv_heads)
    return q, k, v


def output(attn, o):
    return attn.o_proj(merge_heads(o))


def scale(attn):
    return attn.scale


def softcap(attn):
    return None


def is_sliding(layer, attn):
    return bool(getattr(layer, "use_sliding", False))
