"""The model registry (models.yaml): what is known about each model.

Entries name a model once (repo id, trained context, the G and W that work for it) so users
can say `--model Llama-3-8B-Instruct` and get settings that are known to work. A user file
named by $SELFEXTEND_MODELS adds entries or overrides built-in ones by name. What the
settings are for a given input is planning's rule (selfextend_mlx.planning), fed each
entry's `limits`.
"""

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml

from ..errors import SelfExtendError
from ..planning import ModelLimits

USER_REGISTRY_ENV = "SELFEXTEND_MODELS"

REQUIRED_FIELDS = {
    "name": str,
    "repo": str,
    "family": str,
    "trained_context": int,
    "group_size": int,
    "window": int,
    "max_group_size": int,
    "layers": int,
    "kv_heads": int,
    "head_dim": int,
    "notes": str,
}
OPTIONAL_FIELDS = {
    "path": str,  # a local model folder or GGUF file (relative to the yaml file)
    "package": str,  # a file inside an installed Python package: "pkg/relative/path"
    "effective_context": int,  # where the model really stops working, if below trained_context
}


class RegistryError(SelfExtendError, ValueError):
    """models.yaml (or the user's registry file) is malformed."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    repo: str
    family: str
    trained_context: int
    group_size: int
    window: int
    max_group_size: int
    layers: int
    kv_heads: int
    head_dim: int
    notes: str
    path: Optional[str] = None
    package: Optional[str] = None
    effective_context: Optional[int] = None
    source_file: Optional[str] = field(default=None, compare=False)

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(
            self.trained_context, self.effective_context, self.group_size, self.window, self.max_group_size
        )


def builtin_registry_path() -> Path:
    # Installed: a copy in the package (package data); in a checkout: the repository root.
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "models.yaml", package.parent / "models.yaml"):
        if candidate.is_file():
            return candidate
    raise RegistryError(f"models.yaml is missing from {package}; reinstall selfextend-mlx")


def validate_entry(raw, where: str) -> ModelEntry:
    """One registry entry, checked field by field (the schema)."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: each model must be a mapping, got {type(raw).__name__}")
    name = raw.get("name", "?")
    unknown = set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if unknown:
        raise RegistryError(f"{where}: model {name!r} has unknown field(s) {', '.join(sorted(unknown))}")
    for key, kind in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
        if key not in raw:
            if key in REQUIRED_FIELDS:
                raise RegistryError(f"{where}: model {name!r} lacks the field {key!r}")
            continue
        value = raw[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RegistryError(f"{where}: model {name!r} field {key!r} must be {kind.__name__}, got {value!r}")
        if kind is int and value < 1:
            raise RegistryError(f"{where}: model {name!r} field {key!r} must be positive, got {value}")
    entry = ModelEntry(**raw, source_file=where)
    if "/" not in entry.repo:
        raise RegistryError(f"{where}: model {name!r} repo must be 'owner/name', got {entry.repo!r}")
    if entry.window >= entry.limits.context:
        raise RegistryError(
            f"{where}: model {name!r} window {entry.window} must be below its context {entry.limits.context}"
        )
    if entry.effective_context and entry.effective_context > entry.trained_context:
        raise RegistryError(f"{where}: model {name!r} effective_context exceeds trained_context")
    if not 1 <= entry.group_size <= entry.max_group_size:
        raise RegistryError(f"{where}: model {name!r} group_size must be within 1..max_group_size")
    return entry


def parse_registry(text: str, where: str) -> dict:
    """name (lower case) -> ModelEntry, plus the default name under key None."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RegistryError(f"{where} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistryError(f"{where} must be a mapping with a 'models' list")
    entries = {}
    for raw in data["models"]:
        entry = validate_entry(raw, where)
        key = entry.name.lower()
        if key in entries:
            raise RegistryError(f"{where}: model {entry.name!r} is listed twice")
        entries[key] = entry
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise RegistryError(f"{where}: default must be a model name, got {default!r}")
    if default is not None and default.lower() not in entries:
        raise RegistryError(f"{where}: default {default!r} is not one of its models")
    entries[None] = default
    return entries


@lru_cache(maxsize=8)
def _load(builtin: str, user: Optional[str]) -> dict:
    entries = parse_registry(Path(builtin).read_text(encoding="utf-8"), builtin)
    if user:
        path = Path(user).expanduser()
        if not path.is_file():
            raise RegistryError(f"${USER_REGISTRY_ENV} names {path}, which is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise RegistryError(
                f"${USER_REGISTRY_ENV} names {path}, which cannot be read as UTF-8 text ({error})"
            ) from None
        extra = parse_registry(text, str(path))
        default = extra.pop(None) or entries[None]
        entries.update(extra)
        entries[None] = default
    return entries


def registry() -> dict:
    return _load(str(builtin_registry_path()), os.environ.get(USER_REGISTRY_ENV) or None)


def entries() -> list:
    return [entry for key, entry in registry().items() if key is not None]


def default_model_name() -> str:
    return registry()[None]


def registry_entry(name_or_repo) -> Optional[ModelEntry]:
    """The entry for a registry name or a repo id (case-insensitive), or None."""
    if not name_or_repo:
        return None
    key = str(name_or_repo).strip().lower()
    table = registry()
    if key in table:
        return table[key]
    for entry in entries():
        if entry.repo.lower() == key:
            return entry
    return None
