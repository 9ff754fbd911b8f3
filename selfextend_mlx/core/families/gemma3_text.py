"""Gemma-3 layout: q/k RMSNorm before rope; its sliding-window local layers stay plain."""

from mlx_lm.models import gemma3_text

from .llama import output, scale, softcap  # noqa: F401  (same as llama)
from .qwen3 import project  # noqa: F401  (same q/k norms before rope)

MODEL_TYPES = ("gemma3_text",)
ATTENTION = (gemma3_text.Attention,)


def is_sliding(layer, attn):
    return attn.is_sliding
