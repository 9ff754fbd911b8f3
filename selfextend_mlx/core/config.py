"""SelfExtend settings: group size G, neighbor window W, and the reach they give."""

from dataclasses import dataclass

import mlx.core as mx

DEFAULT_CHUNK_SIZE = 512
BACKENDS = ("auto", "explicit", "fused", "metal")


@dataclass(frozen=True)
class SelfExtendConfig:
    """How far-apart tokens are grouped.

    group_size (G): keys farther than `window` tokens away attend through position `pos // G`.
    window (W): keys closer than W tokens attend through their normal positions.
    chunk_size: queries handled at once inside attention; bounds prefill scores to
        heads x chunk_size x N per layer, whatever the caller feeds in.
    backend: "auto" (on a GPU fused prefill, and on Apple GPUs the Metal decode kernel;
        explicit scores on a CPU), "explicit" (the plain-MLX reference path everywhere), "fused"
        (one fused attention call per prefill chunk) or "metal" (the Metal kernel for decode
        steps and prefill alike). Every backend computes the same attention.
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

    def max_length(self, trained_context: int) -> int:
        """N_max = (L - W) * G + W: the longest input whose positions all stay below L."""
        if self.window >= trained_context:
            raise ValueError(
                f"window {self.window} must be smaller than the trained context {trained_context}"
            )
        return (trained_context - self.window) * self.group_size + self.window


def max_length(trained_context: int, group_size: int, window: int) -> int:
    return SelfExtendConfig(group_size, window).max_length(trained_context)


def smallest_group_size(trained_context: int, window: int, tokens: int) -> int:
    """The smallest G whose reach covers `tokens` (G=1 when the model already does)."""
    if window >= trained_context:
        raise ValueError(f"window {window} must be smaller than the trained context {trained_context}")
    if tokens <= trained_context:
        return 1
    span = trained_context - window
    return -(-(tokens - window) // span)  # ceil
