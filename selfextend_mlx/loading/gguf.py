"""Load GGUF files (the files llama.cpp, Ollama and LM Studio use) as mlx-lm models.

Architectures: see gguf_arch.py (llama incl. Mistral and SmolLM, qwen2, qwen3, gemma,
gemma2, gemma3, phi3). Tensors: every type llama.cpp writes in model files. A file of only
F32/F16/Q4_0/Q4_1/Q8_0 tensors is read by `mx.load`, which gives Q4_0/Q4_1/Q8_0 as MLX affine
triples (weight, scales, biases) in groups of 32, exactly; any other file is decoded tensor by
tensor with the `gguf` package's dequantizer (gguf_tensors.py). The weights are then held:

- in a float dtype (fp32 on a CPU, planning's rule): every tensor dequantized to it;
- natively (dtype None, a GPU): mx.load's triples as they are, decoded quantized tensors
  re-quantized with mx.quantize to 4 bits (groups of 32) for sources of about 4.5 bits a
  weight or less, else 8 bits (groups of 64), so a Q4_K_M file stays about its size; float
  tensors as stored.

The header is read and checked before any weight: architecture, tensor types, sizes that
agree with the tensors, tensors that lie inside the file (a truncated file is refused here),
and metadata arrays that are capped (issue 29.4). `memory_needed` says what the weights take.
"""

import importlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UnsupportedModelError
from .files import special_kind
from .gguf_arch import ARCHITECTURES, FAMILY_NAMES, LLAMA_LAYER, TOP_NAMES, Architecture
from .gguf_arch import model_config as model_config
from .gguf_tensors import FLOAT_TYPES, block_layout, decodable, decode, held_bits, tensor_bytes, type_name

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
MLX_NATIVE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")  # what mx.load reads
SUPPORTED = (
    f"supported: architectures {FAMILY_NAMES}, with tensors of the types llama.cpp writes "
    "(F32, F16, BF16, Q4_0 to Q8_0, Q2_K to Q6_K, Q8_K, the IQ and TQ types, MXFP4)"
)
GGUF_MAGIC = b"GGUF"
MAX_ARRAY_ITEMS = 1 << 22  # metadata arrays past this are skipped (numbers) or refused (strings)
TOKENIZER_PREFIX = "tokenizer."


class GGUFError(UnsupportedModelError):
    """A GGUF file this loader cannot read; the message names what is supported."""


# ---------------------------------------------------------------- header


@dataclass
class GGUFHeader:
    version: int
    metadata: dict  # key -> int/float/bool/str/list
    tensors: dict  # name -> (type name, shape in row-major order)
    locations: dict = field(default_factory=dict)  # name -> (absolute offset, bytes); known types only
    skipped: dict = field(default_factory=dict)  # metadata key -> item count of arrays not read

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


class _Skipped(Exception):
    """A numeric metadata array past MAX_ARRAY_ITEMS, skipped unread."""

    def __init__(self, count: int):
        self.count = count


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

    def value(self, kind: int, depth: int = 0, key: str = ""):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self._array(depth, key)
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        raise ValueError(f"unknown GGUF value type {kind}")

    def _array(self, depth: int, key: str):
        if depth >= MAX_NESTING:
            raise ValueError("arrays nested too deep")
        item_kind = self.take("<I")
        itemsize = np.dtype(_NUMPY[item_kind]).itemsize if item_kind in _NUMPY else (8 if item_kind == _STRING else 4)
        count = self.count(itemsize)
        if count > MAX_ARRAY_ITEMS:
            if item_kind in _NUMPY and depth == 0 and not key.startswith(TOKENIZER_PREFIX):
                self.file.seek(count * itemsize, os.SEEK_CUR)  # nothing here needs it: not read
                raise _Skipped(count)
            raise ValueError(f"metadata array {key[:60]} has {count:,} items, more than the {MAX_ARRAY_ITEMS:,} read")
        if item_kind == _STRING:
            return [self.string() for _ in range(count)]
        if item_kind in _NUMPY:
            # Token scores and types are long: read them in one go.
            dtype = np.dtype(_NUMPY[item_kind])
            return np.frombuffer(self._read(dtype.itemsize * count), dtype=dtype).tolist()
        return [self.value(item_kind, depth + 1, key) for _ in range(count)]


def _metadata(reader: _Reader, count: int):
    metadata, skipped = {}, {}
    for _ in range(count):
        key = reader.string()
        try:
            metadata[key] = reader.value(reader.take("<I"), key=key)
        except _Skipped as skip:
            skipped[key] = skip.count
    return metadata, skipped


def _tensor_infos(reader: _Reader, count: int) -> dict:
    infos = {}
    for _ in range(count):
        name = reader.string()
        n_dims = reader.take("<I")
        if n_dims > GGML_MAX_DIMS:
            raise ValueError(f"tensor {name[:60]} has {n_dims} dimensions")
        dims = [reader.take("<Q") for _ in range(n_dims)]
        kind = type_name(reader.take("<I"))
        offset = reader.take("<Q")
        # GGUF lists the fastest-moving dimension first.
        infos[name] = (kind, tuple(reversed(dims)), offset)
    return infos


def _locations(infos: dict, data_start: int, size: int) -> dict:
    """Where each tensor of a known type lies; a tensor past the end means a truncated file."""
    locations = {}
    for name, (kind, shape, offset) in infos.items():
        if block_layout(kind) is None:
            continue
        nbytes = tensor_bytes(kind, shape)
        end = data_start + offset + nbytes
        if end > size:
            raise EOFError(f"tensor {name[:60]} ends at byte {end:,}, the file has {size:,}")
        locations[name] = (data_start + offset, nbytes)
    return locations


def read_header(path) -> GGUFHeader:
    """Metadata and tensor types of a GGUF file, without reading the tensor data."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:  # never opened: a FIFO would wait for a writer forever
        raise GGUFError(f"{path} is {kind}, not a GGUF file")
    try:
        with open(path, "rb") as file:
            if file.read(4) != GGUF_MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (no GGUF magic number)")
            size = os.fstat(file.fileno()).st_size
            reader = _Reader(file, size)
            version = reader.take("<I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported; supported: versions 2 and 3")
            # each tensor and key takes at least 24 and 12 bytes of the header
            tensor_count, kv_count = reader.count(24), reader.count(12)
            metadata, skipped = _metadata(reader, kv_count)
            infos = _tensor_infos(reader, tensor_count)
            alignment = metadata.get("general.alignment", 32)
            if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 20:
                raise ValueError(f"general.alignment is {alignment!r}")
            data_start = -(-file.tell() // alignment) * alignment
            locations = _locations(infos, data_start, size)
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as error:
        raise GGUFError(f"{path} is a truncated or corrupt GGUF file ({error or 'unexpected end'})") from None
    except OSError as error:
        raise GGUFError(f"cannot read {path}: {error.strerror or error}") from None
    tensors = {name: (kind, shape) for name, (kind, shape, _) in infos.items()}
    return GGUFHeader(version, metadata, tensors, locations, skipped)


def check_supported(header: GGUFHeader, path) -> None:
    """Raise one clear GGUFError for anything the loader would get wrong."""
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture '{arch}' is not supported; {SUPPORTED}")
    unsupported = {name: kind for name, (kind, _) in header.tensors.items() if not decodable(kind)}
    if unsupported:
        kinds = ", ".join(sorted(set(unsupported.values())))
        first = next(iter(unsupported))
        raise GGUFError(
            f"{path}: GGUF tensor type {kinds} is not supported (tensor {first}, {len(unsupported)} in all); "
            f"{SUPPORTED}"
        )
    if (header.arch_value("expert_count") or 0) > 0:
        raise GGUFError(f"{path}: mixture-of-experts GGUF models are not supported; {SUPPORTED}")
    if "rope_factors_long.weight" in header.tensors:
        raise GGUFError(f"{path}: GGUF long-context rope factors (Phi-3 128k scaling) are not supported; {SUPPORTED}")
    scaling = header.arch_value("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: GGUF rope scaling '{scaling}' is not supported; supported: none or linear")
    heads = header.arch_value("attention.head_count")
    width = header.arch_value("embedding_length")
    if not _positive_int(heads) or not _positive_int(width):
        raise GGUFError(f"{path}: GGUF metadata lacks the {arch} head count or embedding length")
    _check_sizes(header, path, ARCHITECTURES[arch])
    head_dim = header.arch_value("attention.key_length", width // heads)
    if header.arch_value("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: GGUF partial rotary embeddings are not supported; {SUPPORTED}")
    _check_rope_factors(header, path, head_dim)
    if header.metadata.get("tokenizer.ggml.model") not in ("gpt2", "llama"):
        model = header.metadata.get("tokenizer.ggml.model", "none")
        raise GGUFError(
            f"{path}: GGUF tokenizer '{model}' is not supported; "
            "supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )


ROPE_FACTORS = "rope_freqs.weight"  # Llama 3.1+: one divisor per rotary frequency


def _check_rope_factors(header: GGUFHeader, path, head_dim: int) -> None:
    if ROPE_FACTORS not in header.tensors:
        return
    kind, shape = header.tensors[ROPE_FACTORS]
    if header.architecture != "llama" or kind != "F32" or tuple(shape) != (head_dim // 2,):
        raise GGUFError(
            f"{path}: GGUF rope frequency table {kind} {list(shape)} of a {header.architecture} model is not "
            f"supported (expected F32 [{head_dim // 2}] in a llama model, as Llama 3.1+ files have)"
        )


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_sizes(header: GGUFHeader, path, arch: Architecture) -> None:
    """The metadata's sizes must agree with the tensors the file holds: a corrupt size field
    would otherwise build a model far larger than the file (and run out of memory)."""
    layers = {name.split(".")[1] for name in header.tensors if name.startswith("blk.")}
    count = header.arch_value("block_count")
    if not _positive_int(count) or len(layers) != count or layers != {str(i) for i in range(count)}:
        raise GGUFError(f"{path}: GGUF metadata says {count!r} layers, the file holds tensors for {len(layers)}")
    ffn = header.arch_value("feed_forward_length")
    gate = f"blk.0.{arch.ffn_tensor}.weight"
    # phi3's ffn_up holds gate and up: twice the rows
    ffn_rows = (ffn, 2 * ffn) if arch.ffn_tensor == "ffn_up" and _positive_int(ffn) else (ffn,)
    for key, tensor, axis, allowed in (
        ("embedding_length", "token_embd.weight", 1, (header.arch_value("embedding_length"),)),
        ("feed_forward_length", gate, 0, ffn_rows),
        ("attention.head_count", "blk.0.attn_output.weight", 1, (_query_width(header),)),
    ):
        value, found = header.arch_value(key), header.tensors.get(tensor)
        if found is None or len(found[1]) != 2 or not _positive_int(value) or found[1][axis] not in allowed:
            shape = found[1] if found else "missing"
            raise GGUFError(f"{path}: GGUF metadata {key}={value!r} does not match tensor {tensor} ({shape})")


def _query_width(header: GGUFHeader):
    """heads x head size: the attention output's input width."""
    heads, width = header.arch_value("attention.head_count"), header.arch_value("embedding_length")
    head_dim = header.arch_value("attention.key_length", width // heads)
    return heads * head_dim if _positive_int(head_dim) else None


def memory_needed(header: GGUFHeader, dtype: Optional[mx.Dtype]) -> int:
    """Bytes the weights take once held (the module docstring's rule), from the header alone."""
    native = all(kind in MLX_NATIVE_TYPES for kind, _ in header.tensors.values())
    total = 0
    for name, (kind, shape) in header.tensors.items():
        elements = int(np.prod(shape, dtype=np.int64))
        if dtype is not None:
            total += elements * dtype.size
        elif native or kind in FLOAT_TYPES:
            total += header.locations.get(name, (0, elements * 4))[1]
        elif _quantizable(shape, held_bits(kind)):
            bits = held_bits(kind)
            total += elements * bits // 8 + elements // _GROUP[bits] * 4  # fp16 scale and bias a group
        else:
            total += elements * 4
    return total


# ---------------------------------------------------------------- model

_LAYER_NAMES = LLAMA_LAYER  # llama.cpp -> Hugging Face names within a llama layer
_TOP_NAMES = TOP_NAMES
_GROUP = {4: 32, 8: 64}  # re-quantized group sizes


def hf_name(gguf_name: str, arch: str = "llama") -> Optional[str]:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales' (None: not a model tensor)."""
    return ARCHITECTURES[arch].hf_name(gguf_name)


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


def _quantizable(shape: tuple, bits: int) -> bool:
    return len(shape) == 2 and shape[-1] % _GROUP[bits] == 0


def _undo_conversion(arch: Architecture, config: dict, name: str, array: mx.array) -> mx.array:
    """Undo what llama.cpp's converter did to one tensor (see gguf_arch.py)."""
    if arch.permuted_qk and ".self_attn.q_proj." in name:
        return unpermute_rows(array, config["num_attention_heads"])
    if arch.permuted_qk and ".self_attn.k_proj." in name:
        return unpermute_rows(array, config["num_key_value_heads"])
    if arch.norm_plus_one and arch.is_norm(name):
        return array - 1.0
    return array


def _mlx_loaded(path, header: GGUFHeader, arch: Architecture, config: dict, dtype) -> tuple[dict, dict]:
    """Weights of an F32/F16/Q4_0/Q4_1/Q8_0 file through mx.load (MLX's own GGUF reader)."""
    try:
        raw = mx.load(str(path), format="gguf")  # Ollama blobs have no .gguf suffix
    except (RuntimeError, ValueError) as error:
        raise GGUFError(f"{path}: MLX cannot read this GGUF file ({error}); {SUPPORTED}") from None
    weights = {}
    for name, array in raw.items():
        target = arch.hf_name(name)
        if target is not None:
            weights[target] = _undo_conversion(arch, config, target, array)
    quantized = {key[: -len(".scales")] for key in weights if key.endswith(".scales")}
    if dtype is None:
        return weights, {name: _quant_params(weights, name) for name in quantized}
    for name in quantized:
        params = _quant_params(weights, name)
        # Upcast scales first so the dequantized values are not rounded to fp16.
        weights[f"{name}.weight"] = mx.dequantize(
            weights[f"{name}.weight"],
            weights.pop(f"{name}.scales").astype(mx.float32),
            weights.pop(f"{name}.biases").astype(mx.float32),
            **params,
        )
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}, {}


_STORED = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def _decoded(path, header: GGUFHeader, arch: Architecture, config: dict, dtype) -> tuple[dict, dict]:
    """Weights decoded tensor by tensor with the gguf package, then held (the module's rule)."""
    weights, specs = {}, {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, (kind, shape) in header.tensors.items():
        target = arch.hf_name(name)
        if target is None:
            continue
        start, nbytes = header.locations[name]
        array = _undo_conversion(arch, config, target, mx.array(decode(data[start : start + nbytes], kind, shape)))
        stem, _, suffix = target.rpartition(".")
        if dtype is not None:
            weights[target] = array.astype(dtype)
        elif kind not in FLOAT_TYPES and suffix == "weight" and _quantizable(shape, held_bits(kind)):
            bits = held_bits(kind)
            packed, scales, biases = mx.quantize(array.astype(mx.float16), group_size=_GROUP[bits], bits=bits)
            weights.update({target: packed, f"{stem}.scales": scales, f"{stem}.biases": biases})
            specs[stem] = {"group_size": _GROUP[bits], "bits": bits}
        else:
            weights[target] = array.astype(_STORED.get(kind, mx.float32))
        mx.eval([v for k, v in weights.items() if k.startswith(stem)])
    del data
    return weights, specs


def _divide_rope_frequencies(model, header: GGUFHeader, path, config: dict) -> None:
    """Llama 3.1+ files store their rope scaling as a table: rotary frequency i is divided by
    factor i (llama.cpp's freq_factors). mx.fast.rope's `freqs` are the inverse frequencies
    (angle = position / freqs), so each becomes base^(2i/d) * factor i; model_config gave
    these layers a llama3 rope (mlx-lm's Llama3RoPE) whose table is replaced here."""
    start, nbytes = header.locations[ROPE_FACTORS]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    factors = mx.array(decode(data[start : start + nbytes], "F32", header.tensors[ROPE_FACTORS][1]))
    del data
    dims = config["head_dim"]
    freqs = config["rope_theta"] ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims) * factors
    for layer in model.layers:
        layer.self_attn.rope._freqs = freqs


def load_gguf_model(path, dtype: Optional[mx.Dtype] = None, header: Optional[GGUFHeader] = None):
    """(model, config) from a GGUF file of a supported architecture.

    dtype None keeps quantized tensors as MLX quantized layers and float tensors as stored;
    a float dtype dequantizes everything to it at load.
    """
    header = header or read_header(path)
    check_supported(header, path)
    arch = ARCHITECTURES[header.architecture]
    config = model_config(header)
    module = importlib.import_module(f"mlx_lm.models.{arch.model_type}")
    native = all(kind in MLX_NATIVE_TYPES for kind, _ in header.tensors.values())
    read = _mlx_loaded if native else _decoded
    weights, specs = read(path, header, arch, config, dtype)

    model = module.Model(module.ModelArgs.from_dict(config))
    if ROPE_FACTORS in header.tensors:
        _divide_rope_frequencies(model, header, path, config)
    if specs:
        nn.quantize(model, class_predicate=lambda p, m: specs.get(p, False))
    if config["tie_word_embeddings"]:
        for suffix in ("weight", "scales", "biases"):
            weights.pop(f"lm_head.{suffix}", None)
        if "lm_head" in model:  # models that decide tying from the weights (gemma3_text)
            model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise GGUFError(
            f"{path}: the tensors do not fit a {header.architecture} model ({str(error).splitlines()[0]})"
        ) from None
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


# The end-of-turn tokens of the chat formats (Gemma, ChatML, Llama 3, Phi-3): a chat answer
# ends there, even when the file names only the end-of-text token as EOS (llama.cpp's rule too).
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def _end_of_turn_ids(tokens, types, known) -> list:
    wanted = set(END_OF_TURN)
    return [
        index
        for index, piece in enumerate(tokens)
        if piece in wanted and types[index] in (_CONTROL, _USER_DEFINED) and index not in known
    ]


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
    eos_ids += _end_of_turn_ids(tokens, types, eos_ids)
    return TokenizerWrapper(wrapped, detokenizer, eos_token_ids=eos_ids)


def check_memory(header: GGUFHeader, path, dtype: Optional[mx.Dtype]) -> None:
    """Refuse, before any weight is read, weights that would not fit in this machine's memory."""
    from ..errors import InsufficientMemoryError
    from ..planning import MEMORY_FRACTION, format_bytes, machine_memory

    need, machine = memory_needed(header, dtype), machine_memory()
    if machine is not None and need > MEMORY_FRACTION * machine:
        held = f"in {dtype}".replace("mlx.core.", "") if dtype is not None else "natively"
        raise InsufficientMemoryError(
            f"{path}: its weights need about {format_bytes(need)} held {held} and the machine has "
            f"{format_bytes(machine)}; use a smaller model or quantization (or --dtype native on a GPU)"
        )


def load_gguf(path, dtype: Optional[mx.Dtype] = None):
    """(model, tokenizer, config) from a GGUF file of a supported architecture."""
    header = read_header(path)
    check_supported(header, path)
    check_memory(header, path, dtype)
    tokenizer = load_gguf_tokenizer(header, path)
    model, config = load_gguf_model(path, dtype=dtype, header=header)
    return model, tokenizer, config
