"""Perplexity scoring: the maths on known distributions, chunking through the cache, and stories260K."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path

from selfextend_mlx.core.config import SelfExtendConfig
from selfextend_mlx.errors import EvaluationError
from selfextend_mlx.evaluation.common import PLAIN, SELFEXTEND, Mode, new_cache, use_mode
from selfextend_mlx.evaluation.perplexity import bucket_edges, bucket_perplexity, perplexity_buckets, token_nll
from selfextend_mlx.loading.load import load

PROBS = [0.5, 0.25, 0.125, 0.0625, 0.0625]


class PositionCache:
    offset = 0


class KnownModel:
    """Puts probability PROBS[0] on token (position + 1) % V and spreads the rest over the others.

    It needs the cache offset to know absolute positions, so a chunking mistake changes the answer.
    """

    layers = []

    def __call__(self, x, cache):
        n = x.shape[1]
        positions = np.arange(cache[0].offset, cache[0].offset + n)
        cache[0].offset += n
        vocab = len(PROBS)
        logits = np.empty((1, n, vocab), dtype=np.float32)
        for row, position in enumerate(positions):
            # Rotate PROBS so the favourite lands on (position + 1) % V, the next one after it, ...
            for rank, p in enumerate(PROBS):
                logits[0, row, (position + 1 + rank) % vocab] = math.log(p) + 3.0  # softmax ignores the shift
        return mx.array(logits)


def known_nll(tokens):
    """NLL from the definition: target t at rank (t - position_before) - 1 of PROBS."""
    return [-math.log(PROBS[(tokens[i + 1] - i - 1) % len(PROBS)]) for i in range(len(tokens) - 1)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_nll_of_known_distribution_whatever_the_chunk(chunk):
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, len(PROBS), 40)]
    nll = token_nll(KnownModel(), tokens, [PositionCache()], chunk_size=chunk)
    np.testing.assert_allclose(nll, known_nll(tokens), rtol=1e-5)


def test_perplexity_of_always_likeliest_token_is_one_over_p():
    tokens = [i % len(PROBS) for i in range(50)]  # always the favourite: p = 0.5 -> ppl 2
    nll = token_nll(KnownModel(), tokens, [PositionCache()], chunk_size=8)
    buckets = bucket_perplexity(nll, bucket_edges(50, [10, 30]))
    assert [(b.start, b.end, b.count) for b in buckets] == [(0, 10, 9), (10, 30, 20), (30, 50, 20)]
    for bucket in buckets:
        assert bucket.ppl == pytest.approx(2.0, rel=1e-6)


def test_bucket_perplexity_is_exp_of_mean_nll_by_target_position():
    nll = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # targets at positions 1..5
    buckets = bucket_perplexity(nll, [(0, 2), (2, 6)])
    assert buckets[0].count == 1 and buckets[0].ppl == pytest.approx(math.e)
    assert buckets[1].count == 4 and buckets[1].ppl == pytest.approx(math.exp(3.5))


def test_bucket_edges_default_doubles_from_512_and_checks_input():
    assert bucket_edges(3000) == [(0, 512), (512, 1024), (1024, 2048), (2048, 3000)]
    assert bucket_edges(1024) == [(0, 512), (512, 1024)]
    assert bucket_edges(100, [50, 100, 200]) == [(0, 50), (50, 100)]
    with pytest.raises(EvaluationError):
        bucket_edges(100, [60, 50])
    with pytest.raises(EvaluationError):
        bucket_edges(1)


def test_memory_bound_chunks_see_at_most_chunk_size_logits():
    seen = []
    token_nll(KnownModel(), list(range(5)) * 20, [PositionCache()], chunk_size=16, on_chunk=seen.append)
    assert max(seen) <= 16 and sum(seen) == 99


@pytest.fixture(scope="module")
def stories():
    return load(shared_path("models", "stories260K"), selfextend=False)


@pytest.fixture(scope="module")
def story_tokens(stories):
    _, tokenizer = stories
    return tokenizer.encode(shared_path("text", "tinystories_sample.txt").read_text())


def test_chunked_scoring_through_cache_equals_one_full_forward(stories, story_tokens):
    model, _ = stories
    use_mode(model, Mode(PLAIN))
    tokens = story_tokens[:300]
    nll = token_nll(model, tokens, new_cache(model), chunk_size=64)
    logits = model(mx.array(tokens[:-1])[None])[0].astype(mx.float32)
    full = nn.losses.cross_entropy(logits, mx.array(tokens[1:]), reduction="none")
    np.testing.assert_allclose(nll, np.array(full), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_stories260k_selfextend_keeps_perplexity_flat_where_plain_explodes(stories, story_tokens):
    """Acceptance: 4096 tokens; SelfExtend [2048,4096) within 1.5x of [0,512), plain over 10x."""
    model, _ = stories
    tokens = story_tokens[:4096]
    assert len(tokens) == 4096
    ranges = [(0, 512), (2048, 4096)]
    use_mode(model, Mode(PLAIN))
    plain = perplexity_buckets(model, tokens, ranges)
    use_mode(model, Mode(SELFEXTEND, SelfExtendConfig(group_size=16, window=128)))
    try:
        extended = perplexity_buckets(model, tokens, ranges)
    finally:
        use_mode(model, Mode(PLAIN))
    assert plain[1].ppl > 10 * plain[0].ppl
    assert extended[1].ppl < 1.5 * extended[0].ppl


@pytest.mark.parametrize("config", [None, SelfExtendConfig(group_size=4, window=16)])
def test_quantized_kv_cache_scores_close_to_full_precision(config):
    from tiny_models import random_tokens, tiny_model

    model = tiny_model("llama", num_attention_heads=2, num_key_value_heads=1)  # head_dim 32: quantizable
    use_mode(model, Mode(SELFEXTEND, config) if config else Mode(PLAIN))
    tokens = [int(t) for t in random_tokens(150).tolist()]
    ranges = bucket_edges(150, [50])
    full = perplexity_buckets(model, tokens, ranges, chunk_size=32)
    eight = perplexity_buckets(model, tokens, ranges, kv_bits=8, chunk_size=32)
    for a, b in zip(full, eight):
        assert b.ppl == pytest.approx(a.ppl, rel=0.02)
    assert full != eight  # the 8-bit cache was really used: rounding moves the scores a little
    assert all("Quantized" in type(c).__name__ for c in new_cache(model, 8))
