"""Feeding tokens through a model into its KV cache, a step at a time: the one prefill loop
the turn runner, the evaluations and the benchmark share.

It runs as mlx-lm's own generation does: inside `wired_limit(model)` (on a Mac the weights
stay wired in memory through a long prefill instead of being paged out) and on mlx-lm's
generation stream, the one its decoding uses next.
"""

import importlib
import time
from collections.abc import Callable, Sequence
from typing import Optional

import mlx.core as mx

from ..defaults import PREFILL_STEP as DEFAULT_STEP

Progress = Callable[[int, int, float], None]  # (tokens done, tokens total, seconds so far)


def prefill(
    model,
    cache: list,
    tokens: Sequence[int],
    *,
    step: int = DEFAULT_STEP,
    on_logits: Optional[Callable[[int, mx.array], None]] = None,
    on_progress: Optional[Progress] = None,
    keep_last: bool = False,
) -> Optional[mx.array]:
    """Run `tokens` through `model` into `cache`, `step` tokens at a time.

    on_logits(start, logits) sees each step's (step, vocab) logits, so a caller can score them
    without ever holding all N x vocab of them. keep_last returns the last position's logits.
    Otherwise only the cache is evaluated: MLX is lazy, so the vocabulary projection (a fifth
    of a small model's prefill work) is never computed. Each step is evaluated on its own:
    one lazy graph over a whole document would hold every activation.
    """
    generation = importlib.import_module("mlx_lm.generate")  # the module (its package re-exports a function)
    with generation.wired_limit(model, [generation.generation_stream]), mx.stream(generation.generation_stream):
        return _prefill(model, cache, tokens, step, on_logits, on_progress, keep_last)


def _prefill(model, cache, tokens, step, on_logits, on_progress, keep_last) -> Optional[mx.array]:
    ids = tokens if isinstance(tokens, mx.array) else mx.array(list(tokens), dtype=mx.int32)
    total = ids.size
    started = time.perf_counter()
    if on_progress is not None:
        on_progress(0, total, 0.0)
    logits = None
    for begin in range(0, total, step):
        logits = model(ids[None, begin : begin + step], cache=cache)[0]
        if on_logits is not None:
            on_logits(begin, logits)
            mx.eval(logits)
        elif keep_last and begin + step >= total:
            logits = logits[-1]
            mx.eval(logits, [entry.state for entry in cache])
        else:
            mx.eval([entry.state for entry in cache])
        mx.clear_cache()
        if on_progress is not None:
            on_progress(min(begin + step, total), total, time.perf_counter() - started)
    if not keep_last or logits is None:
        return None
    return logits if logits.ndim == 1 else logits[-1]
