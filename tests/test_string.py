"""STRING (shifted rotary positions) against a dense reference of its formula, for every family.

The reference is written from the paper's definition (arXiv 2410.18745, section 4), not from
selfextend_mlx.core.string: distance d = i - j is used as is below S and as d - S + w at or
beyond it. It builds two full score matrices, rotating token by token with the model's own rope
at the positions that give those distances (query at i or i - S + w, key at j), then `where`,
a causal mask and one softmax.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from test_exactness import assert_close, feed, rope_each
from tiny_models import FAMILY_CONFIGS, random_tokens, tiny_model

from selfextend_mlx.core.families import family_for
from selfextend_mlx.core.patch import make_cache, use_selfextend
from selfextend_mlx.core.string import StringConfig, apply_string, string_config, string_defaults
from selfextend_mlx.errors import SettingsError

N = 80
SETTINGS = [(24, 8), (17, 5), (40, 39)]  # (S, w)


def dense_string(q, k, v, rope, scale, S, w, softcap):
    n = q.shape[2]
    i = np.arange(n)
    k_rotated = rope_each(rope, k, i)
    q_near = rope_each(rope, q, i)
    q_far = rope_each(rope, q, i - S + w)  # negative for i < S - w: rows never used (no d >= S)
    rep = q.shape[1] // k.shape[1]
    k_rotated, v = (mx.repeat(t, rep, axis=1) for t in (k_rotated, v))
    s_near = (q_near @ k_rotated.swapaxes(-1, -2)) * scale
    s_far = (q_far @ k_rotated.swapaxes(-1, -2)) * scale
    if softcap:
        s_near, s_far = (mx.tanh(s / softcap) * softcap for s in (s_near, s_far))
    distance = i[:, None] - i[None, :]
    s = mx.where(mx.array(distance < S), s_near, s_far)
    s = mx.where(mx.array(distance >= 0), s, -math.inf)
    return mx.softmax(s, axis=-1) @ v


def reference_logits(model, tokens, S, w):
    originals = {}
    for layer in model.layers:
        attn = layer.self_attn
        family = family_for(attn)
        if family.is_sliding(layer, attn):
            continue
        cls = type(attn)

        def call(self, x, mask=None, cache=None, family=family):
            q, k, v = family.project(self, x)
            return family.output(self, dense_string(q, k, v, self.rope, family.scale(self), S, w, family.softcap(self)))

        originals[id(attn)] = cls
        attn.__class__ = type("DenseString" + cls.__name__, (cls,), {"__call__": call})
    try:
        return model(tokens[None])
    finally:
        for layer in model.layers:
            if id(layer.self_attn) in originals:
                layer.self_attn.__class__ = originals[id(layer.self_attn)]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_matches_dense_reference(family):
    model = tiny_model(family)
    tokens = random_tokens(N)
    plain = model(tokens[None])
    for S, w in SETTINGS:
        expected = reference_logits(model, tokens, S, w)
        assert mx.abs(expected - plain).max().item() > 1e-2  # the shift changes something
        apply_string(model, StringConfig(offset=S, local_window=w, chunk_size=32))
        assert_close(model(tokens[None]), expected)  # whole sequence, no cache
        for step in (1, 7, 64):  # the model's own cache, prefilled in steps; 1 is decoding
            assert_close(feed(model, tokens, step, make_cache(model)), expected)
        apply_string(model, StringConfig(offset=S, local_window=w, chunk_size=5))
        assert_close(model(tokens[None]), expected)  # query chunks smaller than S
        use_selfextend(model, None)
        assert string_config(model) is None
        assert_close(model(tokens[None]), plain, tol=1e-5)  # the switch puts plain attention back


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_equals_plain_model_below_offset(family):
    model = tiny_model(family)
    tokens = random_tokens(40)
    plain_whole = model(tokens[None])
    plain_steps = feed(model, tokens, 7, make_prompt_cache(model))
    apply_string(model, StringConfig(offset=41, local_window=8))
    assert_close(model(tokens[None]), plain_whole, tol=1e-5)
    assert_close(feed(model, tokens, 7, make_cache(model)), plain_steps, tol=1e-5)
    use_selfextend(model, None)


def test_distance_rule_and_paper_defaults():
    config = StringConfig(offset=10, local_window=3)
    assert [config.distance(d) for d in (0, 9, 10, 11, 30)] == [0, 9, 3, 4, 23]
    assert string_defaults(8192) == StringConfig(offset=2730, local_window=128)
    assert string_defaults(512) == StringConfig(offset=170, local_window=128)
    assert string_defaults(300) == StringConfig(offset=100, local_window=50)
    with pytest.raises(ValueError):
        StringConfig(offset=8, local_window=8)


def test_quantized_cache_is_refused_in_one_line():
    model = tiny_model("llama")
    apply_string(model, StringConfig(offset=10, local_window=4))
    cache = [c.to_quantized(group_size=32, bits=8) for c in make_prompt_cache(model)]
    with pytest.raises(SettingsError, match="--kv-bits"):
        model(random_tokens(12)[None], cache=cache)
    use_selfextend(model, None)
