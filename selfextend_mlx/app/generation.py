"""Generating an answer after a prefilled prompt: sampling settings, the answer record, and
streaming through mlx-lm's generator with the caller's cache."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temp: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def sampler(self):
        from mlx_lm.sample_utils import make_sampler

        if self.seed is not None:
            mx.random.seed(self.seed)
        return make_sampler(temp=self.temp, top_p=self.top_p)


@dataclass
class Answer:
    text: str = ""
    prompt_tokens: int = 0  # the whole prompt this answer followed
    prefilled_tokens: int = 0  # how many of them this call computed (the rest were cached)
    prompt_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    finish_reason: str = "length"  # "stop", "length" or "interrupted"
    peak_memory_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


def stream_answer(model, tokenizer, cache, last_token: int, sampling: Sampling, on_token) -> None:
    """Generate after `last_token` (the prompt's final token, not yet in the cache); calls
    on_token(token_id, text_segment, finish_reason) for every token that enters the cache."""
    from mlx_lm.generate import stream_generate

    for response in stream_generate(
        model,
        tokenizer,
        mx.array([last_token]),
        max_tokens=sampling.max_tokens,
        sampler=sampling.sampler(),
        prompt_cache=cache,
    ):
        on_token(response.token, response.text, response.finish_reason)
