"""The answer of one request decoded a step at a time, so that several requests can share each
decode step (selfextend_mlx.core.batch runs the model on all their rows at once).

A Decoding turns the tokens sampled for one request into what a one-request turn makes of
them (app.turns with mlx-lm's stream_generate): the same text pieces from mlx-lm's streaming
detokenizer, the same end (the model's end of sequence, the answer budget, a repetition loop,
a stop sequence) and the same Answer record. The caller owns the model and the cache; it feeds
`pending` to the model, samples the next token with `sample()` and hands it to `push()`, until
`finished`.
"""

import time
from typing import Optional

import mlx.core as mx

from ..app.generation import REPETITION, Sampling, repeating_tail
from ..app.stopping import StopSequences
from ..app.turns import EOS, INTERRUPTED, LENGTH, STOP_SEQUENCE, Answer


def batch_key(plan, sampling: Sampling, job_id: int) -> tuple:
    """What requests must share to decode together: the attention mode (plain, or SelfExtend's
    G and W; planning's cache_settings without the KV quantization, since caches stay per
    request), as the model is in one mode for a step. A seeded sampled request runs alone: its
    random draws come from the one global generator, so that it repeats."""
    if sampling.seed is not None and sampling.temp > 0:
        return ("alone", job_id)
    return ("mode", *plan.cache_settings[:2])


class Decoding:
    """One request's answer after its prompt: `cache` holds exactly `held` (the prompt but its
    last token, at the start); `pending` is the token to feed next."""

    def __init__(self, tokenizer, sampling: Sampling, budget: int, stop, answer: Answer, cache, held, pending):
        self.tokenizer, self.sampling, self.budget, self.answer = tokenizer, sampling, budget, answer
        self.sampler = sampling.sampler(tokenizer)
        self.processors = sampling.logits_processors()
        self.fed_first = pending  # a one-request turn's generator is given this token, then its answer
        self.detokenizer = tokenizer.detokenizer
        self.stops = StopSequences(stop)
        self.cache, self.held, self.pending = cache, list(held), pending
        self.generated: list[int] = []  # every sampled token, an end of sequence included
        self.finished = False
        self.started = time.perf_counter()  # the prompt's last token goes in with the first step
        self.first_token_at: Optional[float] = None

    def sample(self, logits_row: mx.array) -> mx.array:
        """The next token (lazy) from this request's (1, vocab) logits, as mlx-lm samples it
        (its logits processors, e.g. a repetition penalty, seeing what its generator was fed)."""
        if self.processors:
            fed = mx.array([self.fed_first, *self.generated])
            for processor in self.processors:
                logits_row = processor(fed, logits_row)
        logprobs = logits_row - mx.logsumexp(logits_row, keepdims=True)
        return self.sampler(logprobs)

    def push(self, token: int) -> str:
        """Take the token sampled after feeding `pending` (which is now in the cache); returns
        the text now safe to send. Sets `finished` (and the answer's finish_reason) at the end."""
        self.held.append(self.pending)
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.generated.append(token)
        text, reason = self._text(token)
        if reason is None and self.sampling.stop_loops and repeating_tail(self.generated):
            reason = REPETITION
        answer = self.answer
        if reason != EOS:  # the end-of-sequence token is no part of the answer
            answer.generation_tokens += 1
            answer.token_ids.append(token)
        if reason:
            answer.finish_reason = reason
        safe = self.stops.feed(text)
        if self.stops.hit:
            answer.finish_reason, reason = STOP_SEQUENCE, STOP_SEQUENCE
        elif reason:
            safe += self.stops.flush()
        answer.text += safe
        self.pending, self.finished = token, reason is not None
        return safe

    def _text(self, token: int) -> tuple[str, Optional[str]]:
        """The detokenizer's segment for `token` and the end it makes (stream_generate's rules)."""
        detokenizer = self.detokenizer
        if token in self.tokenizer.eos_token_ids:
            detokenizer.finalize()
            return detokenizer.last_segment, EOS
        detokenizer.add_token(token)
        if len(self.generated) == self.budget:
            detokenizer.finalize()
            return detokenizer.last_segment, LENGTH
        return detokenizer.last_segment, None

    def interrupt(self) -> None:
        self.answer.finish_reason = INTERRUPTED

    def close(self, prompt_seconds: float) -> None:
        """Fill in the record's times once the answer ended (`prompt_seconds`: the prefill's)."""
        end = time.perf_counter()
        first = self.first_token_at or end
        self.answer.prompt_seconds = prompt_seconds + (first - self.started)
        self.answer.generation_seconds = end - first
        self.answer.peak_memory_bytes = mx.get_peak_memory()
