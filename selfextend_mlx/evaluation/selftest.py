"""Check this machine's fast attention paths against the plain-MLX reference, and time them.

Run by `selfextend selftest`. Everywhere: the fused prefill call (forced, whichever way MLX
runs it here). On a Mac: the Metal kernel, decode and prefill, unguarded (this is where a
kernel that does not compile or disagrees shows, with its error). On a GPU, also what
`backend="auto"` really runs for each dtype and head size 64 and 128 (the routing table of
docs/benchmarks.md, the kernel's first-use check, MLX refusing a fused call), against the
explicit path in the same dtype.

A run is planned like every other command: selftest_memory() is what it holds (measured:
238 MB at 16k keys, 930 MB at 64k on CPU, within 2% of the estimate), and run_selftest()
refuses, in one line, a run the machine cannot hold, rather than a fixed largest --keys.
"""

import time
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..core import attention
from ..core.attention import CachedKV, choose_path, device_kind, rope_at, rope_grouped, selfextend_attention
from ..core.config import SelfExtendConfig
from ..core.kernels import TOLERANCE, kernel_verified, metal_available
from ..planning import MemoryEstimate, check_memory, machine_memory, score_block_bytes

GPU_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
GPU_HEAD_DIMS = (64, 128)
SHORT = {mx.float32: "fp32", mx.float16: "fp16", mx.bfloat16: "bf16"}


@dataclass
class Check:
    name: str
    max_error: Optional[float]  # None: could not run here
    reference_ms: float
    fast_ms: Optional[float]
    note: str = ""
    tolerance: float = 1e-3  # the largest max_error that counts as agreeing

    @property
    def ok(self) -> bool:
        return self.max_error is not None and self.max_error < self.tolerance


def median_ms(fn, repeats: int) -> float:
    """Median wall time of `fn` evaluated, after one warm-up run."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def _problem(n_keys, heads, kv_heads, head_dim, group_size, window, dtype, seed=0):
    """Random keys and values as a cache holds them, and an `attend(q, start, backend)` that
    runs queries at positions start.. against them as a cache would hand them over."""
    import mlx.nn as nn

    rope = nn.RoPE(head_dim, base=10000.0)
    k1, k2 = mx.random.split(mx.random.key(seed), 2)
    keys = mx.random.normal((1, kv_heads, n_keys, head_dim), key=k1).astype(dtype)
    values = mx.random.normal((1, kv_heads, n_keys, head_dim), key=k2).astype(dtype)
    k_grouped, k_neighbor = rope_grouped(rope, keys, 0, group_size), rope_at(rope, keys, 0)
    scale = head_dim**-0.5

    def attend(q, start, backend, chunk_size):
        config = SelfExtendConfig(group_size=group_size, window=window, chunk_size=chunk_size, backend=backend)
        end = start + q.shape[2]
        q_neighbor = rope_at(rope, q * scale, start)
        q_grouped = rope_grouped(rope, q * scale, start, group_size, config.shift)
        # neighbor keys from the window on, grouped keys up to it
        window_start = max(0, start - window + 1)
        grouped_end = max(window_start, end - window)
        kv = CachedKV(
            k_grouped[..., :grouped_end, :], values[..., :end, :], k_neighbor[..., window_start:end, :], window_start
        )
        return selfextend_attention(q_neighbor, q_grouped, kv, q_start=start, config=config)

    return attend


def selftest_memory(n_keys, heads=8, kv_heads=2, head_dim=64, prefill=128) -> MemoryEstimate:
    """What a run holds at its peak: keys, values and the keys' two rotations in fp32 (the
    "KV cache"), and the explicit reference's score blocks for one prefill chunk against
    every key (as planning counts a prefill step's)."""
    arrays = 4 * kv_heads * n_keys * head_dim * 4
    return MemoryEstimate(0, arrays, score_block_bytes(heads, prefill, n_keys), machine_memory())


def run_selftest(
    n_keys=4096, heads=8, kv_heads=2, head_dim=64, group_size=4, window=512, prefill=128, dtype=mx.float32, repeats=10
) -> list:
    check_memory(selftest_memory(n_keys, heads, kv_heads, head_dim, prefill))  # before anything is allocated
    k3, k4 = mx.random.split(mx.random.key(1), 2)
    checks = []

    def check(name, fast, reference, ref_ms, available=True, tolerance=1e-3, note=""):
        if not available:
            return Check(name, None, ref_ms, None, "no Metal GPU here: the plain-MLX path is used")
        try:
            error = mx.abs(fast().astype(mx.float32) - reference().astype(mx.float32)).max().item()
            error = error if error == error else float("inf")  # NaN is a mismatch
            return Check(name, error, ref_ms, median_ms(fast, repeats), note, tolerance)
        except Exception as e:  # a kernel that does not compile or run here is a failed check
            return Check(name, float("inf"), ref_ms, None, f"failed: {type(e).__name__}: {e}", tolerance)

    attend = _problem(n_keys, heads, kv_heads, head_dim, group_size, window, dtype)
    q_decode = mx.random.normal((1, heads, 1, head_dim), key=k3).astype(dtype)
    reference = lambda: attend(q_decode, n_keys - 1, "explicit", prefill)  # noqa: E731
    ref_ms = median_ms(reference, repeats)
    kernel = lambda: attend(q_decode, n_keys - 1, "metal", prefill)  # noqa: E731
    checks.append(check("decode: Metal kernel", kernel, reference, ref_ms, metal_available()))

    q_prefill = mx.random.normal((1, heads, prefill, head_dim), key=k4).astype(dtype)
    start = n_keys - prefill
    reference = lambda: attend(q_prefill, start, "explicit", prefill)  # noqa: E731
    ref_ms = median_ms(reference, repeats)
    fused = lambda: attend(q_prefill, start, "fused", prefill)  # noqa: E731
    checks.append(check("prefill: fused attention", fused, reference, ref_ms))
    kernel = lambda: attend(q_prefill, start, "metal", prefill)  # noqa: E731
    checks.append(check("prefill: Metal kernel", kernel, reference, ref_ms, metal_available()))

    if device_kind() != "cpu":
        for gpu_dtype in GPU_DTYPES:
            for dim in GPU_HEAD_DIMS:
                checks += _auto_checks(n_keys, heads, kv_heads, dim, group_size, window, prefill, gpu_dtype, check)
    return checks


def _auto_checks(n_keys, heads, kv_heads, head_dim, group_size, window, prefill, dtype, check) -> list:
    """What backend="auto" runs for a decode step and a prefill chunk of this shape, against
    the explicit path in the same dtype; the name says which path the routing picked."""
    attend = _problem(n_keys, heads, kv_heads, head_dim, group_size, window, dtype, seed=2)
    k1, k2 = mx.random.split(mx.random.key(3), 2)
    checks = []
    for kind, queries, key in (("decode", 1, k1), ("prefill", prefill, k2)):
        q = mx.random.normal((1, heads, queries, head_dim), key=key).astype(dtype)
        start = n_keys - queries
        path = choose_path(head_dim=head_dim, dtype=dtype, queries=queries, device=device_kind())
        reference = lambda q=q, start=start: attend(q, start, "explicit", prefill)  # noqa: E731
        ref_ms = median_ms(reference, 3)
        auto = lambda q=q, start=start: attend(q, start, "auto", prefill)  # noqa: E731
        result = check(
            f"{kind} {SHORT[dtype]} D{head_dim}: {path}", auto, reference, ref_ms, tolerance=TOLERANCE[dtype]
        )
        if path == "metal" and not kernel_verified(dtype, head_dim, head_dim, attention._explicit_reference):
            result.note = "the kernel failed its first-use check: the explicit path ran"
        elif path == "fused" and (head_dim, dtype) in attention._unfused:
            result.note = "MLX refused the fused call: the explicit path ran"
        checks.append(result)
    return checks
