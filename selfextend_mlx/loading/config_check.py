"""The one validation of a model folder's config.json and tokenizer_config.json (issue 28.4).

Every config is read through `read_config`, which checks the fields the loader, mlx-lm and
planning rely on before any of them sees the file: the whole file an object, sizes positive
integers of sane magnitude (an `int`, not "512" or 1e30), epsilons positive, head counts that
divide the width and each other, tokenizer fields of the types transformers expects. A bad
value is one ModelConfigError line naming the file, the field and what it must be.
"""

import json
import math
from pathlib import Path

from ..errors import UnsupportedModelError

MAX_SIZE = 1 << 26  # no real model has a size field past 67M (positions, vocabulary, width)
POSITIVE_INTS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
)
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "rope_theta")
TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ModelConfigError(UnsupportedModelError):
    """A config.json or tokenizer_config.json with a value of the wrong type or shape."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _fail(where, field: str, value, what: str):
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise ModelConfigError(f"{where}: field {field} is {shown}; it must be {what}")


def _check_fields(config: dict, where) -> None:
    for key in POSITIVE_INTS:
        value = config.get(key)
        if value is not None and not (_is_int(value) and 0 < value <= MAX_SIZE):
            _fail(where, key, value, f"a whole number from 1 to {MAX_SIZE:,}")
    for key in POSITIVE_NUMBERS:
        value = config.get(key)
        if value is not None and not (_is_number(value) and value > 0):
            _fail(where, key, value, "a positive number")
    if "model_type" in config and not isinstance(config["model_type"], str):
        _fail(where, "model_type", config["model_type"], "a string")
    for key in ("rope_scaling", "text_config"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            _fail(where, key, config[key], "an object or null")
    eos = config.get("eos_token_id")
    if eos is not None and not (_is_int(eos) or (isinstance(eos, list) and all(_is_int(e) for e in eos))):
        _fail(where, "eos_token_id", eos, "a token id or a list of token ids")
    if "tie_word_embeddings" in config and not isinstance(config["tie_word_embeddings"], bool):
        _fail(where, "tie_word_embeddings", config["tie_word_embeddings"], "true or false")


def _check_heads(config: dict, where) -> None:
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    width = config.get("hidden_size")
    if heads and width and config.get("head_dim") is None and width % heads:
        _fail(where, "num_attention_heads", heads, f"a divisor of hidden_size {width} (or give head_dim)")
    if heads and kv and heads % kv:
        _fail(where, "num_key_value_heads", kv, f"a divisor of num_attention_heads {heads}")


def check_config(config, where) -> dict:
    """config.json's contents, checked (and its text_config, where the text model lives)."""
    if not isinstance(config, dict):
        raise ModelConfigError(f"{where}: the file must hold a JSON object, not {type(config).__name__}")
    _check_fields(config, where)
    _check_heads(config, where)
    if isinstance(config.get("text_config"), dict):
        _check_fields(config["text_config"], f"{where} (text_config)")
        _check_heads({**config["text_config"]}, f"{where} (text_config)")
    return config


def check_tokenizer_config(config, where) -> dict:
    if not isinstance(config, dict):
        raise ModelConfigError(f"{where}: the file must hold a JSON object, not {type(config).__name__}")
    for key in TOKEN_FIELDS:
        value = config.get(key)
        if value is not None and not isinstance(value, (str, dict)):
            _fail(where, key, value, "a string, an object or null")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        _fail(where, "chat_template", template, "a string or a list of named templates")
    for key in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            _fail(where, key, config[key], "true or false")
    length = config.get("model_max_length")
    if length is not None and not _is_number(length) and not _is_int(length):
        _fail(where, "model_max_length", length, "a number")
    return config


def _read_json(file: Path, missing_ok: bool):
    if missing_ok and not file.exists():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        from ..errors import ModelNotFoundError

        reason = getattr(error, "strerror", None) or getattr(error, "msg", None) or type(error).__name__
        raise ModelNotFoundError(f"{file}: cannot read it as JSON ({reason})") from None


def read_config(folder: Path) -> dict:
    """A model folder's config.json, checked; its tokenizer_config.json too, when present."""
    folder = Path(folder)
    config = check_config(_read_json(folder / "config.json", missing_ok=False), folder / "config.json")
    tokenizer = _read_json(folder / "tokenizer_config.json", missing_ok=True)
    if tokenizer is not None:
        check_tokenizer_config(tokenizer, folder / "tokenizer_config.json")
    return config
