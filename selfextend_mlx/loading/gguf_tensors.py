"""GGUF tensor data: where each tensor lies in the file, how many bytes it takes, and its
values as numpy arrays.

Block layouts are the `gguf` package's (llama.cpp's own Python reader): its table of block
sizes checks every tensor against the file before any weight is read, and its dequantizer
decodes every type llama.cpp writes in model files (F32, F16, BF16, Q4_0 .. Q8_0, the K
quants, the IQ and TQ types, MXFP4). Q8_K, which it does not decode, is one scale times
int8 values and is decoded here.

How the values are then held (fp32 on a CPU, re-quantized to MLX's 4 or 8-bit affine layers
on a GPU) is gguf.py's rule; `held_bits` says which width each source type keeps.
"""

import numpy as np

FLOAT_TYPES = ("F32", "F16", "BF16")
# Source types at or below about 4.5 bits a weight are held in 4 bits; wider ones in 8.
FOUR_BIT_TYPES = (
    "Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS",
    "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "Q1_0",
)  # fmt: skip
_OWN_DECODERS = ("Q8_K",)


def type_name(type_id: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"id {type_id}"


def block_layout(kind: str):
    """(values per block, bytes per block) of a tensor type, or None if unknown."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    member = GGMLQuantizationType.__members__.get(kind)
    return GGML_QUANT_SIZES.get(member) if member is not None else None


def decodable(kind: str) -> bool:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import _type_traits

    if kind in FLOAT_TYPES or kind in _OWN_DECODERS:
        return True
    member = GGMLQuantizationType.__members__.get(kind)
    return member is not None and member in _type_traits


def tensor_bytes(kind: str, shape: tuple) -> int:
    """Bytes a tensor of `shape` (row-major) takes; ValueError if the rows do not split into blocks."""
    layout = block_layout(kind)
    if layout is None:
        raise ValueError(f"unknown tensor type {kind}")
    block, size = layout
    elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if not shape or shape[-1] % block:
        raise ValueError(f"rows of {shape[-1] if shape else 0} values do not split into {kind} blocks of {block}")
    return elements // block * size


def _q8_k(rows: np.ndarray) -> np.ndarray:
    """Q8_K blocks of 292 bytes: an f32 scale, 256 int8 values, 16 int16 block sums (unused)."""
    blocks = rows.reshape(rows.shape[0], -1, 292)
    scale = blocks[..., :4].copy().view("<f4")
    return (scale * blocks[..., 4:260].view(np.int8)).reshape(rows.shape[0], -1)


def decode(raw: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    """The values of one tensor from its bytes (uint8), as float32 in row-major `shape`."""
    rows = raw.reshape(-1, tensor_bytes(kind, (shape[-1],)))
    if kind == "F32":
        values = rows.view("<f4")
    elif kind == "F16":
        values = rows.view("<f2").astype(np.float32)
    elif kind == "BF16":
        values = (rows.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif kind == "Q8_K":
        values = _q8_k(rows)
    else:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(rows, GGMLQuantizationType[kind])
    return np.asarray(values, dtype=np.float32).reshape(shape)


def held_bits(kind: str) -> int:
    """The MLX affine width a quantized source type keeps on a GPU (4 or 8)."""
    return 4 if kind in FOUR_BIT_TYPES else 8
