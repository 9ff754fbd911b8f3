"""A fused SelfExtend attention kernel for Apple GPUs (mx.fast.metal_kernel).

One SIMD group per (batch, query head, query) walks the query's keys j <= i once with an
online softmax (running max and sum, as flash attention does), taking each key's score from
the grouped query against the grouped key (i - j >= W) or from the neighbor query against the
neighbor key. No score matrix is materialized, and the cache is read in place (strided).
A decode step is the one-query case; a prefill chunk runs all its queries in one launch.

The plain-MLX path in attention.py is the reference. Before its first use in a process, for
each dtype and head size, `kernel_verified` runs the kernel on a small random problem against
that path; a compile error or a disagreement disables it (one line on stderr) and the plain
path runs instead. `selfextend selftest` is the user's fuller check (larger problems, timings).
Where Metal is absent (Linux, CI), this kernel never runs.
"""

import sys
import threading

import mlx.core as mx

SIMD_WIDTH = 32

_SOURCE = """
    uint row = threadgroup_position_in_grid.x;  // (batch, query head, query), flattened
    uint lane = thread_index_in_simdgroup;
    int n_queries = q_neighbor_shape[2];
    int bh = row / n_queries;
    int b = bh / HQ;
    int hk = (bh % HQ) / (HQ / HKV);
    int position = params[0] + int(row % n_queries);
    int n_keys = position + 1;
    int grouped_end = metal::max(0, position - params[1] + 1);
    int neighbor_start = params[2];
    float scale = fparams[0];
    float softcap = fparams[1];

    float qn[D];
    float qg[D];
    for (int d = 0; d < D; d++) {
        qn[d] = scale * float(q_neighbor[row * D + d]);
        qg[d] = scale * float(q_grouped[row * D + d]);
    }
    const device T* kg = k_grouped + b * k_grouped_strides[0] + hk * k_grouped_strides[1];
    const device T* kn = k_neighbor + b * k_neighbor_strides[0] + hk * k_neighbor_strides[1];
    const device T* vv = values + b * values_strides[0] + hk * values_strides[1];

    float m = -INFINITY;
    float l = 0.0f;
    float acc[DV];
    for (int e = 0; e < DV; e++) {
        acc[e] = 0.0f;
    }
    for (int j = lane; j < n_keys; j += 32) {
        float s = 0.0f;
        if (j < grouped_end) {
            const device T* k = kg + j * k_grouped_strides[2];
            for (int d = 0; d < D; d++) {
                s += qg[d] * float(k[d]);
            }
        } else {
            const device T* k = kn + (j - neighbor_start) * k_neighbor_strides[2];
            for (int d = 0; d < D; d++) {
                s += qn[d] * float(k[d]);
            }
        }
        if (softcap > 0.0f) {
            s = metal::precise::tanh(s / softcap) * softcap;
        }
        float m_new = metal::max(m, s);
        float correction = metal::exp(m - m_new);
        float p = metal::exp(s - m_new);
        l = l * correction + p;
        const device T* v = vv + j * values_strides[2];
        for (int e = 0; e < DV; e++) {
            acc[e] = acc[e] * correction + p * float(v[e]);
        }
        m = m_new;
    }
    float m_all = simd_max(m);
    float correction = (m == -INFINITY) ? 0.0f : metal::exp(m - m_all);
    float l_all = simd_sum(l * correction);
    for (int e = 0; e < DV; e++) {
        float total = simd_sum(acc[e] * correction);
        if (lane == 0) {
            out[row * DV + e] = static_cast<T>(total / l_all);
        }
    }
"""

_kernel = None


def metal_available() -> bool:
    return mx.metal.is_available()


def selfextend_kernel_attention(qn, qg, kv, *, q_start: int, window: int, scale: float, softcap=None):
    """Queries at positions q_start, q_start+1, ...: qn, qg (B, Hq, L, D) rotated queries;
    kv: the keys and values as the cache hands them over (attention.CachedKV).
    Returns (B, Hq, L, Dv)."""
    global _kernel
    k_grouped, values, k_neighbor, neighbor_start = kv
    if _kernel is None:
        _kernel = mx.fast.metal_kernel(
            name="selfextend_attention",
            input_names=["q_neighbor", "q_grouped", "k_grouped", "k_neighbor", "values", "params", "fparams"],
            output_names=["out"],
            source=_SOURCE,
            ensure_row_contiguous=False,  # the cache is read in place through its strides
        )
    B, Hq, L, D = qn.shape
    Hkv, Dv = k_neighbor.shape[1], values.shape[-1]
    if k_grouped.shape[2] == 0:
        k_grouped = k_neighbor  # no query reaches a grouped key; the kernel still needs a buffer
    params = mx.array([q_start, window, neighbor_start], dtype=mx.int32)
    fparams = mx.array([scale, softcap or 0.0], dtype=mx.float32)
    (out,) = _kernel(
        inputs=[mx.contiguous(qn), mx.contiguous(qg), k_grouped, k_neighbor, values, params, fparams],
        template=[("T", values.dtype), ("D", D), ("DV", Dv), ("HQ", Hq), ("HKV", Hkv)],
        grid=(B * Hq * L * SIMD_WIDTH, 1, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[(B, Hq, L, Dv)],
        output_dtypes=[values.dtype],
    )
    return out


# -- the check before first use ---------------------------------------------------------------

# Largest |kernel - reference| accepted, by dtype: the same sums in another order, values of
# unit size; fp16 and bf16 round every input and output.
TOLERANCE = {mx.float32: 1e-3, mx.float16: 1e-2, mx.bfloat16: 5e-2}
_verified = {}  # (dtype, head size, value head size) -> bool, for this process
_lock = threading.Lock()


def _check_problem(dtype, head_dim: int, value_dim: int):
    """A small problem with every case the kernel distinguishes: grouped keys, the mixed band,
    neighbor keys, GQA (4 query heads on 2 key heads), one decode query and 5 prefill queries."""
    keys, window = 40, 8
    k1, k2, k3, k4, k5 = mx.random.split(mx.random.key(7), 5)
    normal = lambda shape, key: mx.random.normal(shape, key=key).astype(dtype)  # noqa: E731
    k_grouped, k_neighbor = normal((1, 2, keys, head_dim), k1), normal((1, 2, keys, head_dim), k2)
    values = normal((1, 2, keys, value_dim), k3)
    problems = []
    for n_queries in (1, 5):
        q_start = keys - n_queries
        neighbor_start = q_start - window + 1
        kv = (k_grouped[..., : keys - window, :], values, k_neighbor[..., neighbor_start:, :], neighbor_start)
        qn = normal((1, 4, n_queries, head_dim), k4) * head_dim**-0.5
        qg = normal((1, 4, n_queries, head_dim), k5) * head_dim**-0.5
        problems.append((qn, qg, kv, q_start, window))
    return problems


def _disagreement(dtype, head_dim: int, value_dim: int, reference):
    """None when the kernel agrees with `reference` on the check problem, else why not."""
    worst = 0.0
    try:
        for qn, qg, kv, q_start, window in _check_problem(dtype, head_dim, value_dim):
            for softcap in (None, 5.0):
                args = dict(q_start=q_start, window=window, softcap=softcap)
                fast = selfextend_kernel_attention(qn, qg, kv, scale=1.0, **args)
                expected = reference(qn, qg, kv, **args)
                error = mx.abs(fast.astype(mx.float32) - expected.astype(mx.float32)).max().item()
                worst = max(worst, error if error == error else float("inf"))  # NaN counts as wrong
    except Exception as e:  # a kernel that does not compile or launch here
        first_line = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first_line}"
    if worst > TOLERANCE.get(dtype, 5e-2):
        return f"max |difference| {worst:.2g} from the plain-MLX path"
    return None


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def kernel_verified(dtype, head_dim: int, value_dim: int, reference) -> bool:
    """Whether the kernel may run for this dtype and head sizes: checked once per process
    against `reference` (a callable with the kernel's signature, less `scale`: the plain-MLX
    path). A failure prints one line on stderr and keeps the kernel off for the process."""
    key = (dtype, head_dim, value_dim)
    with _lock:
        if key not in _verified:
            problem = _disagreement(dtype, head_dim, value_dim, reference)
            _verified[key] = problem is None
            if problem is not None:
                print(
                    f"selfextend: the Metal attention kernel failed its check for {dtype_name(dtype)}, head size "
                    f"{head_dim} ({problem}); using the plain-MLX path",
                    file=sys.stderr,
                    flush=True,
                )
        return _verified[key]
