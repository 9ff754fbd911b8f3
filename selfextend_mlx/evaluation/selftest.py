"""Check this machine's fast attention paths against the plain-MLX reference, and time them.

Run by `selfextend selftest`: on a Mac it is the only place the Metal kernel (decode and
prefill) meets the reference; everywhere it also checks the fused prefill path.
"""

import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..core.attention import CachedKV, rope_at, rope_grouped, selfextend_attention
from ..core.config import SelfExtendConfig
from ..core.kernels import metal_available


@dataclass
class Check:
    name: str
    max_error: Optional[float]  # None: could not run here
    reference_ms: float
    fast_ms: Optional[float]
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_error is not None and self.max_error < 1e-3


def median_ms(fn, repeats: int) -> float:
    """Median wall time of `fn` evaluated, after one warm-up run."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def run_selftest(
    n_keys=4096, heads=8, kv_heads=2, head_dim=64, group_size=4, window=512, prefill=128, dtype=mx.float32, repeats=10
) -> list:
    import mlx.nn as nn

    rope = nn.RoPE(head_dim, base=10000.0)
    key = mx.random.key(0)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    keys = mx.random.normal((1, kv_heads, n_keys, head_dim), key=k1).astype(dtype)
    values = mx.random.normal((1, kv_heads, n_keys, head_dim), key=k2).astype(dtype)
    k_grouped, k_neighbor = rope_grouped(rope, keys, 0, group_size), rope_at(rope, keys, 0)
    scale = head_dim**-0.5
    checks = []

    def attend(q, start, backend):
        config = SelfExtendConfig(group_size=group_size, window=window, chunk_size=prefill, backend=backend)
        end = start + q.shape[2]
        q_neighbor = rope_at(rope, q * scale, start)
        q_grouped = rope_grouped(rope, q * scale, start, group_size, config.shift)
        # as a cache hands them over: neighbor keys from the window on, grouped keys up to it
        window_start = max(0, start - window + 1)
        grouped_end = max(window_start, end - window)
        kv = CachedKV(
            k_grouped[..., :grouped_end, :], values[..., :end, :], k_neighbor[..., window_start:end, :], window_start
        )
        return selfextend_attention(q_neighbor, q_grouped, kv, q_start=start, config=config)

    def check(name, fast, reference, ref_ms, available=True):
        if not available:
            return Check(name, None, ref_ms, None, "no Metal GPU here: the plain-MLX path is used")
        try:
            error = mx.abs(fast().astype(mx.float32) - reference().astype(mx.float32)).max().item()
            return Check(name, error, ref_ms, median_ms(fast, repeats))
        except Exception as e:  # a kernel that does not compile or run here is a failed check
            return Check(name, float("inf"), ref_ms, None, f"failed: {type(e).__name__}: {e}")

    q_decode = mx.random.normal((1, heads, 1, head_dim), key=k3).astype(dtype)
    reference = lambda: attend(q_decode, n_keys - 1, "explicit")  # noqa: E731
    ref_ms = median_ms(reference, repeats)
    checks.append(
        check(
            "decode: Metal kernel", lambda: attend(q_decode, n_keys - 1, "metal"), reference, ref_ms, metal_available()
        )
    )

    q_prefill = mx.random.normal((1, heads, prefill, head_dim), key=k4).astype(dtype)
    start = n_keys - prefill
    reference = lambda: attend(q_prefill, start, "explicit")  # noqa: E731
    ref_ms = median_ms(reference, repeats)
    checks.append(check("prefill: fused attention", lambda: attend(q_prefill, start, "fused"), reference, ref_ms))
    checks.append(
        check("prefill: Metal kernel", lambda: attend(q_prefill, start, "metal"), reference, ref_ms, metal_available())
    )
    return checks
