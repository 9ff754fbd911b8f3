"""One decode step for several requests at once, each with its own KV cache.

The model runs on a batch of B single-token rows: embeddings, norms, MLPs and the vocabulary
projection see all B rows together. Attention is the one part that depends on a request's
cache (its length, its positions, SelfExtend's grouped keys), so every attention module takes
the rows apart: row i goes through the module's own __call__ (plain mlx-lm attention or the
SelfExtend patch, whichever is installed) with request i's cache for that layer, exactly as a
one-request step would, and the rows' outputs are joined again. Requests may therefore hold
caches of any length, and SelfExtend's positions stay per request.

Contract: a step for B = 1 is the one-request step itself (the model is called with the
request's own cache list). For B > 1 the attention of each row is computed by the same
operations as alone; only the shared matmuls see B rows, which can change their last bits.
"""

from collections.abc import Sequence
from contextlib import contextmanager

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention

from .families import llama
from .families.heads import split_heads
from .patch import layer_attention, selfextend_config_of, selfextend_rows

_row_classes = {}


class RowCaches:
    """The `cache` a layer gets in a batched step: one cache per row (request), in row order."""

    def __init__(self, caches: Sequence):
        self.caches = list(caches)

    def make_mask(self, N, return_array=False, window_size=None):
        """Masks are per row, built by each row's own attention; a decode step (N = 1) has none."""
        if N != 1:
            raise ValueError("a batched step takes one token per request")
        return None

    def __len__(self) -> int:
        return len(self.caches)


def _rows_call(self, x, mask=None, cache=None):
    base = self._rows_base
    if not isinstance(cache, RowCaches):
        return base.__call__(self, x, mask, cache)
    if x.shape[0] != len(cache):
        raise ValueError(f"{x.shape[0]} rows for {len(cache)} caches")
    if selfextend_config_of(self) is not None:
        return selfextend_rows(self, x, cache.caches)
    if base in llama.ATTENTION:  # mlx-lm's own class, unpatched
        return _plain_llama_rows(self, x, cache.caches)
    rows = [base.__call__(self, x[i : i + 1], None, c) for i, c in enumerate(cache.caches)]
    return mx.concatenate(rows, axis=0)


def _plain_llama_rows(attention, x, caches):
    """mlx-lm's llama / qwen2 / gemma attention (those three are written alike) for a batch of
    single-token rows: projections on all rows at once, rope, cache and attention per row with
    the very operations of the module's own __call__."""
    q = split_heads(attention.q_proj(x), attention.n_heads)
    k = split_heads(attention.k_proj(x), attention.n_kv_heads)
    v = split_heads(attention.v_proj(x), attention.n_kv_heads)
    rows = []
    for i, cache in enumerate(caches):
        queries = attention.rope(q[i : i + 1], offset=cache.offset)
        keys = attention.rope(k[i : i + 1], offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, v[i : i + 1])
        rows.append(scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attention.scale, mask=None))
    return llama.output(attention, mx.concatenate(rows, axis=0))


def _row_class(cls):
    if cls not in _row_classes:
        _row_classes[cls] = type(f"Rows{cls.__name__}", (cls,), {"__call__": _rows_call, "_rows_base": cls})
    return _row_classes[cls]


@contextmanager
def rows_attention(model):
    """Within the block, every attention module of `model` accepts a RowCaches (and behaves
    as before with any other cache); its class is put back afterwards, whatever happens."""
    swapped = []
    try:
        for layer in model.layers:
            attention = layer_attention(layer)
            if attention is None:
                continue
            swapped.append((attention, type(attention)))
            attention.__class__ = _row_class(type(attention))
        yield
    finally:
        for attention, cls in swapped:
            attention.__class__ = cls


def batched_logits(model, caches: Sequence[list], tokens: Sequence[int]) -> mx.array:
    """Logits (B, vocab) after feeding tokens[i] to request i, whose per-layer caches are
    caches[i] (each is extended by one position). Lazy: the caller evaluates."""
    if len(caches) != len(tokens) or not tokens:
        raise ValueError("one token per cache list, at least one")
    ids = mx.array([[token] for token in tokens], dtype=mx.int32)
    if len(tokens) == 1:
        return model(ids, cache=caches[0])[:, -1, :]
    layers = [RowCaches(per_layer) for per_layer in zip(*caches)]
    with rows_attention(model):
        return model(ids, cache=layers)[:, -1, :]
