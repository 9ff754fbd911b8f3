"""A fused SelfExtend decode kernel for Apple GPUs (mx.fast.metal_kernel).

One SIMD group per (batch, query head) walks the keys once with an online softmax
(running max and sum, as flash attention does), taking each key's score from the grouped
query against the grouped key (j < grouped_end) or from the neighbor query against the
neighbor key. No score vector is materialized, and the cache is read in place (strided).

The plain-MLX path in attention.py is the reference: `selfextend selftest` compares the two
on the user's machine. Where Metal is absent (Linux, CI), this kernel never runs.
"""

import time

import mlx.core as mx

SIMD_WIDTH = 32

_DECODE_SOURCE = """
    uint bh = threadgroup_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    int b = bh / HQ;
    int hk = (bh % HQ) / (HQ / HKV);
    int n_keys = values_shape[2];
    int grouped_end = params[0];
    int neighbor_start = params[1];
    float scale = fparams[0];
    float softcap = fparams[1];

    float qn[D];
    float qg[D];
    for (int d = 0; d < D; d++) {
        qn[d] = scale * float(q_neighbor[bh * D + d]);
        qg[d] = scale * float(q_grouped[bh * D + d]);
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
            out[bh * DV + e] = static_cast<T>(total / l_all);
        }
    }
"""

_decode_kernel = None


def metal_available() -> bool:
    return mx.metal.is_available()


def decode_attention(qn, qg, k_grouped, k_neighbor, neighbor_start, values, grouped_end, scale, softcap=None):
    """One decode step: qn, qg (B, Hq, 1, D) rotated queries (not scaled); keys and values as
    the cache returns them. Returns (B, Hq, 1, Dv)."""
    global _decode_kernel
    if _decode_kernel is None:
        _decode_kernel = mx.fast.metal_kernel(
            name="selfextend_decode",
            input_names=["q_neighbor", "q_grouped", "k_grouped", "k_neighbor", "values", "params", "fparams"],
            output_names=["out"],
            source=_DECODE_SOURCE,
            ensure_row_contiguous=False,  # the cache is read in place through its strides
        )
    B, Hq, _, D = qn.shape
    Hkv, Dv = k_grouped.shape[1], values.shape[-1]
    params = mx.array([grouped_end, neighbor_start], dtype=mx.int32)
    fparams = mx.array([scale, softcap or 0.0], dtype=mx.float32)
    (out,) = _decode_kernel(
        inputs=[mx.contiguous(qn), mx.contiguous(qg), k_grouped, k_neighbor, values, params, fparams],
        template=[("T", values.dtype), ("D", D), ("DV", Dv), ("HQ", Hq), ("HKV", Hkv)],
        grid=(B * Hq * SIMD_WIDTH, 1, 1),
        threadgroup=(SIMD_WIDTH, 1, 1),
        output_shapes=[(B, Hq, 1, Dv)],
        output_dtypes=[values.dtype],
    )
    return out
