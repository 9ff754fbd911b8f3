"""Load llama-family GGUF files (the files llama.cpp, Ollama and LM Studio use) as mlx-lm models.

`mx.load` reads the tensors natively: F32/F16 as arrays, Q4_0/Q4_1/Q8_0 as MLX affine
quantized triples (weight, scales, biases) with groups of 32. This module adds what MLX does
not: a header check with one clear error for what it cannot read, the llama.cpp -> Hugging
Face tensor names, undoing llama.cpp's q/k row permutation, and the tokenizer and chat
template from the metadata.
"""

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)
# ggml tensor type ids (ggml.h) -> names; only the first five load.
TENSOR_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
}
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
SUPPORTED = (
    f"supported: architecture {'/'.join(SUPPORTED_ARCHITECTURES)} "
    f"(Llama, Mistral, TinyLlama, SmolLM, ...) with {', '.join(SUPPORTED_TENSOR_TYPES)} tensors"
)
GGUF_MAGIC = b"GGUF"


class GGUFError(UnsupportedModelError):
    """A GGUF file this loader cannot read; the message names what is supported."""


# ---------------------------------------------------------------- header


@dataclass
class GGUFHeader:
    version: int
    metadata: dict  # key -> int/float/bool/str/list
    tensors: dict  # name -> (type name, shape in row-major order)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "unknown")

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


GGML_MAX_DIMS = 4
MAX_NESTING = 8  # arrays of arrays: real files nest once at most


class _Reader:
    """Reads GGUF fields, checking every length and count against the bytes left in the file
    before reading, so a corrupt size field is an error, never a huge allocation."""

    def __init__(self, file, size: int):
        self.file, self.size = file, size

    def left(self) -> int:
        return self.size - self.file.tell()

    def _read(self, n: int) -> bytes:
        if n > self.left():
            raise EOFError(f"a length of {n:,} bytes runs past the end of the file")
        return self.file.read(n)

    def take(self, fmt: str):
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def count(self, item_bytes: int) -> int:
        """A count of items of at least `item_bytes` each, which must fit in what is left."""
        n = self.take("<Q")
        if n * item_bytes > self.left():
            raise EOFError(f"a count of {n:,} items runs past the end of the file")
        return n

    def string(self) -> str:
        return self._read(self.take("<Q")).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError("arrays nested too deep")
            item_kind = self.take("<I")
            if item_kind == _STRING:
                return [self.string() for _ in range(self.count(8))]
            if item_kind in _NUMPY:
                # Token scores and types are long: read them in one go.
                dtype = np.dtype(_NUMPY[item_kind])
                count = self.count(dtype.itemsize)
                return np.frombuffer(self._read(dtype.itemsize * count), dtype=dtype).tolist()
            return [self.value(item_kind, depth + 1) for _ in range(self.count(4))]
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path) -> GGUFHeader:
    """Metadata and tensor types of a GGUF file, without reading the tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            if file.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (no GGUF magic number)")
            reader = _Reader(file, os.fstat(file.fileno()).st_size)
            version = reader.take("<I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported; supported: versions 2 and 3")
            # each tensor and key takes at least 24 and 12 bytes of the header
            tensor_count, kv_count = reader.count(24), reader.count(12)
            metadata = {}
            for _ in range(kv_count):
                key = reader.string()
                metadata[key] = reader.value(reader.take("<I"))
            tensors = {}
            for _ in range(tensor_count):
                name = reader.string()
                n_dims = reader.take("<I")
                if n_dims > GGML_MAX_DIMS:
                    raise ValueError(f"tensor {name[:60]} has {n_dims} dimensions")
                dims = [reader.take("<Q") for _ in range(n_dims)]
                kind = reader.take("<I")
                reader.take("<Q")  # data offset
                # GGUF lists the fastest-moving dimension first.
                tensors[name] = (TENSOR_TYPES.get(kind, f"type {kind}"), tuple(reversed(dims)))
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as error:
        raise GGUFError(f"{path} is a truncated or corrupt GGUF file ({error or 'unexpected end'})") from None
    except OSError as error:
        raise GGUFError(f"cannot read {path}: {error.strerror or error}") from None
    return GGUFHeader(version, metadata, tensors)


def check_supported(header: GGUFHeader, path) -> None:
    """Raise one clear GGUFError for anything the loader would get wrong."""
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture '{arch}' is not supported; {SUPPORTED}")
    unsupported = {name: kind for name, (kind, _) in header.tensors.items() if kind not in SUPPORTED_TENSOR_TYPES}
    if unsupported:
        kinds = ", ".join(sorted(set(unsupported.values())))
        first = next(iter(unsupported))
        raise GGUFError(
            f"{path}: GGUF tensor type {kinds} is not supported (tensor {first}, {len(unsupported)} in all); "
            f"{SUPPORTED} (llama.cpp's `llama-quantize --pure` keeps every tensor in one type)"
        )
    if (header.arch_value("expert_count") or 0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts GGUF models are not supported; {SUPPORTED}")
    if "rope_freqs.weight" in header.tensors:
        raise GGUFError(f"{path}: GGUF rope frequency tables (Llama 3.1-style scaling) are not supported; {SUPPORTED}")
    scaling = header.arch_value("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: GGUF rope scaling '{scaling}' is not supported; supported: none or linear")
    heads = header.arch_value("attention.head_count")
    width = header.arch_value("embedding_length")
    if not _positive_int(heads) or not _positive_int(width):
        raise GGUFError(f"{path}: GGUF metadata lacks the llama head count or embedding length")
    _check_sizes(header, path, width)
    head_dim = header.arch_value("attention.key_length", width // heads)
    if header.arch_value("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: GGUF partial rotary embeddings are not supported; {SUPPORTED}")
    if header.metadata.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
        model = header.metadata.get("tokenizer.ggml.model", "none")
        raise GGUFError(
            f"{path}: GGUF tokenizer '{model}' is not supported; "
            "supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_sizes(header: GGUFHeader, path, width: int) -> None:
    """The metadata's sizes must agree with the tensors the file holds: a corrupt size field
    would otherwise build a model far larger than the file (and run out of memory)."""
    layers = {name.split(".")[1] for name in header.tensors if name.startswith("blk.")}
    count = header.arch_value("block_count")
    if not _positive_int(count) or len(layers) != count or layers != {str(i) for i in range(count)}:
        raise GGUFError(f"{path}: GGUF metadata says {count!r} layers, the file holds tensors for {len(layers)}")
    for key, tensor, axis in (
        ("embedding_length", "token_embd.weight", 1),
        ("feed_forward_length", "blk.0.ffn_gate.weight", 0),
    ):
        value, found = header.arch_value(key), header.tensors.get(tensor)
        if found is None or len(found[1]) != 2 or not _positive_int(value) or found[1][axis] != value:
            shape = found[1] if found else "missing"
            raise GGUFError(f"{path}: GGUF metadata {key}={value!r} does not match tensor {tensor} ({shape})")


# ---------------------------------------------------------------- model


def model_config(header: GGUFHeader) -> dict:
    """An mlx-lm llama config (Hugging Face names) from the GGUF metadata."""
    heads = int(header.arch_value("attention.head_count"))
    width = int(header.arch_value("embedding_length"))
    vocab = header.arch_value("vocab_size") or len(header.metadata.get("tokenizer.ggml.tokens", []))
    if not vocab:
        vocab = header.tensors["token_embd.weight"][1][0]
    config = {
        "model_type": "llama",
        "hidden_size": width,
        "num_hidden_layers": int(header.arch_value("block_count")),
        "intermediate_size": int(header.arch_value("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(header.arch_value("attention.head_count_kv", heads)),
        "head_dim": int(header.arch_value("attention.key_length", width // heads)),
        "rms_norm_eps": float(header.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "rope_theta": float(header.arch_value("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(header.arch_value("context_length", 0)) or None,
        # No separate output matrix: the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    if header.arch_value("rope.scaling.type", "none") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(header.arch_value("rope.scaling.factor", 1.0))}
    return config


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> Optional[str]:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales' (None: not a model tensor)."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    return None


def unpermute_rows(weight: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order.

    llama.cpp's converter interleaves each head's two rotary halves (row r of the first half
    goes to 2r, of the second half to 2r+1) so that its rotary embedding can rotate adjacent
    pairs. mlx-lm rotates halves, as Hugging Face does, so the rows go back. Only rows move,
    and quantization groups run along a row, so the same order applied to the packed weight,
    its scales and its biases is exact.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rows(weight, heads: int):
    """llama.cpp's q/k row order (the inverse of `unpermute_rows`); used to write test files."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGML_BLOCK = 32  # Q4_0, Q4_1 and Q8_0 quantize blocks of 32 weights along a row


def _quant_params(weights: dict, name: str) -> dict:
    in_dims = weights[f"{name}.scales"].shape[-1] * GGML_BLOCK
    return {"group_size": GGML_BLOCK, "bits": weights[f"{name}.weight"].shape[-1] * 32 // in_dims}


def load_gguf_model(path, dtype: Optional[mx.Dtype] = None, header: Optional[GGUFHeader] = None):
    """(model, config) from a llama GGUF file.

    dtype None keeps quantized tensors as MLX quantized layers and float tensors as stored;
    a float dtype dequantizes everything to it at load.
    """
    from mlx_lm.models.llama import Model, ModelArgs

    header = header or read_header(path)
    check_supported(header, path)
    config = model_config(header)
    try:
        raw = mx.load(str(path))
    except (RuntimeError, ValueError) as error:
        raise GGUFError(f"{path}: MLX cannot read this GGUF file ({error}); {SUPPORTED}") from None

    weights = {}
    for name, array in raw.items():
        target = hf_name(name)
        if target is not None:
            weights[target] = array
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for layer in range(config["num_hidden_layers"]):
        for proj, count in (("q_proj", heads), ("k_proj", kv_heads)):
            for suffix in ("weight", "scales", "biases"):
                key = f"model.layers.{layer}.self_attn.{proj}.{suffix}"
                if key in weights:
                    weights[key] = unpermute_rows(weights[key], count)

    model = Model(ModelArgs.from_dict(config))
    quantized = {key[: -len(".scales")] for key in weights if key.endswith(".scales")}
    if dtype is not None:
        for name in quantized:
            params = _quant_params(weights, name)
            # Upcast scales first so the dequantized values are not rounded to fp16.
            weights[f"{name}.weight"] = mx.dequantize(
                weights[f"{name}.weight"],
                weights.pop(f"{name}.scales").astype(mx.float32),
                weights.pop(f"{name}.biases").astype(mx.float32),
                **params,
            ).astype(dtype)
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    elif quantized:
        specs = {name: _quant_params(weights, name) for name in quantized}
        nn.quantize(model, class_predicate=lambda p, m: specs.get(p, False))
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise GGUFError(f"{path}: the tensors do not fit a llama model ({str(error).splitlines()[0]})") from None
    mx.eval(model.parameters())
    model.eval()
    return model, config


# ---------------------------------------------------------------- tokenizer

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as the Hugging Face tokenizers of
# those models define them. "smollm" is checked token for token against SmolLM2's
# tokenizer.json (tests/test_gguf.py); "llama-bpe" (Llama 3) follows Llama 3's tokenizer.json
# but has not been checked against a real Llama 3 GGUF here.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3")

_CONTROL, _USER_DEFINED, _UNKNOWN, _BYTE = 3, 4, 2, 6


def _bpe_tokenizer(meta: dict, path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BPE_PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: GGUF pre-tokenizer '{pre}' is not supported; supported: {', '.join(BPE_PRE_TOKENIZERS)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    llama3 = pre in ("llama-bpe", "llama3")
    # Llama 3 looks whole words up in the vocabulary before merging.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3)
    if llama3:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _spm_merges(tokens, scores, types):
    """BPE merges equivalent to SentencePiece's: a pair merges in the order of its result's score."""
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for index, piece in enumerate(tokens):
        if types[index] in (_CONTROL, _UNKNOWN, _BYTE) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(meta: dict):
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {token: index for index, token in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=_spm_merges(tokens, scores, types),
        unk_token=tokens[unk_id],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    replace = normalizers.Replace(" ", "\u2581")
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace])
    else:
        tokenizer.normalizer = replace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _token(meta, key):
    index = meta.get(f"tokenizer.ggml.{key}_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None


def load_gguf_tokenizer(header: GGUFHeader, path):
    """An mlx-lm TokenizerWrapper built from the GGUF tokenizer metadata and chat template."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    meta = header.metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    spm = meta.get("tokenizer.ggml.model") == "llama"
    tokenizer = _spm_tokenizer(meta) if spm else _bpe_tokenizer(meta, path)

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [
        AddedToken(token, special=kind != _USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED) or (spm and kind == _UNKNOWN)
    ]
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])

    bos, eos = _token(meta, "bos"), _token(meta, "eos")
    if meta.get("tokenizer.ggml.add_bos_token", spm) and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=_token(meta, "unknown"),
        pad_token=_token(meta, "padding"),
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = meta.get("tokenizer.chat_template")
    detokenizer = SPMStreamingDetokenizer if spm else BPEStreamingDetokenizer
    eos_ids = [meta["tokenizer.ggml.eos_token_id"]] if eos is not None else []
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        eos_ids.append(meta["tokenizer.ggml.eot_token_id"])
    return TokenizerWrapper(wrapped, detokenizer, eos_token_ids=eos_ids)


def load_gguf(path, dtype: Optional[mx.Dtype] = None):
    """(model, tokenizer, config) from a llama-family GGUF file."""
    header = read_header(path)
    check_supported(header, path)
    tokenizer = load_gguf_tokenizer(header, path)
    model, config = load_gguf_model(path, dtype=dtype, header=header)
    return model, tokenizer, config
