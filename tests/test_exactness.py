"""SelfExtend against a dense reference of the formulas, for every supported family.

The reference below is written from ../shared/SELFEXTEND.md independently of
selfextend_mlx.core.attention: two full score matrices (neighbor and grouped positions), `where`,
causal mask, one softmax. It rotates token by token with the model's own rope module. It
shares only the per-family q/k/v projections with the library; those are checked against
plain mlx-lm separately (every distance < W must give the plain model exactly).
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from tiny_models import FAMILY_CONFIGS, random_tokens, tiny_model

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache, remove_selfextend
from selfextend_mlx.core.families import family_for

N = 80
SETTINGS = [(2, 16), (3, 20), (4, 10)]  # (G, W); W=20 is not a multiple of G=3


def rope_each(rope, x, positions):
    return mx.concatenate([rope(x[:, :, t : t + 1], offset=int(p)) for t, p in enumerate(positions)], axis=2)


def dense_selfextend(q, k, v, rope, scale, G, W, softcap):
    n = q.shape[2]
    i = np.arange(n)
    q_neighbor, k_neighbor = rope_each(rope, q, i), rope_each(rope, k, i)
    q_grouped = rope_each(rope, q, i // G + W - W // G)
    k_grouped = rope_each(rope, k, i // G)
    rep = q.shape[1] // k.shape[1]
    k_neighbor, k_grouped, v = (mx.repeat(t, rep, axis=1) for t in (k_neighbor, k_grouped, v))
    s_neighbor = (q_neighbor @ k_neighbor.swapaxes(-1, -2)) * scale
    s_grouped = (q_grouped @ k_grouped.swapaxes(-1, -2)) * scale
    if softcap:
        s_neighbor = mx.tanh(s_neighbor / softcap) * softcap
        s_grouped = mx.tanh(s_grouped / softcap) * softcap
    distance = i[:, None] - i[None, :]
    s = mx.where(mx.array(distance < W), s_neighbor, s_grouped)
    s = mx.where(mx.array(distance >= 0), s, -math.inf)
    return mx.softmax(s, axis=-1) @ v


def reference_logits(model, tokens, G, W):
    """Run the whole sequence with every global attention layer replaced by the dense reference."""
    originals = {}
    for layer in model.layers:
        attn = layer.self_attn
        family = family_for(attn)
        if family.is_sliding(layer, attn):
            continue
        cls = type(attn)

        def call(self, x, mask=None, cache=None, family=family):
            q, k, v = family.project(self, x)
            out = dense_selfextend(q, k, v, self.rope, family.scale(self), G, W, family.softcap(self))
            return family.output(self, out)

        originals[id(attn)] = cls
        attn.__class__ = type("DenseReference" + cls.__name__, (cls,), {"__call__": call})
    try:
        return model(tokens[None])
    finally:
        for layer in model.layers:
            if id(layer.self_attn) in originals:
                layer.self_attn.__class__ = originals[id(layer.self_attn)]


def feed(model, tokens, step, cache):
    return mx.concatenate([model(tokens[None, s : s + step], cache=cache) for s in range(0, tokens.size, step)], axis=1)


def assert_close(actual, expected, tol=1e-4):
    err = mx.abs(actual - expected).max().item()
    assert err <= tol * max(1.0, mx.abs(expected).max().item()), f"max abs error {err}"


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_matches_dense_reference(family):
    model = tiny_model(family)
    tokens = random_tokens(N)
    plain = model(tokens[None])
    for G, W in SETTINGS:
        expected = reference_logits(model, tokens, G, W)
        # the test is only meaningful if grouping changes something
        assert mx.abs(expected - plain).max().item() > 1e-2
        apply_selfextend(model, SelfExtendConfig(group_size=G, window=W, chunk_size=32))
        assert_close(model(tokens[None]), expected)  # whole sequence, no cache
        for step in (1, 7, 64, N):  # prefill in chunks; step 1 is token-by-token decoding
            assert_close(feed(model, tokens, step, make_cache(model)), expected)
        apply_selfextend(model, SelfExtendConfig(group_size=G, window=W, chunk_size=5))
        assert_close(model(tokens[None]), expected)  # internal query chunks smaller than W
        for chunk in (5, 32):  # the fused-kernel prefill path (what a GPU runs), forced on
            apply_selfextend(model, SelfExtendConfig(group_size=G, window=W, chunk_size=chunk, backend="fused"))
            assert_close(model(tokens[None]), expected)
            assert_close(feed(model, tokens, 7, make_cache(model)), expected)
        remove_selfextend(model)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fused_call_as_metal_runs_it_matches_dense_reference(family, monkeypatch):
    # On Metal the fused call's values are padded with zeros to the query's head size 2D, so
    # MLX can run its fused kernel (it needs equal head sizes): the padding must change nothing.
    from selfextend_mlx.core import attention

    monkeypatch.setattr(attention, "device_kind", lambda: "metal")
    model = tiny_model(family)
    tokens = random_tokens(N)
    G, W = SETTINGS[1]
    expected = reference_logits(model, tokens, G, W)
    apply_selfextend(model, SelfExtendConfig(group_size=G, window=W, chunk_size=16, backend="fused"))
    assert_close(model(tokens[None]), expected)
    assert_close(feed(model, tokens, 9, make_cache(model)), expected)
    remove_selfextend(model)


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_equals_plain_model_within_window(family):
    model = tiny_model(family)
    tokens = random_tokens(40)
    plain_whole = model(tokens[None])
    plain_steps = feed(model, tokens, 7, make_prompt_cache(model))
    apply_selfextend(model, SelfExtendConfig(group_size=4, window=48))
    assert_close(model(tokens[None]), plain_whole, tol=1e-5)
    assert_close(feed(model, tokens, 7, make_cache(model)), plain_steps, tol=1e-5)
    assert_close(feed(model, tokens, 1, make_cache(model)), plain_whole, tol=1e-5)


def test_group_size_one_is_the_plain_model():
    model = tiny_model("llama")
    tokens = random_tokens(N)
    plain = model(tokens[None])
    apply_selfextend(model, SelfExtendConfig(group_size=1, window=8))
    assert_close(model(tokens[None]), plain, tol=1e-5)
    assert_close(feed(model, tokens, 9, make_cache(model)), plain, tol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi"])  # GQA; partial rotary
def test_batched_rows_match_single_sequences(family):
    # Every (batch, head, token) row of a step is rotated with its own offset in one rope call:
    # a batch must give each sequence exactly what it gets alone.
    model = tiny_model(family)
    rows = mx.stack([random_tokens(N, seed=1), random_tokens(N, seed=2)])
    apply_selfextend(model, SelfExtendConfig(group_size=3, window=20, chunk_size=32))
    cache = make_cache(model)
    batched = mx.concatenate([model(rows[:, s : s + 9], cache=cache) for s in range(0, N, 9)], axis=1)
    for b in range(2):
        assert_close(batched[b : b + 1], reference_logits(model, rows[b], 3, 20))
