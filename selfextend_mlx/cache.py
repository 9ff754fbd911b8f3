"""The SelfExtend KV cache: keys stored already rotated, so decoding never re-rotates them.

Per layer it keeps
  grouped keys: every key rotated at its grouped position j // G (what far queries see),
  values: once, they carry no position,
  neighbor keys: keys rotated at j, only for the last W - 1 positions (+ the newest chunk),
    because no later query is within W of anything older.
so it takes about (2 + (W + slack) / N) / 2 times the plain cache.
"""

import os
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask, load_prompt_cache, save_prompt_cache

from .attention import rotate_further, seq_slice
from .config import SelfExtendConfig
from .errors import CacheMismatchError

CACHE_FORMAT_VERSION = "1"


def _grow(buffer, needed: int, like, step: int):
    """Return `buffer` (array or quantized triple) with room for `needed` positions on axis 2."""
    if buffer is not None and _length(buffer) >= needed:
        return buffer
    capacity = (needed + step - 1) // step * step

    def grown(old, new_like):
        fresh = mx.zeros((*new_like.shape[:2], capacity, new_like.shape[3]), new_like.dtype)
        if old is not None:
            fresh[..., : old.shape[2], :] = old
        return fresh

    if isinstance(like, tuple):
        return tuple(grown(None if buffer is None else o, n) for o, n in zip(buffer or (None,) * 3, like))
    return grown(buffer, like)


def _length(buffer) -> int:
    return (buffer[0] if isinstance(buffer, tuple) else buffer).shape[2]


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
        self.keys = None  # grouped keys
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
        """Append one step's keys/values; return what the step's queries attend to:
        (grouped keys [0, N), values [0, N), neighbor keys [start, N), start)."""
        prev, n = self.offset, values.shape[2]
        grouped_keys, values = self._store(grouped_keys), self._store(values)
        self.keys = _grow(self.keys, prev + n, grouped_keys, self.step)
        self.values = _grow(self.values, prev + n, values, self.step)
        _write(self.keys, prev, grouped_keys)
        _write(self.values, prev, values)
        self.offset = prev + n
        start = self._append_neighbors(neighbor_keys, prev, rope)
        view = self.neighbor_keys[..., start - self.neighbor_start : self.neighbor_length, :]
        return self._prefix(self.keys), self._prefix(self.values), view, start

    def _prefix(self, buffer):
        return buffer if _length(buffer) == self.offset else seq_prefix(buffer, self.offset)

    def _append_neighbors(self, keys, prev: int, rope) -> int:
        """Keep neighbor keys for positions >= prev - W + 1, then append; return that start."""
        keep_from = max(0, prev - self.config.window + 1)
        n = keys.shape[2]
        used = self.neighbor_length
        stale = keep_from - self.neighbor_start
        missing = None
        if stale < 0 and prev > 0:
            # A trim went back past the window kept: re-derive those keys from the grouped ones.
            grouped = self._restore(seq_slice(self.keys, keep_from, self.neighbor_start))
            positions = mx.arange(keep_from, self.neighbor_start)
            missing = rotate_further(rope, grouped, positions - positions // self.config.group_size)
            stale = 0
        if (
            self.neighbor_keys is None
            or missing is not None
            or used + n > self.neighbor_keys.shape[2]
            or stale >= self.neighbor_step
        ):
            # Compact: move the live window to the front of a right-sized buffer.
            live = [] if self.neighbor_keys is None else [self.neighbor_keys[..., stale:used, :]]
            if missing is not None:
                live.insert(0, missing.astype(keys.dtype))
            length = sum(part.shape[2] for part in live)
            # room for neighbor_step more tokens, so decoding compacts once every that many steps
            capacity = (length + n + 2 * self.neighbor_step - 1) // self.neighbor_step * self.neighbor_step
            fresh = mx.zeros((*keys.shape[:2], capacity, keys.shape[3]), keys.dtype)
            if length:
                fresh[..., :length, :] = mx.concatenate(live, axis=2) if len(live) > 1 else live[0]
            self.neighbor_keys, self.neighbor_start, used = fresh, keep_from, length
        self.neighbor_keys[..., used : used + n, :] = keys
        self.neighbor_length = used + n
        return keep_from

    # -- mlx-lm cache protocol ------------------------------------------------------------
    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None

    def make_mask(self, N, window_size=None, return_array=False):
        # SelfExtend layers build their own masks; this serves any other reader.
        return create_attention_mask(N, offset=self.offset, window_size=window_size, return_array=return_array)

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        # Neighbor keys older than the kept window are rebuilt at the next update, if needed.
        self.neighbor_length = max(0, min(self.neighbor_length, self.offset - self.neighbor_start))
        if self.neighbor_length == 0:
            self.neighbor_start = self.offset
        return n

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values) + _nbytes(self.neighbor_keys)

    # -- saving (mlx-lm's save/load_prompt_cache rebuild caches with from_state) ------------
    @property
    def state(self):
        window = self.neighbor_keys[..., : self.neighbor_length, :]
        return (self._prefix(self.keys), self._prefix(self.values), window, self.offset,
                self.neighbor_start, self.config.group_size, self.config.window)

    @state.setter
    def state(self, value):
        keys, values, window, offset, start, group_size, window_size = value[:7]
        # safetensors round trips turn quantized triples into lists
        self.keys = tuple(keys) if isinstance(keys, list) else keys
        self.values = tuple(values) if isinstance(values, list) else values
        self.neighbor_keys, self.neighbor_length = window, window.shape[2]
        self.offset, self.neighbor_start = offset, start
        self.config = SelfExtendConfig(group_size=group_size, window=window_size)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedSelfExtendKVCache":
        quantized = QuantizedSelfExtendKVCache(self.config, group_size=group_size, bits=bits)
        quantized.offset = self.offset
        if self.keys is not None:
            quantized.keys = quantized._store(self._prefix(self.keys))
            quantized.values = quantized._store(self._prefix(self.values))
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


def make_cache(model, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> list:
    """One cache per layer: SelfExtend caches for SelfExtend layers, the model's own otherwise."""
    from .patch import layer_attention, selfextend_config_of  # patch imports this module

    own = type(model).make_cache(model) if hasattr(type(model), "make_cache") else [KVCache() for _ in model.layers]
    caches = []
    for layer, base in zip(model.layers, own):
        config = selfextend_config_of(layer_attention(layer))
        if config is None:
            # mlx-lm can quantize only its plain KVCache (not the rotating one of sliding layers)
            quantize = kv_bits is not None and type(base) is KVCache
            caches.append(base.to_quantized(kv_group_size, kv_bits) if quantize else base)
        elif kv_bits is None:
            caches.append(SelfExtendKVCache(config))
        else:
            caches.append(QuantizedSelfExtendKVCache(config, group_size=kv_group_size, bits=kv_bits))
    return caches


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


# -- prompt-cache files -----------------------------------------------------------------

# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
for _cls in (SelfExtendKVCache, QuantizedSelfExtendKVCache):
    setattr(mlx_cache, _cls.__name__, _cls)


def save_cache(path, cache: list, *, model_id: str, config: SelfExtendConfig, metadata: Optional[dict] = None):
    """Write a prompt cache atomically (a temp file in the same folder, then a rename), with
    the model id, G, W and format version it was made with."""
    path = Path(path)
    info = {str(k): str(v) for k, v in (metadata or {}).items()}
    info.update(
        format_version=CACHE_FORMAT_VERSION,
        model_id=model_id,
        group_size=str(config.group_size),
        window=str(config.window),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.eval([c.state for c in cache])
        save_prompt_cache(tmp, cache, info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path, *, model_id: str, config: SelfExtendConfig):
    """Read a prompt cache saved by save_cache; refuse a corrupt one, or one made for another
    model, G, W or format version, with one line saying which."""
    path = Path(path)
    try:
        cache, info = load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        raise CacheMismatchError(f"{path} is not a readable prompt cache ({type(e).__name__}: {e})") from None
    version = info.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise CacheMismatchError(f"{path} has cache format {version}, this version reads {CACHE_FORMAT_VERSION}")
    made_for = (info.get("model_id"), info.get("group_size"), info.get("window"))
    wanted = (model_id, str(config.group_size), str(config.window))
    if made_for != wanted:
        raise CacheMismatchError(
            f"{path} was made for model {made_for[0]} with G={made_for[1]}, W={made_for[2]}; "
            f"this run uses model {model_id} with G={config.group_size}, W={config.window}"
        )
    for entry in cache:
        if is_selfextend_cache(entry):
            entry.config = config  # same G and W; keeps the caller's chunk size
    user = {k: v for k, v in info.items() if k not in ("format_version", "model_id", "group_size", "window")}
    return cache, user
