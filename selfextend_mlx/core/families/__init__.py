"""One small file per mlx-lm attention layout: how to get q, k, v (before rope) out of the
model's own attention module, and how to finish after attention. Everything else in the
model is untouched."""

from . import gemma2, gemma3_text, llama, phi, phi3, qwen3

FAMILIES = (llama, qwen3, phi3, phi, gemma2, gemma3_text)
SUPPORTED = tuple(name for family in FAMILIES for name in family.MODEL_TYPES)


def family_for(attention):
    """The family module handling this attention module's class, or None."""
    for family in FAMILIES:
        if isinstance(attention, family.ATTENTION):
            return family
    return None
