"""Prompt-cache files: a prompt's KV caches saved to disk and read back.

The layout is mlx-lm's save_prompt_cache (so mlx-lm reads these files, and this reads
mlx-lm's): safetensors holding the flattened cache states, with the metadata
[user metadata, class names, scalar markers] flattened into the header. On top of it:
  - the states' floating arrays can be stored in float16 (half the disk, see save_cache);
  - the user metadata records a SHA-256 of every stored array, which load_cache checks;
  - the header is validated before MLX reads any of it, and class names are looked up
    among mlx-lm's cache classes only.
"""

import errno
import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import _BaseCache

from ..errors import CacheMismatchError, SelfExtendError
from .cache import QuantizedSelfExtendKVCache, SelfExtendKVCache, is_selfextend_cache
from .config import SelfExtendConfig
from .files import atomic_write

CACHE_FORMAT_VERSION = "2"
# Version 1 held grouped keys for every position: a superset of what version 2 needs.
READABLE_FORMAT_VERSIONS = ("1", "2")

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
    with atomic_write(path, suffix=".safetensors") as tmp:
        _write_safetensors(tmp, arrays, header)


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
