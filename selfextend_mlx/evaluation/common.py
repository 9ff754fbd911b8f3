"""Pieces every evaluation shares: argument parsing, plain/SelfExtend modes, chunked feeding."""

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import mlx.core as mx

from ..core.patch import make_cache
from ..core.config import SelfExtendConfig
from ..errors import EvaluationError
from ..core.patch import apply_selfextend, remove_selfextend, selfextend_config
from ..app.session import kv_group_size

PLAIN = "plain"
SELFEXTEND = "selfextend"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_token_count(text: str) -> int:
    """'4096', '4k' (4096) or '1.5k' (1536): token counts as people write them."""
    match = _SIZE.match(str(text))
    if not match:
        raise EvaluationError(f"not a token count: {text!r} (write e.g. 4096 or 4k)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
    if value != int(value) or value < 1:
        raise EvaluationError(f"not a whole positive token count: {text!r}")
    return int(value)


def parse_token_counts(text: str) -> list[int]:
    values = [parse_token_count(part) for part in str(text).split(",") if part.strip()]
    if not values:
        raise EvaluationError(f"no token counts in {text!r}")
    return values


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise EvaluationError(f"depths must be numbers between 0 and 1, got {text!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvaluationError(f"depths must be numbers between 0 and 1, got {text!r}")
    return depths


@dataclass(frozen=True)
class Mode:
    """How the model attends during one pass: plainly, or with SelfExtend(config)."""

    name: str
    config: Optional[SelfExtendConfig] = None


def use_mode(model, mode: Mode) -> None:
    """Patch or unpatch the one loaded model, so a comparison never loads it twice."""
    current = selfextend_config(model)
    if current == mode.config:
        return
    if current is not None:
        remove_selfextend(model)
    if mode.config is not None:
        apply_selfextend(model, mode.config)


def new_cache(model, kv_bits: Optional[int] = None) -> list:
    # Small heads need a smaller quantization group; the session picks it (or says why it cannot).
    group = kv_group_size(model, kv_bits) if kv_bits is not None else 64
    return make_cache(model, kv_bits=kv_bits, kv_group_size=group)


def feed(model, tokens: Sequence[int], cache: list, chunk_size: int,
         on_logits: Optional[Callable[[int, mx.array], None]] = None,
         on_progress: Optional[Callable[[int], None]] = None) -> mx.array:
    """Run `tokens` through the model in chunks, growing `cache`; return the last position's logits.

    `on_logits(start, logits)` sees each chunk's (chunk, vocab) logits, so callers can score
    them without ever holding all N x vocab logits at once; `on_progress(n)` hears of each
    chunk of n tokens done.
    """
    if not tokens:
        raise EvaluationError("nothing to feed: the token list is empty")
    logits = None
    for start in range(0, len(tokens), chunk_size):
        chunk = mx.array(list(tokens[start:start + chunk_size]))[None]
        logits = model(chunk, cache=cache)[0]
        last = start + chunk_size >= len(tokens)
        if on_logits is not None:
            on_logits(start, logits)
        if on_logits is None and not last:
            # Only the cache is needed: MLX is lazy, so the vocabulary projection of this chunk's
            # logits (a fifth of a small model's prefill work) is never computed.
            mx.eval([entry.state for entry in cache])
        else:
            # Evaluate per chunk: one lazy graph over the whole text would hold every activation.
            # The cache's new keys and values are inputs of these logits, so they are computed too.
            mx.eval(logits)
        if on_progress is not None:
            on_progress(chunk.shape[1])
    return logits[-1]


def greedy_generate(model, prompt: Sequence[int], cache: list, max_tokens: int, chunk_size: int,
                    stop_ids: Sequence[int] = (), on_progress: Optional[Callable[[int], None]] = None) -> list[int]:
    """Greedy decoding: the paper's passkey protocol (no sampling, so runs repeat exactly)."""
    logits = feed(model, prompt, cache, chunk_size, on_progress=on_progress)
    stop = set(stop_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits).item())
        if token in stop:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out
