"""STRING attention: shifted rotary positions (An et al., "Why Does the Effective Context Length
of LLMs Fall Short?", ICLR 2025, arXiv 2410.18745, section 4).

STRING keeps the well-trained small relative positions and drops the rarely trained large ones:
for a query at i and a key at j <= i, distance d = i - j,
  d <  S: score = scale * <rope(q, i), rope(k, j)>            (the plain model)
  d >= S: score = scale * <rope(q, i - S + w), rope(k, j)>    (distance d - S + w)
and one softmax over both. S is the shift offset, w the local window that keeps the nearest
tokens' emphasis. It is SelfExtend's two-branch attention with group size 1 and a negative
query shift, so it runs in `attention`'s chunked score machinery (one score matrix per chunk);
keys are rotated once, at j, so the model's own KV cache holds them unchanged.

The paper's defaults (section 4 and its experiments): S = L / 3 of the trained length L, and
w = 128; `string_defaults` keeps w below S for contexts too small for 128.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..defaults import ATTENTION_CHUNK
from ..errors import SettingsError
from .attention import CachedKV, _attend_chunk, rope_at
from .config import SelfExtendConfig
from .patch import check_supported, layer_attention, remove_selfextend, swap_attention

PAPER_LOCAL_WINDOW = 128


@dataclass(frozen=True)
class StringConfig:
    """offset (S): distances at or beyond it are shifted; local_window (w): what they become
    at d = S. chunk_size: queries handled at once inside attention."""

    offset: int
    local_window: int
    chunk_size: int = ATTENTION_CHUNK

    def __post_init__(self):
        for name in ("offset", "local_window", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.local_window >= self.offset:
            raise ValueError(f"local_window ({self.local_window}) must be below offset ({self.offset})")

    @property
    def shift(self) -> int:
        """Added to a far query's position: its distances become d - S + w."""
        return self.local_window - self.offset

    def distance(self, d: int) -> int:
        """The relative position STRING uses for distance d (the rule above, for tests and docs)."""
        return d if d < self.offset else d + self.shift


def string_defaults(trained_context: int) -> StringConfig:
    """The paper's S = L // 3 and w = 128 (w = S // 2 where S is not above 128)."""
    offset = trained_context // 3
    if offset < 2:
        raise ValueError(f"a trained context of {trained_context} tokens is too short for STRING")
    window = PAPER_LOCAL_WINDOW if offset > PAPER_LOCAL_WINDOW else offset // 2
    return StringConfig(offset=offset, local_window=window)


def rotate_queries(rope, q: mx.array, start: int, config: StringConfig):
    """(q at i, q at i - S + w) for queries at start, start + 1, ... A far position below 0
    belongs to a query with no key at distance >= S (i < S): it is clamped, never used."""
    L = q.shape[2]
    near = rope_at(rope, q, start)
    far_start = start + config.shift
    if far_start >= 0:
        return near, rope_at(rope, q, far_start)
    positions = np.maximum(np.arange(far_start, far_start + L), 0).astype(np.int32)
    return near, rope_at(rope, q, mx.array(positions))


def string_attention(q_near, q_far, keys, values, *, q_start: int, config: StringConfig, softcap=None):
    """Attention output (B, Hq, L, Dv) for queries at q_start, ...: q_near / q_far rotated by
    rotate_queries and pre-scaled; keys (rotated at j) and values for positions [0, q_start + L)."""
    B, Hq, L, D = q_near.shape
    Hkv = keys.shape[1]
    rep = Hq // Hkv
    end = q_start + L
    if end <= config.offset and softcap is None:  # every distance below S: the plain model
        mask = "causal" if L > 1 else None
        return mx.fast.scaled_dot_product_attention(q_near, keys, values, scale=1.0, mask=mask)
    # `_attend_chunk` picks the first score for d < window and the second for d >= window.
    two_branch = SelfExtendConfig(group_size=1, window=config.offset, backend="explicit")
    kv = CachedKV(keys, values, keys, 0)
    outputs = []
    for a in range(q_start, end, config.chunk_size):
        b = min(end, a + config.chunk_size)
        qn, qf = (x[:, :, a - q_start : b - q_start, :].reshape(B, Hkv, rep * (b - a), D) for x in (q_near, q_far))
        out = _attend_chunk(qn, qf, a=a, b=b, kv=kv, config=two_branch, softcap=softcap, quant=None)
        outputs.append(out.reshape(B, Hq, b - a, -1))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def _string_call(self, x, mask=None, cache=None):
    family, config = self._selfextend_family, self._string_config
    q, k, v = family.project(self, x)
    start = 0 if cache is None else cache.offset
    q_near, q_far = rotate_queries(self.rope, q * family.scale(self), start, config)
    k = rope_at(self.rope, k, start)
    if cache is not None:
        if getattr(cache, "bits", None) is not None:
            raise SettingsError("STRING needs a full-precision KV cache: drop --kv-bits")
        k, v = cache.update_and_fetch(k, v)
    out = string_attention(q_near, q_far, k, v, q_start=start, config=config, softcap=family.softcap(self))
    return family.output(self, out)


def apply_string(model, config: StringConfig):
    """Make every global attention layer of `model` use STRING with `config` (sliding-window
    layers stay plain); the model's own KV cache serves it. `patch.use_selfextend(model, None)`
    or `remove_string` puts the plain attention back."""
    if not isinstance(config, StringConfig):
        raise TypeError("config must be a StringConfig")
    check_supported(model)
    remove_selfextend(model)
    swap_attention(model, _string_call, "String", "_string_config", config)
    return model


def remove_string(model):
    return remove_selfextend(model)


def string_config(model):
    """The StringConfig applied to `model`, or None."""
    for layer in model.layers:
        config = getattr(layer_attention(layer), "_string_config", None)
        if config is not None:
            return config
    return None
