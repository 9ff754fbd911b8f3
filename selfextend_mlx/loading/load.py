"""Turn a model reference into a loaded mlx-lm model and tokenizer, SelfExtend applied or not.

`load` resolves the reference (resolve.py), reads the weights (mlx-lm for folders, gguf.py
for GGUF files), puts them in the compute dtype (device.py) and records on the model what
planning needs to know about it (ModelInfo: its limits and shape). `describe` tells the same
about a model without loading its weights.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelNotFoundError, UnsupportedModelError
from ..planning import ModelLimits, ModelShape, attention_chunk_size, choose_settings
from .config_check import read_config
from .device import DTYPES, activation_bytes, apply_dtype, resolve_dtype
from .registry import ModelEntry, registry_entry
from .resolve import reference, resolve


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the project needs to know about a loaded model."""

    model_id: str  # stable name recorded in cache files
    family: str  # mlx-lm model_type
    limits: ModelLimits  # trained and effective context, the registry's G and W, the largest G
    shape: ModelShape  # layers, heads, head size, vocabulary, bytes per activation
    weights_bytes: int = 0
    path: Optional[str] = None
    dtype: Optional[str] = None  # compute dtype: float32 / float16 / bfloat16 / native
    registry_name: Optional[str] = None  # the models.yaml entry this model is, if any
    revision: Optional[str] = None  # Hub commit, or a size/mtime fingerprint of local weights

    @property
    def trained_context(self) -> int:
        return self.limits.trained_context


def model_info(model) -> Optional[ModelInfo]:
    return getattr(model, "model_info", None)


# ------------------------------------------------------------------ what a config says


def _text_config(config: dict) -> dict:
    return {**(config.get("text_config") or {}), **config}


def trained_context(config: dict, entry: Optional[ModelEntry], where) -> int:
    if entry is not None:
        return entry.trained_context  # the registry wins: some configs claim more than was trained
    value = _text_config(config).get("max_position_embeddings")
    if value:
        return int(value)
    raise UnsupportedModelError(
        f"{where}: config.json gives no max_position_embeddings; add the model to a registry file "
        "($SELFEXTEND_MODELS) with its trained_context"
    )


def model_limits(config: dict, entry: Optional[ModelEntry], where) -> ModelLimits:
    """The registry's limits for a known model; the config's context otherwise."""
    if entry is not None:
        return entry.limits
    return ModelLimits(trained_context(config, None, where))


def model_shape(config: dict, item_bytes: int = 4) -> ModelShape:
    config = _text_config(config)
    heads = config.get("num_attention_heads") or 1
    return ModelShape(
        layers=config.get("num_hidden_layers", 0),
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or (config.get("hidden_size", 0) // heads),
        heads=heads,
        vocab=config.get("vocab_size") or 32000,
        item_bytes=item_bytes,
    )


def _read_config(path: Path) -> dict:
    """config.json, checked field by field (config_check.py: the one validation of configs)."""
    return read_config(path)


# ------------------------------------------------------------------ describing without loading


@dataclass(frozen=True)
class ModelSpec:
    """What `selfextend info` shows, read from the registry or a config, without the weights."""

    name: str
    family: str
    limits: ModelLimits
    shape: ModelShape
    entry: Optional[ModelEntry]
    available: bool  # on this machine (else described from the registry)
    location: Optional[str]  # the local folder or file, when available

    @property
    def trained_context(self) -> int:
        return self.limits.trained_context


def _spec_from_config(name, config, entry, available, location, where) -> ModelSpec:
    return ModelSpec(
        name,
        config.get("model_type", "unknown"),
        model_limits(config, entry, where),
        model_shape(config),
        entry,
        available,
        location,
    )


def describe(model_ref=None) -> ModelSpec:
    """A model's family, limits and KV geometry, from what is on this machine or the registry."""
    ref = reference(model_ref)
    try:
        source = resolve(ref)
    except ModelNotFoundError as not_local:
        entry = registry_entry(ref)
        if entry is not None:
            shape = ModelShape(layers=entry.layers, kv_heads=entry.kv_heads, head_dim=entry.head_dim)
            return ModelSpec(entry.name, entry.family, entry.limits, shape, entry, False, None)
        raise not_local
    name = source.entry.name if source.entry and source.model_id == source.entry.name else source.model_id
    if source.kind == "gguf":
        from .gguf import check_supported, model_config, read_header

        header = read_header(source.path)
        check_supported(header, source.path)
        return _spec_from_config(name, model_config(header), source.entry, True, str(source.path), source.path)
    return _spec_from_config(name, _read_config(source.path), source.entry, True, str(source.path), source.path)


# ------------------------------------------------------------------ loading


REMOTE_CODE_REFUSED = (
    "it needs Python code from the model folder to build its {what}, and code from a model is not run "
    "unless you ask: pass --trust-remote-code (trust_remote_code=True in Python) if you trust its author"
)


def _load_folder(path: Path, dtype_name: str, trust_remote_code: bool):
    from mlx_lm.utils import load_model, load_tokenizer

    _read_config(path)  # before mlx-lm reads it: a bad field is one line naming it
    try:
        # Lazy, so a bf16 or quantized model is converted without holding both copies.
        model, config = load_model(path, lazy=True, trust_remote_code=trust_remote_code)
        # Always explicit: left unset, transformers asks on stdout whether to run the folder's
        # tokenizer code and reads the answer from stdin.
        extra = {"trust_remote_code": bool(trust_remote_code)}
        tokenizer = load_tokenizer(path, extra, eos_token_ids=config.get("eos_token_id"))
        apply_dtype(model, dtype_name)  # reads the (lazy) weights: a truncated file fails here
    except FileNotFoundError as error:
        raise ModelNotFoundError(f"{path}: {str(error).splitlines()[0]}") from None
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"{path}: a JSON file is corrupt ({error.msg})") from None
    except (ValueError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "trust_remote_code" in str(error):
            what = "tokenizer" if "model_file" not in str(error) and "architecture" not in str(error) else "model"
            raise UnsupportedModelError(f"{path}: {REMOTE_CODE_REFUSED.format(what=what)}") from None
        if isinstance(error, RuntimeError):  # MLX reading the weights
            message = f"its weights cannot be read, the file may be truncated or corrupt ({message})"
        raise UnsupportedModelError(f"{path}: {message}") from None
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
    group_size, window: SelfExtend's G and W. Missing ones come from planning's rule
        (selfextend_mlx.planning.choose_settings): with `tokens` (the expected input plus
        answer length) that is plain attention when they fit the model's context and the
        smallest G that reaches them otherwise; without, the registry's G.
    selfextend: False returns the plain model (with model_info) for callers that plan later.
    dtype: None picks fp32 on CPU (quantized weights dequantized at load) and the stored
        weights on a GPU; or one of float32, float16, bfloat16, native.
    """
    from mlx.utils import tree_flatten

    from ..core.patch import apply_selfextend

    dtype_name = resolve_dtype(dtype)
    source = resolve(model_ref)
    entry = source.entry
    if source.kind == "gguf":
        from .gguf import load_gguf

        model, tokenizer, config = load_gguf(source.path, dtype=DTYPES[dtype_name])
    else:
        model, tokenizer, config = _load_folder(source.path, dtype_name, trust_remote_code)
    if source.changed():
        raise ModelNotFoundError(f"{source.path} changed while it was being loaded; run again once it is complete")
    limits = model_limits(config, entry, source.path)
    model.model_info = ModelInfo(
        model_id=source.model_id,
        family=config.get("model_type", "unknown"),
        limits=limits,
        shape=model_shape(config, activation_bytes(model)),
        weights_bytes=sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        path=str(source.path),
        dtype=dtype_name,
        registry_name=entry.name if entry else None,
        revision=source.revision,
    )
    if selfextend:
        settings = choose_settings(limits, tokens, group_size=group_size, window=window)
        if not settings.plain:  # the attention chunk keeps its scores within planning's budget
            chunk = attention_chunk_size(model.model_info.shape.heads, tokens or settings.reach)
            apply_selfextend(model, settings.config(chunk_size=chunk))
    return model, tokenizer
