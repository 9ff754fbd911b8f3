"""A store of document prompt caches: prefill a document once, answer from disk afterwards.

A file holds the KV cache of one prompt prefix (system + documents). Its name is a hash of
everything that changes those keys and values: the store's format version, the model and a
fingerprint of the weights loaded for it (and their dtype), G, W, KV quantization and the
exact prefix token ids. Entries are written atomically, in float16 where the values fit
(half the size of fp32; the answers stay the same, see docs/reliability.md), with a SHA-256
of their arrays that is checked on every load: a corrupt, truncated or mismatched entry is
reported in one line and rebuilt. A write that fails (a full disk) is a one-line notice,
never a failed run, and leaves no partial file.

The folder is marked as a store by a CACHEDIR.TAG file (the cache-directory convention, which
also keeps backup tools out); listing, `rm` and `clear` touch only files this store wrote,
and refuse a folder that is not one. A folder is made a store only when it is new or empty:
a folder of other files (the user's documents, a model) gets no tag and no entry, and one
notice says so (a tag there would hide the user's files from backups).

The store holds at most `max_bytes` (SELFEXTEND_CACHE_MAX, default 10 GB): after each write
the least recently used entries (a load counts as a use) go until the rest fits, the newest
always kept. Every writer (ask, chat, summarize, the server) goes through save(), so this is
the one size rule of the document cache. Each write is reported through `report` in one line:
its size, what was evicted, and the store's total against its limit.
"""

import errno
import hashlib
import json
import math
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..core.cache_file import load_cache, save_cache
from ..core.cache_file import read_metadata as read_cache_metadata
from ..core.config import SelfExtendConfig
from ..core.files import atomic_write
from ..errors import CacheMismatchError, SelfExtendError

STORE_FORMAT_VERSION = "2"  # 2: weights fingerprint in the key, float16 arrays, checksums
ENV_CACHE_DIR = "SELFEXTEND_CACHE_DIR"
ENV_CACHE_MAX = "SELFEXTEND_CACHE_MAX"
DEFAULT_MAX_BYTES = 10 * 10**9
SUFFIX = ".safetensors"
MARKER = "CACHEDIR.TAG"
MARKER_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# selfextend-mlx document cache: prompt caches of documents already read.\n"
    "# `selfextend cache list` shows them, `selfextend cache clear` removes them.\n"
)
MARKER_LINE = "selfextend-mlx document cache"
STORAGE_DTYPE = mx.float16
STALE_TEMP_SECONDS = 3600  # a temp file this old belongs to no write still running
MIN_ID_PREFIX = 4
_ENTRY_NAME = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_TEMP_NAME = re.compile(r"^\.[0-9a-f]{64}\.safetensors\..+\.safetensors$")


class DocumentCacheError(SelfExtendError):
    """A document-cache command that cannot be done: a folder that is not a cache, an unknown id."""


def default_cache_dir() -> Path:
    """$SELFEXTEND_CACHE_DIR, else the platform's user cache folder."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("selfextend-mlx")) / "documents"


def cache_limit(value=None) -> int:
    """The store's size limit in bytes: `value` (bytes or a size such as '2GB'), else
    $SELFEXTEND_CACHE_MAX, else DEFAULT_MAX_BYTES."""
    from ..planning import parse_size

    if value is None:
        value = os.environ.get(ENV_CACHE_MAX) or DEFAULT_MAX_BYTES
    if isinstance(value, int):
        return value
    return parse_size(value, f"the document cache size (${ENV_CACHE_MAX})")


def weights_fingerprint(info) -> str:
    """What identifies the weights a loaded model computes with (`info`: its ModelInfo): the
    files' fingerprint (or Hub commit) and the dtype they were loaded in."""
    return f"{info.revision}:{info.dtype}"


def cache_key(model_id: str, settings, kv_bits: Optional[int], tokens: Sequence[int], weights: str = "") -> str:
    """`settings`: anything with group_size and window (planning's Settings); G=1 is plain
    attention, whatever W. `weights`: weights_fingerprint() of the loaded model."""
    window = 0 if settings.group_size == 1 else settings.window
    digest = hashlib.sha256()
    header = (
        f"selfextend-doccache/{STORE_FORMAT_VERSION}\0{model_id}\0{weights}\0"
        f"G={settings.group_size}\0W={window}\0kv={kv_bits}\0"
    )
    digest.update(header.encode())
    digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int  # bytes on disk
    modified: float  # seconds since the epoch
    metadata: dict  # what save() recorded, typed: documents, tokens, kv_bits, model_id, G, W ...

    @property
    def id(self) -> str:
        return self.path.name[: -len(SUFFIX)]

    def record(self) -> dict:
        """The entry as `cache list --json` shows it."""
        fields = {k: v for k, v in self.metadata.items() if k != "key"}
        return {"id": self.id, "path": str(self.path), "bytes": self.size, "modified": self.modified, **fields}


@dataclass(frozen=True)
class Eviction:
    """What one write left in the store: the entry's size, what went to make room, the total."""

    written: int
    removed: int  # entries evicted
    removed_bytes: int
    total: int
    limit: int

    def describe(self) -> str:
        from ..planning import format_bytes

        line = f"cache: wrote {format_bytes(self.written)} for this document"
        if self.removed:
            plural = "entries" if self.removed != 1 else "entry"
            line += f", removed {self.removed} least recently used {plural} ({format_bytes(self.removed_bytes)})"
        line += f" (cache now {format_bytes(self.total)} of {format_bytes(self.limit)}"
        if self.total > self.limit:
            line += ": the newest entry is kept even past the limit"
        return line + ")"


class DocumentCache:
    def __init__(
        self,
        directory: Optional[Path] = None,
        notice: Optional[Callable[[str], None]] = None,
        max_bytes=None,
        report: Optional[Callable[[str], None]] = None,
    ):
        """`notice`: warnings (an unusable entry, a failed write); `report`: the line each
        write is described in (Eviction.describe)."""
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.notice = notice or (lambda message: None)
        self.report = report or (lambda message: None)
        self.max_bytes = cache_limit(max_bytes)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    # -- reading and writing entries ------------------------------------------------------------
    def load(self, key: str, *, model_id: str, config: Optional[SelfExtendConfig], tokens: int):
        """The saved cache for `key`, or None. A corrupt or mismatched entry is reported through
        `notice` in one line and removed, so the caller rebuilds it."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            cache, metadata = load_cache(path, model_id=model_id, config=config, require_checksum=True)
            if metadata.get("key") != key:
                raise CacheMismatchError(f"{path} holds another document (its key does not match)")
            offsets = {entry.offset for entry in cache}
            if offsets != {tokens}:
                raise CacheMismatchError(f"{path} holds {sorted(offsets)} tokens, the document has {tokens}")
        except CacheMismatchError as error:
            self.notice(f"document cache unusable, rebuilding it: {error}")
            _remove(path)
            return None
        except OSError as error:
            self.notice(f"document cache not read ({error.strerror or error}); reading the document instead")
            return None
        _touch(path)  # a use: the least recently used entries are the first to go
        return cache

    def save(
        self, key: str, cache: list, *, model_id: str, config: Optional[SelfExtendConfig], metadata: dict
    ) -> Optional[Path]:
        """Save `cache` under `key`; `metadata` (JSON values: documents, tokens, kv_bits) is
        kept for `cache list`. A write that fails is a notice and returns None."""
        path = self.path_for(key)
        info = {"key": key, "store_format": STORE_FORMAT_VERSION, "saved": repr(time.time())}
        info["entry"] = json.dumps(metadata, default=str, ensure_ascii=False)
        try:
            self.refuse_if_foreign()
            self._mark()
            self._sweep_stale_temp_files()
            save_cache(path, cache, model_id=model_id, config=config, metadata=info, storage_dtype=STORAGE_DTYPE)
        except DocumentCacheError as error:
            self.notice(f"document cache not used: {error}")
            return None
        except OSError as error:
            reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
            self.notice(f"could not save the document cache in {self.directory}: {reason}; the answer does not need it")
            return None
        self.report(self._evict(keep=path).describe())
        return path

    def _evict(self, keep: Path) -> Eviction:
        """The size rule: beyond max_bytes, the least recently used entries go, never `keep`."""
        entries = sorted(self._entries(), key=lambda entry: entry.modified)
        total = sum(entry.size for entry in entries)
        written = next((entry.size for entry in entries if entry.path == keep), 0)
        removed = removed_bytes = 0
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.path != keep:
                _remove(entry.path)
                total -= entry.size
                removed, removed_bytes = removed + 1, removed_bytes + entry.size
        return Eviction(written, removed, removed_bytes, total, self.max_bytes)

    def _mark(self) -> None:
        """Make the folder (if needed) and mark it as a store, atomically."""
        marker = self.directory / MARKER
        if marker.is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(marker) as tmp:
            Path(tmp).write_text(MARKER_TEXT)

    def _sweep_stale_temp_files(self) -> None:
        """Remove temp files that writes killed beyond any cleanup (SIGKILL, a power cut) left."""
        now = time.time()
        for path in self._files(_TEMP_NAME):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    _remove(path)
            except OSError:
                continue

    # -- the store's contents ---------------------------------------------------------------------
    def is_store(self) -> bool:
        """Whether the folder is a document cache: it carries the marker, or (a store from
        before the marker) holds at least one entry this store wrote."""
        marker = self.directory / MARKER
        try:
            if marker.is_file() and MARKER_LINE in marker.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            return False
        return any(True for _ in self._entries())

    def entries(self) -> list[CacheEntry]:
        """The saved entries, newest first (unfinished writes and foreign files left out)."""
        return sorted(self._entries(), key=lambda entry: entry.modified, reverse=True)

    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.entries())

    def remove(self, prefix: str) -> CacheEntry:
        """Remove the one entry whose id starts with `prefix` (as `cache list` shows it)."""
        prefix = prefix.strip().lower()
        if len(prefix) < MIN_ID_PREFIX or not re.fullmatch(r"[0-9a-f]+", prefix):
            raise DocumentCacheError(
                f"{prefix!r} is not an entry id: give at least {MIN_ID_PREFIX} of the hex digits "
                "`selfextend cache list` shows"
            )
        matches = [entry for entry in self.entries() if entry.id.startswith(prefix)]
        if not matches:
            raise DocumentCacheError(f"no cached document with id {prefix} in {self.directory}")
        if len(matches) > 1:
            raise DocumentCacheError(f"id {prefix} matches {len(matches)} cached documents; give more digits")
        _remove(matches[0].path)
        return matches[0]

    def refuse_if_foreign(self) -> None:
        """DocumentCacheError for a folder with files in it that is not a store."""
        try:
            empty = not self.directory.is_dir() or not any(self.directory.iterdir())
        except OSError:
            empty = False
        if not empty and not self.is_store():
            raise DocumentCacheError(
                f"{self.directory} is not a selfextend document cache (it has no {MARKER} from selfextend-mlx "
                "and no entries): nothing removed or written; give an empty or new folder"
            )

    def clear(self) -> tuple[int, int]:
        """Remove every entry this store wrote, temp leftovers and corrupt entries included;
        returns (files, bytes). A folder that is not a store is refused, untouched."""
        if not self.directory.is_dir():
            return 0, 0
        self.refuse_if_foreign()
        count = size = 0
        for path in [*self._files(_ENTRY_NAME), *self._files(_TEMP_NAME)]:
            try:
                size += path.stat().st_size
            except OSError:
                continue
            _remove(path)
            count += 1
        return count, size

    def _files(self, pattern) -> list[Path]:
        try:
            return [path for path in self.directory.iterdir() if pattern.match(path.name) and path.is_file()]
        except OSError:
            return []

    def _entries(self):
        for path in self._files(_ENTRY_NAME):
            metadata = read_metadata(path)
            if metadata.get("key") != path.name[: -len(SUFFIX)]:
                continue  # not written by this store, or unreadable
            try:
                stat = path.stat()
            except OSError:
                continue
            yield CacheEntry(path, stat.st_size, stat.st_mtime, metadata)


def read_metadata(path: Path) -> dict:
    """What save() recorded for an entry, with JSON types (numbers, null), read from the file's
    header alone; {} for a file that is not a readable cache."""
    try:
        raw = read_cache_metadata(path)
    except CacheMismatchError:
        return {}
    hidden = ("entry", "key", "store_format", "payload_sha256", "restore_dtypes")
    typed = {key: _typed(value) for key, value in raw.items() if key not in hidden}
    try:
        entry = json.loads(raw["entry"]) if "entry" in raw else {}
    except ValueError:
        entry = {}
    # store format 1 kept documents, tokens and kv_bits as strings beside the rest
    typed.update(entry if isinstance(entry, dict) else {})
    typed.update(key=raw.get("key"), store_format=raw.get("store_format", "1"))
    for name in ("documents", "model_id"):
        if name in typed and not isinstance(typed[name], str):
            typed[name] = str(typed[name])
    return typed


def _typed(value: str):
    """A metadata string as the number, null or text it stands for."""
    if value == "None":
        return None
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if math.isfinite(number):
            return number
    return value


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
