"""A store of document prompt caches: prefill a document once, answer from disk afterwards.

A file holds the SelfExtend KV cache of one prompt prefix (system + documents). Its name is a
hash of everything that changes those keys and values: the store's format version, the model,
G, W, KV quantization and the exact prefix token ids. Writes are atomic (core `save_cache`).
"""

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.cache import load_cache, save_cache
from ..core.config import SelfExtendConfig
from ..errors import CacheMismatchError

STORE_FORMAT_VERSION = "1"
ENV_CACHE_DIR = "SELFEXTEND_CACHE_DIR"
SUFFIX = ".safetensors"


def default_cache_dir() -> Path:
    """$SELFEXTEND_CACHE_DIR, else the platform's user cache folder."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("selfextend-mlx")) / "documents"


def cache_key(model_id: str, settings, kv_bits: Optional[int], tokens: Sequence[int]) -> str:
    """`settings`: anything with group_size and window (planning's Settings); G=1 is plain
    attention, whatever W."""
    window = 0 if settings.group_size == 1 else settings.window
    digest = hashlib.sha256()
    header = (
        f"selfextend-doccache/{STORE_FORMAT_VERSION}\0{model_id}\0G={settings.group_size}\0W={window}\0kv={kv_bits}\0"
    )
    digest.update(header.encode())
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes on disk
    modified: float  # seconds since the epoch
    metadata: dict  # what save() recorded: documents, tokens, model, G, W ...


class DocumentCache:
    def __init__(self, directory: Optional[Path] = None, notice: Optional[Callable[[str], None]] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.notice = notice or (lambda message: None)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str, *, model_id: str, config: Optional[SelfExtendConfig], tokens: int):
        """The saved cache for `key`, or None. A corrupt or mismatched file is reported through
        `notice` in one line and removed, so the caller rebuilds it."""
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            cache, metadata = load_cache(path, model_id=model_id, config=config)
            if metadata.get("key") != key:
                raise CacheMismatchError(f"{path} holds another document (its key does not match)")
            offsets = {entry.offset for entry in cache}
            if offsets != {tokens}:
                raise CacheMismatchError(f"{path} holds {sorted(offsets)} tokens, the document has {tokens}")
        except CacheMismatchError as error:
            self.notice(f"document cache unusable, rebuilding it: {error}")
            path.unlink(missing_ok=True)
            return None
        return cache

    def save(self, key: str, cache: list, *, model_id: str, config: Optional[SelfExtendConfig], metadata: dict) -> Path:
        path = self.path_for(key)
        info = {"key": key, "store_format": STORE_FORMAT_VERSION, "saved": str(time.time()), **metadata}
        save_cache(path, cache, model_id=model_id, config=config, metadata={k: str(v) for k, v in info.items()})
        return path

    def entries(self) -> list[CacheEntry]:
        """Saved caches, newest first (temporary files of unfinished writes are not listed)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            if path.name.startswith("."):
                continue
            stat = path.stat()
            found.append(CacheEntry(path, stat.st_size, stat.st_mtime, read_metadata(path)))
        return sorted(found, key=lambda entry: entry.modified, reverse=True)

    def clear(self) -> tuple[int, int]:
        """Remove every cache file, temporary leftovers included; returns (files, bytes)."""
        if not self.directory.is_dir():
            return 0, 0
        count = size = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            size += path.stat().st_size
            path.unlink(missing_ok=True)
            count += 1
        return count, size


def read_metadata(path: Path) -> dict:
    """The metadata save() wrote, read from the safetensors header alone (no arrays loaded);
    {} for a file that is not a readable cache."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    raw = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    # mlx-lm flattens [metadata, classes, scalars]: the user metadata keys start with "0."
    return {key[2:]: value for key, value in raw.items() if key.startswith("0.")}
