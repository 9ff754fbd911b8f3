"""SelfExtend attention in plain MLX: the tested reference path.

For a query at position i and a key at position j <= i (distance d = i - j):
  d <  W: score = scale * <rope(q, i), rope(k, j)>                      (neighbor)
  d >= W: score = scale * <rope(q, i // G + W - W // G), rope(k, j // G)>  (grouped)
and one softmax over both. Keys arrive already rotated from the cache (grouped before the
window, neighbor within it); a step's new queries and keys are rotated at both their
positions by `rotate_queries_and_keys`, in one call of the model's rope.

Queries are taken in chunks of `config.chunk_size`. For a chunk [a, b), every key
j <= a - W is grouped for every query, so only the last C - 1 + W keys need neighbor scores
(and, for the C - 1 of them in between, a choice per query). Scores per layer stay
O(heads x chunk x N), one matrix per chunk as in plain attention.
"""

import sys
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from .config import SelfExtendConfig
from .kernels import dtype_name, kernel_verified, selfextend_kernel_attention


def rope_at(rope, x: mx.array, positions) -> mx.array:
    """Rotate x (B, H, L, D) with the model's own rope: at `positions` + t for an int, or at
    each given position for an (L,) array."""
    if isinstance(positions, int):
        return rope(x, offset=positions)
    B, H, L, D = x.shape
    # mx.fast.rope takes one offset per leading row: put each token on its own row.
    rows = x.transpose(2, 0, 1, 3).reshape(L, B * H, 1, D)
    rows = rope(rows, offset=positions)
    return rows.reshape(L, B, H, D).transpose(1, 2, 0, 3)


def rotate_further(rope, x: mx.array, deltas: mx.array) -> mx.array:
    """Rotate already-rotated x by `deltas` more positions (rotations add up). Ropes that also
    scale their input (yarn, longrope mscale) would scale twice: divide that back out."""
    amplitude = rope(mx.ones((1, 1, 1, x.shape[-1]), x.dtype), offset=0)
    return rope_at(rope, x, deltas) / amplitude


def grouped_positions(start: int, length: int, group_size: int, shift: int = 0) -> mx.array:
    return mx.arange(start, start + length) // group_size + shift


def rope_grouped(rope, x: mx.array, start: int, group_size: int, shift: int = 0) -> mx.array:
    """Rotate tokens at absolute positions start.. to their grouped positions p // G + shift."""
    L = x.shape[2]
    if group_size == 1 or L == 1:
        return rope_at(rope, x, start // group_size + shift)
    return rope_at(rope, x, grouped_positions(start, L, group_size, shift))


def rotate_queries_and_keys(rope, q: mx.array, k: mx.array, start: int, config: SelfExtendConfig):
    """(q at i, q at i // G + shift, k at j, k at j // G) for tokens at start, start+1, ...

    One call of the rope for all four: on a CPU a rope call is a few dozen MLX operations
    whatever its size, which made the extra rotations most of a decode step's overhead.
    Every (head, token) row gets its own offset.
    """
    if config.group_size == 1:
        q, k = rope(q, offset=start), rope(k, offset=start)
        return q, q, k, k
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    positions = np.arange(start, start + L, dtype=np.int32)
    grouped = positions // config.group_size
    per_batch = [
        np.tile(p, h) for p, h in ((positions, Hq), (grouped + config.shift, Hq), (positions, Hkv), (grouped, Hkv))
    ]
    offsets = mx.array(np.tile(np.concatenate(per_batch), B))
    rows = mx.concatenate([q, q, k, k], axis=1)
    rotated = rope(rows.reshape(-1, 1, 1, D), offset=offsets).reshape(rows.shape)
    cuts = (Hq, 2 * Hq, 2 * Hq + Hkv)
    return (rotated[:, : cuts[0]], rotated[:, cuts[0] : cuts[1]], rotated[:, cuts[1] : cuts[2]], rotated[:, cuts[2] :])


# Keys and values are plain arrays, or (packed, scales, biases) triples in a quantized cache.


class CachedKV(NamedTuple):
    """What a step's queries at [q_start, end) attend to, as a cache hands it over.

    grouped_keys: keys rotated at j // G for positions [0, g), g >= max(0, q_start - W + 1,
        end - W): every key grouped for at least one query (a cache keeps no grouped forms
        of the window's keys).
    values: for positions [0, end).
    neighbor_keys: keys rotated at j for positions [neighbor_start, end).
    neighbor_start: at most max(0, q_start - W + 1), so a full window is there.
    """

    grouped_keys: object
    values: object
    neighbor_keys: mx.array
    neighbor_start: int


def seq_slice(x, start: int, end: int):
    if isinstance(x, tuple):
        return tuple(part[..., start:end, :] for part in x)
    return x[..., start:end, :]


def seq_length(x) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[2]


def _scores(q, keys, quant):
    """q (B, Hkv, rep*C, D) against keys (B, Hkv, N, D) -> (B, Hkv, rep*C, N) in fp32.
    The query heads sharing a key head are stacked as rows: no broadcast copies of the keys."""
    if isinstance(keys, tuple):
        s = mx.quantized_matmul(q, *keys, transpose=True, group_size=quant[0], bits=quant[1])
    else:
        s = q @ keys.swapaxes(-1, -2)
    return s if s.dtype == mx.float32 else s.astype(mx.float32)


def _weighted(p, values, quant):
    if isinstance(values, tuple):
        return mx.quantized_matmul(p, *values, transpose=False, group_size=quant[0], bits=quant[1])
    return p @ values


def _softcap(s, cap):
    return s if cap is None else mx.tanh(s / cap) * cap


def _attend_chunk(qn, qg, *, a: int, b: int, kv: CachedKV, config: SelfExtendConfig, softcap, quant):
    """Queries at positions [a, b) against keys [0, b); q* are (B, Hkv, rep*C, D), pre-scaled.

    Keys before the band [a-W+1, b-W) are grouped for every query, keys in it need both
    scores and a choice per query, and the last W keys [b-W, b) are neighbors of every query
    (or in its future). A decode step (C = 1) has no band: its grouped and neighbor score rows
    are joined. A prefill chunk builds one score matrix, as plain attention does: grouped
    scores against the grouped keys followed by the last W neighbor keys, then the band and
    the last W columns written over in place.
    """
    k_grouped, values, k_neighbor, neighbor_start = kv
    W, C = config.window, b - a
    band_start = max(0, a - W + 1)
    near_start = max(band_start, b - W)

    def by_query(scores):
        # rows are (rep, C): a 5-d view lets a (C, keys) mask broadcast over the heads
        B, H, rows, n = scores.shape
        return scores.reshape(B, H, rows // C, C, n)

    def neighbor_keys(start, end):
        return k_neighbor[..., start - neighbor_start : end - neighbor_start, :]

    def neighbor_scores(start, end):
        return _softcap(_scores(qn, neighbor_keys(start, end), None), softcap)

    near = neighbor_scores(near_start, b)
    if C == 1:
        if near_start == 0:
            scores = near
        else:
            grouped = _softcap(_scores(qg, seq_slice(k_grouped, 0, near_start), quant), softcap)
            scores = mx.concatenate([grouped, near], axis=-1)
    else:
        keys = neighbor_keys(near_start, b)
        if near_start > 0:
            grouped_keys = seq_slice(k_grouped, 0, near_start)
            if quant is not None:  # joined with full-precision neighbor keys below
                grouped_keys = mx.dequantize(*grouped_keys, group_size=quant[0], bits=quant[1]).astype(qn.dtype)
            # The last W columns (grouped queries against neighbor keys) are replaced below.
            keys = mx.concatenate([grouped_keys, keys], axis=2)
        scores = _softcap(_scores(qg, keys, None), softcap)
        queries = mx.arange(a, b)[:, None]
        if near_start > band_start:
            # The band's grouped scores from their own small matmul: a view of `scores` kept
            # alive here would stop the writes below from happening in place.
            grouped = _softcap(_scores(qg, keys[..., band_start:near_start, :], None), softcap)
            neighbor = neighbor_scores(band_start, near_start)
            d = queries - mx.arange(band_start, near_start)[None]
            band = mx.where(d >= 0, mx.where(d < W, by_query(neighbor), by_query(grouped)), -mx.inf)
            scores[..., band_start:near_start] = band.reshape(neighbor.shape)
        causal = queries >= mx.arange(near_start, b)[None]
        scores[..., near_start:b] = mx.where(causal, by_query(near), -mx.inf).reshape(near.shape)
    p = mx.softmax(scores, axis=-1, precise=True)
    if quant is None and p.dtype != qn.dtype:
        p = p.astype(qn.dtype)
    out = _weighted(p, seq_slice(values, 0, b), quant)
    return out if out.dtype == qn.dtype else out.astype(qn.dtype)


def _fused_keys(kv: CachedKV, end: int, pad_values: bool):
    """Keys and values for one fused call covering a whole step: every grouped key the cache
    handed over as [0 | k_grouped], then every neighbor key as [k_neighbor | 0]. Each dot
    product with a query [q_neighbor | q_grouped] then picks one score source; a mask keeps,
    per query, the form its distance needs. Built once per step, not per chunk: the copies of
    the keys are what the fused call costs beyond plain attention. `pad_values` widens the
    values to the query's head size with zeros, for kernels that need equal head sizes."""
    k_grouped, values, k_neighbor, neighbor_start = kv
    g = seq_length(k_grouped)
    keys = mx.concatenate(
        [
            mx.concatenate([mx.zeros_like(k_grouped), k_grouped], axis=-1),
            mx.concatenate([k_neighbor, mx.zeros_like(k_neighbor)], axis=-1),
        ],
        axis=2,
    )
    vals = mx.concatenate([values[..., :g, :], values[..., neighbor_start:end, :]], axis=2)
    if pad_values:
        vals = mx.concatenate([vals, mx.zeros_like(vals)], axis=-1)
    return keys, vals


def _attend_chunk_fused(q, keys, values, *, a: int, b: int, kv: CachedKV, config: SelfExtendConfig, force: bool):
    """Queries at positions [a, b), q = [q_neighbor | q_grouped] (B, Hq, C, 2D) pre-scaled,
    against _fused_keys: one scaled_dot_product_attention call, no C x N score matrix when MLX
    runs it fused. `force` makes MLX raise (ValueError) rather than take its unfused fallback."""
    W, g = config.window, seq_length(kv.grouped_keys)
    end = kv.neighbor_start + kv.neighbor_keys.shape[2]
    queries = mx.arange(a, b)[:, None]
    d_grouped = queries - mx.arange(g)[None]
    d_neighbor = queries - mx.arange(kv.neighbor_start, end)[None]
    mask = mx.concatenate([d_grouped >= W, (d_neighbor >= 0) & (d_neighbor < W)], axis=-1)
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask, force_fused=force)


# -- which path computes a step ----------------------------------------------------------------
# docs/benchmarks.md ("GPU paths") has this table with the MLX source lines each rule follows.

EXPLICIT, FUSED, METAL = "explicit", "fused", "metal"
# MLX runs up to 8 queries through its vector kernels, more through full attention.
VECTOR_QUERIES = 8
# Metal full attention runs fused only for equal query and value head sizes among these; for
# 192 and 256 MLX takes its unfused path for prefill anyway.
METAL_FUSED_HEAD_SIZES = (64, 72, 80, 96, 128)
# CUDA runs it fused through cuDNN: fp16/bf16, query and value head sizes multiples of 8 up to 128.
CUDA_FUSED_DTYPES = (mx.float16, mx.bfloat16)
CUDA_FUSED_MAX_HEAD_SIZE = 128

_unfused = set()  # (head size, dtype) whose fused call MLX refused in this process


def device_kind() -> str:
    """Where the default device runs: "metal", "cuda" or "cpu"."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "cpu"


def choose_path(*, head_dim: int, dtype, queries: int, device: str) -> str:
    """The path for `queries` queries of head size `head_dim` in `dtype` on `device`: the
    Metal kernel (Apple GPUs, up to VECTOR_QUERIES queries), one fused attention call where
    MLX really runs it fused (its query is [q_neighbor | q_grouped], head size 2D), else the
    explicit scores. A pure function of its arguments, so the table is tested anywhere."""
    wide = 2 * head_dim
    if device == "metal":
        if queries <= VECTOR_QUERIES:
            return METAL
        return FUSED if wide in METAL_FUSED_HEAD_SIZES else EXPLICIT
    if device == "cuda" and queries > 1:
        fits = wide % 8 == 0 and wide <= CUDA_FUSED_MAX_HEAD_SIZE
        return FUSED if fits and dtype in CUDA_FUSED_DTYPES else EXPLICIT
    return EXPLICIT


def _path(config: SelfExtendConfig, queries: int, head_dim: int, value_dim: int, dtype, softcap, quant) -> str:
    """The path for this step: the configured backend, or on "auto" the routing table, less
    what the step cannot take (quantized keys: explicit only; soft-capping: not fused) and what
    failed in this process (a Metal kernel that failed its check, a fused call MLX refused)."""
    if config.backend != "auto":  # forced, as tests and selftest do: no table, no checks
        unfit = quant is not None or (config.backend == FUSED and (queries == 1 or softcap is not None))
        return EXPLICIT if unfit else config.backend
    if quant is not None:
        return EXPLICIT
    path = choose_path(head_dim=head_dim, dtype=dtype, queries=queries, device=device_kind())
    if path == FUSED and (softcap is not None or (head_dim, dtype) in _unfused):
        return EXPLICIT
    if path == METAL and not kernel_verified(dtype, head_dim, value_dim, _explicit_reference):
        return EXPLICIT
    return path


def _explicit_reference(qn, qg, kv, *, q_start: int, window: int, softcap=None):
    """The plain-MLX path the Metal kernel is checked against (kernels.kernel_verified)."""
    config = SelfExtendConfig(group_size=2, window=window, backend=EXPLICIT)
    return selfextend_attention(qn, qg, CachedKV(*kv), q_start=q_start, config=config, softcap=softcap)


def _refuse_fused(head_dim: int, dtype, error: Exception) -> None:
    _unfused.add((head_dim, dtype))
    reason = str(error).split(": ", 1)[-1]
    print(
        f"selfextend: MLX has no fused attention for head size {2 * head_dim} in {dtype_name(dtype)} here ({reason}); "
        "prefill uses the explicit path",
        file=sys.stderr,
        flush=True,
    )


def selfextend_attention(
    q_neighbor: mx.array,
    q_grouped: mx.array,
    kv: CachedKV,
    *,
    q_start: int,
    config: SelfExtendConfig,
    softcap: Optional[float] = None,
    quant: Optional[tuple] = None,
) -> mx.array:
    """Attention output (B, Hq, L, Dv) for queries at positions q_start, q_start+1, ...

    q_neighbor, q_grouped: the queries rotated at i and at i // G + shift (see
        rotate_queries_and_keys), already multiplied by the attention scale.
    kv: the keys and values they attend to (see CachedKV).
    quant: (group_size, bits) when kv's grouped keys and values are quantized triples.
    """
    B, Hq, L, D = q_neighbor.shape
    Hkv = kv.neighbor_keys.shape[1]
    rep = Hq // Hkv
    end = q_start + L
    if kv.neighbor_start > max(0, q_start - config.window + 1):
        raise ValueError("the neighbor keys do not reach back a full window")
    if seq_length(kv.grouped_keys) < max(0, q_start - config.window + 1, end - config.window):
        raise ValueError("the grouped keys do not reach the window")

    every_key_neighbor = config.group_size == 1 or end <= config.window
    if quant is None and softcap is None and kv.neighbor_start == 0 and every_key_neighbor:
        # Every distance is neighbor (or G == 1 makes both the same): plain attention.
        mask = "causal" if L > 1 else None
        return mx.fast.scaled_dot_product_attention(q_neighbor, kv.neighbor_keys, kv.values, scale=1.0, mask=mask)

    value_dim = D if quant is not None else kv.values.shape[-1]  # quantized values are packed triples
    path = _path(config, L, D, value_dim, q_neighbor.dtype, softcap, quant)
    if path == METAL:
        return selfextend_kernel_attention(
            q_neighbor, q_grouped, kv, q_start=q_start, window=config.window, scale=1.0, softcap=softcap
        )
    if path == FUSED:
        out = _attend_fused(q_neighbor, q_grouped, kv, q_start=q_start, config=config)
        if out is not None:
            return out

    outputs = []
    for a in range(q_start, end, config.chunk_size):
        b = min(end, a + config.chunk_size)
        qn, qg = (
            x[:, :, a - q_start : b - q_start, :].reshape(B, Hkv, rep * (b - a), D) for x in (q_neighbor, q_grouped)
        )
        out = _attend_chunk(qn, qg, a=a, b=b, kv=kv, config=config, softcap=softcap, quant=quant)
        outputs.append(out.reshape(B, Hq, b - a, -1))
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)


def _attend_fused(q_neighbor, q_grouped, kv: CachedKV, *, q_start: int, config: SelfExtendConfig):
    """A step as fused calls, one per chunk, keys built once; None when MLX refused to run it
    fused (auto routing only: it asks with force_fused) and the explicit path should."""
    D, Dv = q_neighbor.shape[-1], kv.values.shape[-1]
    end = q_start + q_neighbor.shape[2]
    keys, values = _fused_keys(kv, end, pad_values=device_kind() == "metal" and Dv != 2 * D)
    q = mx.concatenate([q_neighbor, q_grouped], axis=-1)
    force = config.backend == "auto"  # the table said fused: never MLX's unfused fallback
    outputs = []
    try:
        for a in range(q_start, end, config.chunk_size):
            b = min(end, a + config.chunk_size)
            chunk = q[:, :, a - q_start : b - q_start]
            out = _attend_chunk_fused(chunk, keys, values, a=a, b=b, kv=kv, config=config, force=force)
            outputs.append(out[..., :Dv])
    except ValueError as error:
        if not force:
            raise
        _refuse_fused(D, q_neighbor.dtype, error)
        return None
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
