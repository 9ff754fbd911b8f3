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

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from ..errors import CacheMismatchError, SelfExtendError
from .attention import CachedKV, rotate_further, seq_length, seq_slice
from .config import SelfExtendConfig

CACHE_FORMAT_VERSION = "2"
# Version 1 held grouped keys for every position: a superset of what version 2 needs.
READABLE_FORMAT_VERSIONS = ("1", "2")


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


# -- prompt-cache files -----------------------------------------------------------------
#
# The layout is mlx-lm's save_prompt_cache (so mlx-lm reads these files, and this reads
# mlx-lm's): safetensors holding the flattened cache states, with the metadata
# [user metadata, class names, scalar markers] flattened into the header. On top of it:
#  - the states' floating arrays can be stored in float16 (half the disk, see save_cache);
#  - the user metadata records a SHA-256 of every stored array, which load_cache checks;
#  - the header is validated before MLX reads any of it, and class names are looked up
#    among mlx-lm's cache classes only.

# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
for _cls in (SelfExtendKVCache, QuantizedSelfExtendKVCache):
    setattr(mlx_cache, _cls.__name__, _cls)

_RESERVED = ("format_version", "model_id", "group_size", "window", "payload_sha256", "restore_dtypes")
_FLOAT16_MAX = 65504.0
_SAFETENSORS_DTYPES = {  # safetensors dtype -> bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000


class CacheWriteError(SelfExtendError, OSError):
    """A prompt cache could not be written (a full disk, a write error); nothing was left behind."""


def _made_with(config: Optional[SelfExtendConfig]) -> tuple:
    """(G, W) as recorded in a cache file; plain attention (config None) is G=1, W=0."""
    return ("1", "0") if config is None else (str(config.group_size), str(config.window))


def _flatten_states(cache: list) -> tuple:
    """(arrays by flat name, scalar markers), exactly as mlx-lm's save_prompt_cache lays them out."""
    scalars = [""]  # mlx-lm's marker list: never empty, or tree_flatten would drop it
    arrays = {}
    for name, value in tree_flatten([c.state for c in cache]):
        if isinstance(value, mx.array):
            arrays[name] = value
        elif isinstance(value, (bool, int, float)):
            scalars.append((name, "scalar"))
            arrays[name] = mx.array(value)
        elif isinstance(value, str):
            scalars.append((name, "string"))
            arrays[name] = mx.array([ord(ch) for ch in value])
        elif value is None:
            scalars.append((name, "none"))
            arrays[name] = mx.array([])
        else:
            raise ValueError(f"cache state is not serializable: {type(value).__name__}")
    return arrays, scalars


def _compact(arrays: dict, storage_dtype) -> tuple:
    """Floating arrays wider than `storage_dtype` converted to it where every value fits
    (an array with a value beyond float16's range keeps its dtype); returns the arrays and
    {name: original dtype} for load_cache to cast back."""
    if storage_dtype is None:
        return arrays, {}
    out, restore = {}, {}
    for name, array in arrays.items():
        if mx.issubdtype(array.dtype, mx.floating) and array.dtype.size > storage_dtype.size and array.size:
            fits = storage_dtype != mx.float16 or mx.all(mx.abs(array) <= _FLOAT16_MAX).item()
            if fits:
                restore[name] = str(array.dtype).rsplit(".", 1)[-1]
                array = array.astype(storage_dtype)
        out[name] = array
    return out, restore


def payload_digest(arrays: dict) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = mx.contiguous(arrays[name])
        mx.eval(array)
        digest.update(f"{name}\0{array.dtype}\0{array.shape}\0".encode())
        if array.size:
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def save_cache(
    path,
    cache: list,
    *,
    model_id: str,
    config: Optional[SelfExtendConfig],
    metadata: Optional[dict] = None,
    storage_dtype=None,
):
    """Write a prompt cache atomically (a temp file in the same folder, then a rename), with
    the model id, G, W (config None: plain attention), format version and a checksum of the
    arrays. `storage_dtype=mx.float16` halves the file of an fp32 cache (load_cache casts the
    arrays back). Whatever stops the write (an error, Ctrl-C, a signal handler's SystemExit)
    removes the temp file; a failed write raises CacheWriteError."""
    path = Path(path)
    info = {str(k): str(v) for k, v in (metadata or {}).items()}
    group_size, window = _made_with(config)
    info.update(format_version=CACHE_FORMAT_VERSION, model_id=model_id, group_size=group_size, window=window)
    mx.eval([c.state for c in cache])
    arrays, scalars = _flatten_states(cache)
    arrays, restore = _compact(arrays, storage_dtype)
    info.update(payload_sha256=payload_digest(arrays), restore_dtypes=json.dumps(restore))
    header = dict(tree_flatten([info, [type(c).__name__ for c in cache], scalars]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        _write_safetensors(tmp, arrays, header)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _write_safetensors(file_name: str, arrays: dict, header: dict) -> None:
    try:
        mx.save_safetensors(file_name, arrays, header)
    except RuntimeError as error:  # MLX reports a failed write ("[write] Unable to write ...") this way
        code = errno.ENOSPC if _disk_full(file_name) else errno.EIO
        raise CacheWriteError(code, f"could not write the cache ({error})", file_name) from None


def _disk_full(file_name: str) -> bool:
    try:
        return shutil.disk_usage(Path(file_name).parent).free < (1 << 20)
    except OSError:
        return False


def read_header(path) -> dict:
    """The safetensors header of `path`, checked against the file before MLX touches it:
    a sane header length, known dtypes, and every tensor's bytes inside the file. Raises
    CacheMismatchError for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            raw = file.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("its header length runs past the file")
            header = json.loads(file.read(length))
    except FileNotFoundError:
        raise CacheMismatchError(f"{path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise CacheMismatchError(f"{path} is not a readable prompt cache ({error})") from None
    data_size = size - 8 - length
    if not isinstance(header, dict):
        raise CacheMismatchError(f"{path} is not a readable prompt cache (its header is not a mapping)")
    for name, entry in header.items():
        if name != "__metadata__" and not _tensor_fits(entry, data_size):
            raise CacheMismatchError(f"{path} is not a readable prompt cache (tensor {name[:60]} is malformed)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CacheMismatchError(f"{path} is not a readable prompt cache (its metadata is malformed)")
    return header


def _tensor_fits(entry, data_size: int) -> bool:
    if not isinstance(entry, dict) or entry.get("dtype") not in _SAFETENSORS_DTYPES:
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return False
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return False
    start, end = offsets
    return 0 <= start <= end <= data_size and end - start == math.prod(shape) * _SAFETENSORS_DTYPES[entry["dtype"]]


def read_metadata(path) -> dict:
    """The user metadata save_cache recorded (and its own fields), from the header alone;
    CacheMismatchError for a file that is not a readable cache."""
    raw = read_header(path).get("__metadata__", {})
    # the flattened [metadata, classes, scalars]: the user metadata keys start with "0."
    return {key[2:]: value for key, value in raw.items() if key.startswith("0.")}


def load_cache(path, *, model_id: str, config: Optional[SelfExtendConfig], require_checksum: bool = False):
    """Read a prompt cache saved by save_cache (or mlx-lm's save_prompt_cache); refuse with
    one line a corrupt one (bad header, checksum mismatch), or one made for another model,
    G, W or format version. Files from before checksums load unverified unless
    `require_checksum`. Returns (cache, user metadata)."""
    path = Path(path)
    info = read_metadata(path)
    version = info.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CacheMismatchError(
            f"{path} has cache format {version}, this version reads {', '.join(READABLE_FORMAT_VERSIONS)}"
        )
    made_for = (info.get("model_id"), info.get("group_size"), info.get("window"))
    wanted = (model_id, *_made_with(config))
    if made_for != wanted:
        raise CacheMismatchError(
            f"{path} was made for model {made_for[0]} with G={made_for[1]}, W={made_for[2]}; "
            f"this run uses model {model_id} with G={wanted[1]}, W={wanted[2]}"
        )
    try:
        arrays, flat = mx.load(str(path), return_metadata=True)
    except Exception as error:
        raise CacheMismatchError(f"{path} is not a readable prompt cache ({type(error).__name__}: {error})") from None
    expected = info.get("payload_sha256")
    if expected is None and require_checksum:
        raise CacheMismatchError(f"{path} has no checksum (written by an older version)")
    if expected is not None and payload_digest(arrays) != expected:
        raise CacheMismatchError(f"{path} is corrupt: its data does not match its checksum")
    try:
        cache = _rebuild(arrays, flat, json.loads(info.get("restore_dtypes") or "{}"))
    except Exception as error:  # a header that passed the checks but does not make caches
        raise CacheMismatchError(f"{path} is not a readable prompt cache ({type(error).__name__}: {error})") from None
    for entry in cache:
        if is_selfextend_cache(entry):
            entry.config = config  # same G and W; keeps the caller's chunk size
    return cache, {k: v for k, v in info.items() if k not in _RESERVED}


def _rebuild(arrays: dict, flat: dict, restore: dict) -> list:
    """Cache objects from the stored arrays, as mlx-lm's load_prompt_cache does, but with the
    class names looked up among mlx-lm's cache classes only."""
    for name, dtype in restore.items():
        if dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"unknown dtype {dtype!r}")
        arrays[name] = arrays[name].astype(getattr(mx, dtype))
    _, classes, scalars = tree_unflatten(list(flat.items()))
    for name, kind in scalars[1:]:
        arrays[name] = _scalar(arrays[name], kind)
    states = tree_unflatten(list(arrays.items()))
    return [_cache_class(name).from_state(state) for name, state in zip(classes, states, strict=True)]


def _scalar(array, kind: str):
    if kind == "scalar":
        return array.item()
    if kind == "string":
        return "".join(chr(i) for i in array.tolist())
    if kind == "none":
        return None
    raise ValueError(f"unknown scalar kind {kind!r}")


def _cache_class(name: str):
    cls = getattr(mlx_cache, name, None)
    if not (isinstance(cls, type) and issubclass(cls, _BaseCache)):
        raise ValueError(f"unknown cache class {name!r}")
    return cls
