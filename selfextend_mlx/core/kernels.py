"""A fused SelfExtend attention kernel for Apple GPUs (mx.fast.metal_kernel).

One SIMD group per (batch, query head, query) walks the query's keys j <= i once with an
online softmax (running max and sum, as flash attention does), taking each key's score from
the grouped query against the grouped key (i - j >= W) or from the neighbor query against the
neighbor key. No score matrix is materialized, and the cache is read in place (strided).
A decode step is the one-query case; a prefill chunk runs all its queries in one launch.

The plain-MLX path in attention.py is the reference: `selfextend selftest` compares the two
on the user's machine. Where Metal is absent (Linux, CI), this kernel never runs.
"""

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
