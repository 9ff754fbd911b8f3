"""A real model past its trained window: stories260K was trained on 512-token sequences."""

import math

import mlx.core as mx
import mlx.nn as nn
from conftest import shared_path
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model, load_tokenizer

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache

BUCKETS = [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]


def bucket_perplexity(model, tokens, cache, step=512):
    """Perplexity of each next-token prediction, grouped by the predicted token's position."""
    losses = []
    for s in range(0, tokens.size - 1, step):
        chunk = tokens[s : min(s + step, tokens.size - 1)]
        targets = tokens[s + 1 : s + 1 + chunk.size]
        logits = model(chunk[None], cache=cache)[0].astype(mx.float32)
        losses.append(nn.losses.cross_entropy(logits, targets))
    losses = mx.concatenate(losses)  # losses[t] scores position t + 1
    result = {}
    for start, end in BUCKETS:
        lo, hi = max(start - 1, 0), end - 1
        result[(start, end)] = math.exp(losses[lo:hi].mean().item())
    return result


def test_selfextend_keeps_perplexity_flat_past_the_trained_window():
    path = shared_path("models", "stories260K")
    text = shared_path("text", "tinystories_sample.txt").read_text()
    model, _ = load_model(path)
    tokens = mx.array(load_tokenizer(path).encode(text)[:4096])
    assert tokens.size == 4096

    plain = bucket_perplexity(model, tokens, make_prompt_cache(model))
    apply_selfextend(model, SelfExtendConfig(group_size=8, window=128))
    extended = bucket_perplexity(model, tokens, make_cache(model))
    print("plain", plain, "\nselfextend", extended)

    assert plain[(2048, 4096)] > 10 * plain[(0, 512)]
    assert extended[(2048, 4096)] < 1.5 * extended[(0, 512)]
    # inside the trained window (and before W) SelfExtend leaves the model alone... almost:
    # positions 128..512 already use grouped distances, so compare loosely.
    assert extended[(0, 512)] < 1.2 * plain[(0, 512)]
