"""Perplexity by position bucket of one long text, scored chunk by chunk through the cache."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from ..core.prefill import prefill
from ..errors import EvaluationError
from .common import chunk_progress, new_cache

DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class Bucket:
    """Target positions [start, end): the tokens predicted there, and their summed NLL (nats)."""

    start: int
    end: int
    nll_sum: float
    count: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.count) if self.count else float("nan")


def token_nll(
    model,
    tokens: Sequence[int],
    cache: list,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: Optional[Callable[[int], None]] = None,
) -> np.ndarray:
    """NLL of tokens[1:] given everything before them; entry t-1 belongs to target position t.

    Memory stays at one chunk's logits: each chunk is scored as soon as it is computed.
    """
    if len(tokens) < 2:
        raise EvaluationError("perplexity needs at least 2 tokens")
    nll = np.empty(len(tokens) - 1, dtype=np.float64)
    targets = mx.array(list(tokens[1:]))

    def score(start: int, logits: mx.array):
        chunk_targets = targets[start : start + logits.shape[0]]
        logits = logits.astype(mx.float32)
        picked = mx.take_along_axis(logits, chunk_targets[:, None], axis=-1)[:, 0]
        values = mx.logsumexp(logits, axis=-1) - picked
        nll[start : start + logits.shape[0]] = np.array(values, dtype=np.float64)

    # The last token is only ever a target, never an input.
    progress = None if on_chunk is None else chunk_progress(on_chunk)
    prefill(model, cache, tokens[:-1], step=chunk_size, on_logits=score, on_progress=progress)
    return nll


def bucket_edges(total: int, edges: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """[start, end) ranges covering positions 0..total.

    `edges` are the bucket boundaries (e.g. 512, 1024, 2048); by default they double from 512.
    Boundaries at or past `total` are dropped and `total` closes the last bucket.
    """
    if total < 2:
        raise EvaluationError("perplexity needs at least 2 tokens")
    if edges is None:
        edges, edge = [], 512
        while edge < total:
            edges.append(edge)
            edge *= 2
    edges = list(edges)
    if any(b <= a for a, b in zip(edges, edges[1:])) or (edges and edges[0] <= 0):
        raise EvaluationError(f"bucket edges must be positive and increasing, got {edges}")
    bounds = [0] + [e for e in edges if e < total] + [total]
    return list(zip(bounds, bounds[1:]))


def bucket_perplexity(nll: np.ndarray, ranges: Sequence[tuple[int, int]]) -> list[Bucket]:
    """Group per-target NLLs into position buckets (position 0 is never a target)."""
    buckets = []
    for start, end in ranges:
        values = nll[max(start, 1) - 1 : end - 1]
        buckets.append(Bucket(start, end, float(values.sum()), int(values.size)))
    return buckets


def perplexity_buckets(
    model,
    tokens: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    kv_bits: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_chunk: Optional[Callable[[int], None]] = None,
) -> list[Bucket]:
    """Score `tokens` with a fresh cache (SelfExtend or plain, as the model is now)."""
    nll = token_nll(model, tokens, new_cache(model, kv_bits), chunk_size, on_chunk)
    return bucket_perplexity(nll, ranges)
