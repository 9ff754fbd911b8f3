"""The SelfExtend KV cache: keys stored already rotated, so decoding never re-rotates them.

Per layer it keeps
  values: once, they carry no position,
  neighbor keys: keys rotated at j for the last W - 1 positions (+ the newest chunk), the
    only keys any later query sees at their normal position,
  grouped keys: keys rotated at their grouped position j // G, only for the positions
    before that window (+ up to `neighbor_step` ahead). A key that leaves the window is
    turned into its grouped form by rotating its neighbor form by j // G - j; that happens
    in batches, when the window is compacted, so a decode step usually rotates nothing.
Every position's key is thus held about once: the cache is about the size of the plain one
(the window overlaps the grouped keys by at most `neighbor_step` positions).
"""

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .attention import CachedKV, rotate_further, seq_length, seq_slice
from .config import SelfExtendConfig


def _grow(buffer, needed: int, like, step: int):
    """Return `buffer` (array or quantized triple) with room for `needed` positions on axis 2."""
    if buffer is not None and seq_length(buffer) >= needed:
        return buffer
    capacity = max(1, (needed + step - 1) // step) * step

    def grown(old, new_like):
        fresh = mx.zeros((*new_like.shape[:2], capacity, new_like.shape[3]), new_like.dtype)
        if old is not None:
            fresh[..., : old.shape[2], :] = old
        return fresh

    if isinstance(like, tuple):
        return tuple(grown(None if buffer is None else o, n) for o, n in zip(buffer or (None,) * 3, like))
    return grown(buffer, like)


def _write(buffer, start: int, data):
    if isinstance(buffer, tuple):
        for part, new in zip(buffer, data):
            part[..., start : start + new.shape[2], :] = new
    else:
        buffer[..., start : start + data.shape[2], :] = data


def _nbytes(x) -> int:
    if x is None:
        return 0
    return sum(part.nbytes for part in x) if isinstance(x, tuple) else x.nbytes


class SelfExtendKVCache(_BaseCache):
    step = 256
    neighbor_step = 64

    def __init__(self, config: SelfExtendConfig):
        self.config = config
        self.offset = 0
        self.keys = None  # grouped keys for positions [0, grouped_length)
        self.grouped_length = 0
        self.values = None
        self.neighbor_keys = None
        self.neighbor_start = 0  # absolute position of neighbor_keys[..., 0, :]
        self.neighbor_length = 0

    # -- storage ------------------------------------------------------------------------
    def _store(self, x):
        return x

    def _restore(self, x):
        return x

    def update_and_fetch(self, grouped_keys, values, neighbor_keys, rope):
        """Append one step's keys (rotated both ways) and values; return what the step's
        queries at [a, b) attend to (a CachedKV): grouped keys [0, g), values [0, b), neighbor
        keys [start, b) with start = max(0, a - W + 1), and g >= max(start, b - W), the first
        key that is a neighbor of every query of the step."""
        a, n = self.offset, values.shape[2]
        b = a + n
        window = self.config.window
        keep_from = max(0, a - window + 1)
        grouped_needed = max(keep_from, b - window)
        values = self._store(values)
        self.values = _grow(self.values, b, values, self.step)
        _write(self.values, a, values)
        self.offset = b
        self._update_keys(grouped_keys, neighbor_keys, a, keep_from, grouped_needed, rope)
        view = self.neighbor_keys[..., keep_from - self.neighbor_start : self.neighbor_length, :]
        return CachedKV(seq_prefix(self.keys, self.grouped_length), seq_prefix(self.values, b), view, keep_from)

    def _update_keys(self, grouped_keys, neighbor_keys, a: int, keep_from: int, grouped_needed: int, rope):
        """Keep neighbor keys for positions >= keep_from and append the new ones; extend the
        grouped keys to at least grouped_needed.

        The window is rewritten into a fresh buffer (compacted) whenever keys are read out of
        it: reading a buffer and writing it in the same step would make MLX copy all of it."""
        n = neighbor_keys.shape[2]
        if self.keys is None:
            self.keys = _grow(None, 0, self._store(grouped_keys[..., :0, :]), self.step)
        used = self.neighbor_length
        stale = keep_from - self.neighbor_start
        missing = None
        if stale < 0 and a > 0:
            # A trim went back past the window kept: re-derive those keys from the grouped ones.
            grouped = self._restore(seq_slice(self.keys, keep_from, self.neighbor_start))
            positions = mx.arange(keep_from, self.neighbor_start)
            missing = rotate_further(rope, grouped, positions - positions // self.config.group_size)
            stale = 0
        compact = (
            self.neighbor_keys is None
            or missing is not None
            or used + n > self.neighbor_keys.shape[2]
            or stale >= self.neighbor_step
            or self.grouped_length < grouped_needed
        )
        if compact:
            # Convert ahead: the next `neighbor_step` keys to leave the window, so that decoding
            # converts once every that many steps.
            target = max(grouped_needed, min(a, keep_from + self.neighbor_step))
            self._extend_grouped(target, grouped_keys, a, rope)
            self._compact(neighbor_keys, missing, stale, keep_from)
            used = self.neighbor_length
        self.neighbor_keys[..., used : used + n, :] = neighbor_keys
        self.neighbor_length = used + n

    def _extend_grouped(self, target: int, new_grouped, a: int, rope):
        """Grouped keys up to `target`: from the window for positions < a (rotated from j to
        j // G), from the step's own grouped keys for positions >= a."""
        start = self.grouped_length
        if target <= start:
            return
        parts = []
        from_window = min(a, target)
        if from_window > start:
            neighbors = self.neighbor_keys[..., start - self.neighbor_start : from_window - self.neighbor_start, :]
            positions = mx.arange(start, from_window)
            parts.append(rotate_further(rope, neighbors, positions // self.config.group_size - positions))
        if target > a:
            parts.append(new_grouped[..., max(start, a) - a : target - a, :])
        grouped = self._store(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2))
        self.keys = _grow(self.keys, target, grouped, self.step)
        _write(self.keys, start, grouped)
        self.grouped_length = target

    def _compact(self, like, missing, stale: int, keep_from: int):
        """Move the live window [keep_from, offset before this step) to the front of a
        right-sized fresh buffer."""
        n = like.shape[2]
        live = [] if self.neighbor_keys is None else [self.neighbor_keys[..., stale : self.neighbor_length, :]]
        if missing is not None:
            live.insert(0, missing.astype(like.dtype))
        length = sum(part.shape[2] for part in live)
        # room for neighbor_step more tokens, so decoding compacts once every that many steps
        capacity = (length + n + 2 * self.neighbor_step - 1) // self.neighbor_step * self.neighbor_step
        fresh = mx.zeros((*like.shape[:2], capacity, like.shape[3]), like.dtype)
        if length:
            fresh[..., :length, :] = mx.concatenate(live, axis=2) if len(live) > 1 else live[0]
        self.neighbor_keys, self.neighbor_start, self.neighbor_length = fresh, keep_from, length

    # -- mlx-lm cache protocol ------------------------------------------------------------
    def size(self):
        return self.offset

    def empty(self):
        return self.values is None

    def make_mask(self, N, window_size=None, return_array=False):
        # SelfExtend layers build their own masks; this serves any other reader.
        return create_attention_mask(N, offset=self.offset, window_size=window_size, return_array=return_array)

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        self.grouped_length = min(self.grouped_length, self.offset)
        # Neighbor keys older than the kept window are rebuilt at the next update, if needed.
        self.neighbor_length = max(0, min(self.neighbor_length, self.offset - self.neighbor_start))
        if self.neighbor_length == 0:
            self.neighbor_start = self.offset
        return n

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values) + _nbytes(self.neighbor_keys)

    # -- saving (save_cache and load_cache rebuild caches with from_state, as mlx-lm does) ----
    @property
    def state(self):
        window = self.neighbor_keys[..., : self.neighbor_length, :]
        return (
            seq_prefix(self.keys, self.grouped_length),
            seq_prefix(self.values, self.offset),
            window,
            self.offset,
            self.neighbor_start,
            self.config.group_size,
            self.config.window,
        )

    @state.setter
    def state(self, value):
        keys, values, window, offset, start, group_size, window_size = value[:7]
        # safetensors round trips turn quantized triples into lists
        self.keys = tuple(keys) if isinstance(keys, list) else keys
        self.values = tuple(values) if isinstance(values, list) else values
        self.grouped_length = seq_length(self.keys)
        self.neighbor_keys, self.neighbor_length = window, window.shape[2]
        self.offset, self.neighbor_start = offset, start
        self.config = SelfExtendConfig(group_size=group_size, window=window_size)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedSelfExtendKVCache":
        quantized = QuantizedSelfExtendKVCache(self.config, group_size=group_size, bits=bits)
        quantized.offset = self.offset
        if self.values is not None:
            quantized.keys = quantized._store(seq_prefix(self.keys, self.grouped_length))
            quantized.grouped_length = self.grouped_length
            quantized.values = quantized._store(seq_prefix(self.values, self.offset))
            quantized.neighbor_keys = self.neighbor_keys
            quantized.neighbor_start = self.neighbor_start
            quantized.neighbor_length = self.neighbor_length
        return quantized


def seq_prefix(buffer, n: int):
    if isinstance(buffer, tuple):
        return tuple(part[..., :n, :] for part in buffer)
    return buffer[..., :n, :]


class QuantizedSelfExtendKVCache(SelfExtendKVCache):
    """Grouped keys and values quantized like mlx-lm's QuantizedKVCache; the short
    neighbor window stays in full precision."""

    def __init__(self, config: SelfExtendConfig, group_size: int = 64, bits: int = 8):
        if bits not in (4, 8):
            raise ValueError(f"kv bits must be 4 or 8, got {bits}")
        super().__init__(config)
        self.group_size, self.bits = group_size, bits

    def _store(self, x):
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _restore(self, x):
        return mx.dequantize(*x, group_size=self.group_size, bits=self.bits)

    @property
    def quant(self):
        return (self.group_size, self.bits)

    @property
    def state(self):
        return (*super().state, self.group_size, self.bits)

    @state.setter
    def state(self, value):
        SelfExtendKVCache.state.fset(self, value)
        self.group_size, self.bits = value[7], value[8]

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        return self  # already quantized: generation must never swap it for another cache


def is_selfextend_cache(cache) -> bool:
    return isinstance(cache, SelfExtendKVCache)


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
