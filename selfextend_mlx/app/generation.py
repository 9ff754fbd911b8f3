"""Generating an answer after a prefilled prompt: sampling settings and streaming through
mlx-lm's generator with the caller's cache (the turn runner, app.turns, is the caller).

An answer stops at an end-of-sequence token ("stop"), at the plan's answer budget ("length"),
or, unless the sampling says otherwise, once it is plainly stuck in a loop ("repetition"): small models
answering over a long document may repeat one phrase until the budget runs out.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

REPETITION = "repetition"

# A loop: the answer ends in one block of tokens said three times over, the repeats covering
# at least LOOP_SPAN tokens (one token 32 times, a 4-token phrase 8 times, a sentence thrice).
LOOP_REPEATS = 3
LOOP_SPAN = 32


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked (mlx-lm's sampler settings) and whether a loop ends an answer.
    How long an answer may be is the plan's (planning.Plan.max_tokens), not the sampling's."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    repetition_penalty: float = 0.0  # mlx-lm's sign-aware penalty over recent tokens (0 or 1: none)
    repetition_context_size: int = 20  # how many recent tokens it looks at (mlx-lm's default)
    seed: Optional[int] = None
    stop_loops: bool = True  # end the answer once it repeats itself (see repeating_tail)

    def sampler(self, tokenizer=None):
        from mlx_lm.sample_utils import make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        special = []
        if self.xtc_probability > 0 and tokenizer is not None:  # XTC never drops these, as in mlx_lm.generate
            special = list(tokenizer.encode("\n")) + list(getattr(tokenizer, "eos_token_ids", []))
        return make_sampler(
            temp=self.temp,
            top_p=self.top_p,
            min_p=self.min_p,
            min_tokens_to_keep=self.min_tokens_to_keep,
            top_k=self.top_k,
            xtc_probability=self.xtc_probability,
            xtc_threshold=self.xtc_threshold,
            xtc_special_tokens=special,
        )

    def logits_processors(self) -> list:
        """mlx-lm's logits processors for these settings (none without a repetition penalty).
        The penalty sees the tokens given to the generator: the prompt's last and the answer's."""
        from mlx_lm.sample_utils import make_logits_processors

        if self.repetition_penalty in (0.0, 1.0):
            return []
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size
        )


def repeating_tail(tokens: Sequence[int], repeats: int = LOOP_REPEATS, span: int = LOOP_SPAN) -> bool:
    """Whether `tokens` end in one block said `repeats` times in a row (more for short blocks,
    so that the repeats cover at least `span` tokens)."""
    n = len(tokens)
    for period in range(1, n // repeats + 1):
        if tokens[n - 1] != tokens[n - 1 - period]:  # the cheap test rules most periods out
            continue
        times = max(repeats, -(-span // period))
        if times * period > n:
            continue
        block = list(tokens[n - period :])
        if all(list(tokens[n - (k + 1) * period : n - k * period]) == block for k in range(1, times)):
            return True
    return False


def stream_answer(model, tokenizer, cache, last_token: int, max_tokens: int, sampling: Sampling, on_token) -> None:
    """Generate up to `max_tokens` after `last_token` (the prompt's final token, not yet in the cache); calls
    on_token(token_id, text_segment, finish_reason) for every token that enters the cache."""
    from mlx_lm.generate import stream_generate

    generated: list[int] = []
    for response in stream_generate(
        model,
        tokenizer,
        mx.array([last_token]),
        max_tokens=max_tokens,
        sampler=sampling.sampler(tokenizer),
        logits_processors=sampling.logits_processors(),
        prompt_cache=cache,
    ):
        generated.append(response.token)
        finish_reason = response.finish_reason
        if finish_reason is None and sampling.stop_loops and repeating_tail(generated):
            finish_reason = REPETITION
        on_token(response.token, response.text, finish_reason)
        if finish_reason == REPETITION:
            break
