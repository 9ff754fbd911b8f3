"""Where the model runs and in which dtype.

On a GPU (Metal or CUDA) weights stay as stored, quantized layers included. On a CPU MLX
has no fast low-precision kernels: fp16/bf16 and quantized matmuls there are far slower than
fp32 through BLAS, so weights are dequantized to fp32 at load unless the user asks otherwise.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import SettingsError
from .blas import OPT_OUT, find_openblas, loaded_blas

# What `dtype=` accepts. "native" keeps the stored dtypes and quantized layers.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "native": None}
ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "bf16": "bfloat16"}


def gpu_name() -> Optional[str]:
    """'Metal' or 'CUDA' when MLX has that GPU, else None."""
    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "CUDA"
    return None


def resolve_dtype(requested: Optional[str] = None) -> str:
    """The dtype name to compute in: the user's, else fp32 on CPU and native on a GPU."""
    if requested is None:
        return "native" if gpu_name() else "float32"
    name = ALIASES.get(str(requested).lower(), str(requested).lower())
    if name not in DTYPES:
        raise SettingsError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)}")
    return name


def dequantize(model: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """Replace quantized linear and embedding layers by plain ones in `dtype`, in place."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            plain = nn.Linear(1, 1, bias="bias" in module)
        elif isinstance(module, nn.QuantizedEmbedding):
            plain = nn.Embedding(1, 1)
        else:
            continue
        scales, biases = module.scales, module.get("biases")
        # Float scales go up first so the dequantized weights are not rounded to fp16/bf16.
        if mx.issubdtype(scales.dtype, mx.floating):
            scales = scales.astype(mx.float32)
            biases = biases.astype(mx.float32) if biases is not None else None
        plain.weight = mx.dequantize(
            module.weight, scales, biases, module.group_size, module.bits, getattr(module, "mode", "affine")
        ).astype(dtype)
        if "bias" in module:
            plain.bias = module.bias
        replacements.append((name, plain))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return model


def apply_dtype(model: nn.Module, dtype_name: str) -> nn.Module:
    """Put a loaded model in the compute dtype `dtype_name` ('native' leaves it alone)."""
    dtype = DTYPES[dtype_name]
    if dtype is None:
        return model
    dequantize(model, dtype)
    model.set_dtype(dtype)  # floating parameters only
    mx.eval(model.parameters())
    return model


def activation_bytes(model: nn.Module) -> int:
    """Bytes per activation element (and so per cached key or value): the model's float dtype."""
    sizes = {v.dtype.size for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)}
    return min(sizes) if sizes else 4


def blas_name() -> str:
    name = loaded_blas()
    return {"openblas": "OpenBLAS", "accelerate": "Accelerate", "reference": "reference BLAS"}.get(name, name)


def describe_runtime(dtype_name: Optional[str] = None) -> str:
    """One line: where it runs, which BLAS, which dtype; with a hint when the CPU path is slow."""
    dtype_name = dtype_name or resolve_dtype()
    weights = "native weights" if dtype_name == "native" else dtype_name
    gpu = gpu_name()
    if gpu:
        return f"{gpu} GPU, {weights}"
    line = f"CPU, {blas_name()}, {weights}"
    if loaded_blas() == "reference":
        library = find_openblas()
        if library is None:
            line += " (slow: install OpenBLAS, e.g. apt-get install libopenblas0-pthread)"
        elif os.environ.get(OPT_OUT):
            line += f" (slow: {OPT_OUT} is set, so the installed OpenBLAS is not used)"
        else:
            line += f" (slow: run through `selfextend`, or with LD_PRELOAD={library})"
    return line
