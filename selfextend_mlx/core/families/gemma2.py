"""Gemma-2 layout: llama projections, scores soft-capped with tanh before the softmax."""

from mlx_lm.models import gemma2

from .llama import output, project, scale  # noqa: F401  (same as llama)

MODEL_TYPES = ("gemma2",)
ATTENTION = (gemma2.Attention,)


def softcap(attn):
    return attn.attn_logit_softcapping


def is_sliding(layer, attn):
    # mlx-lm runs every Gemma-2 layer as global attention, so all of them get SelfExtend.
    return False
