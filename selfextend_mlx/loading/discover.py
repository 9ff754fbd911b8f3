"""Models already on this machine, where other tools put them. Nothing is downloaded here.

Looked for, in this order:
- the Hugging Face cache (hub.hub_cache_dir: $HF_HUB_CACHE, ..., ~/.cache/huggingface/hub): each
  repo's newest snapshot holding a config.json or a .gguf; named by its repo id (`-m owner/name`);
- LM Studio's models folders (~/.lmstudio/models and the older ~/.cache/lm-studio/models, or
  $LMSTUDIO_MODELS): publisher/repo/file.gguf; named `lmstudio:publisher/repo/file` (any unique
  part of that works with `-m lmstudio:PART`);
- Ollama's store ($OLLAMA_MODELS, else ~/.ollama/models): manifests name a model blob by its
  digest; named `ollama:NAME:TAG` (`ollama:NAME` means the tag latest);
- the project's own folder: a `models` folder in the current directory, .gguf files and
  model folders in it, named by their path.

`local_models()` lists them (with what a header or config says, read lazily by `describe_local`);
`resolve_prefixed` turns an `ollama:` or `lmstudio:` reference into its file.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelNotFoundError
from .hub import hub_cache_dir

OLLAMA_PREFIX, LMSTUDIO_PREFIX = "ollama:", "lmstudio:"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class LocalModel:
    name: str  # what `-m` takes
    where: str  # "hf-cache", "lmstudio", "ollama", "project"
    path: Path
    size: int  # bytes of weights


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".gguf"))


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# ------------------------------------------------------------------ each store


def hf_cache_models() -> list:
    root = Path(hub_cache_dir())
    found = []
    for repo in sorted(root.glob("models--*--*")):
        snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        name = repo.name[len("models--") :].replace("--", "/", 1)
        for snapshot in snapshots[:1]:
            ggufs = sorted(snapshot.glob("*.gguf"))
            if _is_model_folder(snapshot):
                found.append(LocalModel(name, "hf-cache", snapshot, _size(snapshot)))
            elif ggufs:
                found.extend(LocalModel(str(g), "hf-cache", g.resolve(), g.stat().st_size) for g in ggufs)
    return found


def lmstudio_roots() -> list:
    if os.environ.get("LMSTUDIO_MODELS"):
        return [Path(os.environ["LMSTUDIO_MODELS"])]
    return [_home() / ".lmstudio" / "models", _home() / ".cache" / "lm-studio" / "models"]


def lmstudio_models() -> list:
    found = []
    for root in lmstudio_roots():
        for file in sorted(root.glob("*/*/*.gguf")):
            if "mmproj" in file.name.lower():  # vision projectors, not language models
                continue
            name = f"{LMSTUDIO_PREFIX}{file.parent.parent.name}/{file.parent.name}/{file.stem}"
            found.append(LocalModel(name, "lmstudio", file, file.stat().st_size))
    return found


def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or _home() / ".ollama" / "models")


def _ollama_blob(root: Path, manifest: Path) -> Optional[Path]:
    """The model layer's blob of one manifest, or None when the manifest is not one."""
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA:
            digest = str(layer.get("digest", ""))
            blob = root / "blobs" / digest.replace(":", "-")
            if digest.startswith("sha256:") and blob.is_file():
                return blob
    return None


def ollama_models() -> list:
    root = ollama_root()
    found = []
    for manifest in sorted((root / "manifests").glob("*/*/*/*")):
        blob = _ollama_blob(root, manifest)
        if blob is None:
            continue
        host, namespace, model, tag = manifest.parts[-4:]
        short = model if namespace == "library" and host == "registry.ollama.ai" else f"{namespace}/{model}"
        found.append(LocalModel(f"{OLLAMA_PREFIX}{short}:{tag}", "ollama", blob, blob.stat().st_size))
    return found


def project_models(folder: Path = Path("models")) -> list:
    found = []
    for item in sorted(folder.glob("*")) if folder.is_dir() else []:
        if item.suffix.lower() == ".gguf" and item.is_file():
            found.append(LocalModel(str(item), "project", item.resolve(), item.stat().st_size))
        elif item.is_dir() and _is_model_folder(item):
            found.append(LocalModel(str(item), "project", item.resolve(), _size(item)))
    return found


def local_models() -> list:
    """Every model found on this machine (see the module docstring)."""
    models = []
    for store in (hf_cache_models, lmstudio_models, ollama_models, project_models):
        try:
            models.extend(store())
        except OSError:  # an unreadable store is skipped, not fatal to the listing
            continue
    return models


# ------------------------------------------------------------------ references


def is_prefixed(ref: str) -> bool:
    return ref.startswith((OLLAMA_PREFIX, LMSTUDIO_PREFIX))


def resolve_prefixed(ref: str) -> Path:
    """The file an `ollama:NAME[:TAG]` or `lmstudio:PART` reference names."""
    if ref.startswith(OLLAMA_PREFIX):
        wanted = ref if ref.count(":") >= 2 else f"{ref}:latest"
        matches = [m for m in ollama_models() if m.name == wanted]
        store = f"Ollama's store ({ollama_root()})"
    else:
        part = ref[len(LMSTUDIO_PREFIX) :].lower()
        everything = lmstudio_models()
        exact = [m for m in everything if m.name.lower() == ref.lower()]
        matches = exact or [m for m in everything if part and part in m.name.lower()]
        store = f"LM Studio's models folders ({', '.join(str(r) for r in lmstudio_roots())})"
    if len(matches) == 1:
        return matches[0].path
    if not matches:
        raise ModelNotFoundError(f"no model {ref} in {store}; `selfextend models` lists what is there")
    names = ", ".join(m.name for m in matches[:5])
    raise ModelNotFoundError(f"{ref} names {len(matches)} models ({names}); give more of the name")


# ------------------------------------------------------------------ what each one is


def _gguf_facts(path: Path) -> dict:
    from collections import Counter

    from gguf.constants import LlamaFileType

    from .gguf import read_header

    header = read_header(path)
    file_type = header.metadata.get("general.file_type")
    try:
        quantization = LlamaFileType(file_type).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        quantization = Counter(kind for kind, _ in header.tensors.values()).most_common(1)[0][0]
    return {
        "family": header.architecture,
        "quantization": quantization,
        "trained_context": header.arch_value("context_length"),
    }


def _folder_facts(path: Path) -> dict:
    from .config_check import read_config

    config = read_config(path)
    text = {**(config.get("text_config") or {}), **config}
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits") if isinstance(quant, dict) else None
    return {
        "family": text.get("model_type", "unknown"),
        "quantization": f"{bits}-bit" if bits else str(text.get("torch_dtype") or text.get("dtype") or "unknown"),
        "trained_context": text.get("max_position_embeddings"),
    }


def describe_local(model: LocalModel) -> dict:
    """A listing row: name, where, path, size, family, quantization, trained context, reach.
    A file that cannot be read says why in `error` rather than stopping the listing."""
    from ..errors import SelfExtendError
    from ..planning import ModelLimits, largest_reach

    row = {"name": model.name, "where": model.where, "path": str(model.path), "size": model.size}
    try:
        facts = _gguf_facts(model.path) if model.path.is_file() else _folder_facts(model.path)
    except SelfExtendError as error:
        return {**row, "family": None, "quantization": None, "trained_context": None, "reach": None,
                "error": str(error)}  # fmt: skip
    trained = facts["trained_context"]
    reach = None
    if isinstance(trained, int) and trained > 1:
        reach = largest_reach(ModelLimits(trained))
    return {**row, **facts, "reach": reach, "error": None}
