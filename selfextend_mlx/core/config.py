"""SelfExtend settings: group size G, neighbor window W, and how attention is computed.

Which G and W a run should use, and how far they reach, is planning's rule
(selfextend_mlx.planning)."""

from dataclasses import dataclass

import mlx.core as mx

from ..defaults import ATTENTION_CHUNK as DEFAULT_CHUNK_SIZE

BACKENDS = ("auto", "explicit", "fused", "metal")


@dataclass(frozen=True)
class SelfExtendConfig:
    """How far-apart tokens are grouped.

    group_size (G): keys farther than `window` tokens away attend through position `pos // G`.
    window (W): keys closer than W tokens attend through their normal positions.
    chunk_size: queries handled at once inside attention; bounds prefill scores to
        heads x chunk_size x N per layer, whatever the caller feeds in. A run planned by
        selfextend_mlx.planning gets the chunk its score budget allows at the planned length
        (planning.attention_chunk_size).
    backend: "auto" (per step, the path attention.choose_path picks from MLX's own routing: on
        Apple GPUs the Metal kernel for up to 8 queries, checked against the explicit path at
        first use; one fused attention call for prefill where MLX really runs it fused; the
        explicit scores otherwise, and always on a CPU), or one path forced for every step,
        unchecked: "explicit" (the plain-MLX reference), "fused" (one scaled_dot_product_attention
        call per prefill chunk, whichever way MLX runs it) or "metal" (the Metal kernel, decode
        and prefill). Every backend computes the same attention.
    """

    group_size: int
    window: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    backend: str = "auto"

    def __post_init__(self):
        for name in ("group_size", "window", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "metal" and not mx.metal.is_available():
            raise ValueError("backend 'metal' needs an Apple GPU (Metal is not available here)")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    @property
    def shift(self) -> int:
        """Added to grouped query positions so both regimes meet at distance W."""
        return self.window - self.window // self.group_size
