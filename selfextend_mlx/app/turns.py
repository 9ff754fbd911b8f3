"""The turn runner: one KV cache, exactly the tokens it holds, and the turns run on it. The CLI's
sessions, the server's engine and the evaluations all prefill and generate through it.

A turn (answer()) takes a whole prompt's tokens under a plan (selfextend_mlx.planning):
- the shared model is put in the plan's attention mode; a cache made under other settings is
  dropped (a cache is only ever extended under the settings that made it);
- the cache is cut back to its longest common prefix with the prompt; a document prefix the
  cache lacks is read from the document cache, or prefilled and saved there;
- the rest of the prompt is fed a prefill step at a time (progress reported, cancellation
  checked between steps), then the answer is generated (sampling, stop sequences, loop
  detection, an on-text callback) within the plan's answer budget, never past it;
- whatever ends the turn (the answer's end, a stop sequence, Ctrl-C, a cancellation, an
  error), the cache is settled: every layer holds the same prefix of the prompt and answer,
  and `tokens` says exactly which.
One record, Answer, says what a turn did; the server maps it to OpenAI's usage.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ..core.patch import make_cache, use_selfextend
from ..core.prefill import Progress, prefill
from ..errors import SettingsError
from ..planning import Plan
from .doccache import DocumentCache, cache_key, weights_fingerprint
from .generation import Sampling, stream_answer
from .prompts import common_prefix_length
from .stopping import StopSequences

# How a turn ended: the model's end of sequence, the answer budget, a loop, a stop sequence,
# or the caller (Ctrl-C, a cancelled request).
EOS, LENGTH, STOP_SEQUENCE, INTERRUPTED = "stop", "length", "stop_sequence", "interrupted"
MIN_STEP = 16  # the smallest prefill step timed steps shrink to


class TurnCancelled(Exception):
    """Raised inside a turn when its `cancel()` says so; the cache is settled first."""


@dataclass
class Answer:
    """What one turn did."""

    text: str = ""
    prompt_tokens: int = 0  # the whole prompt this answer followed
    prefilled_tokens: int = 0  # how many of them were computed for it (the rest were cached)
    prompt_seconds: float = 0.0
    generation_tokens: int = 0  # the answer's tokens (an end-of-sequence token is not counted)
    generation_seconds: float = 0.0
    finish_reason: str = LENGTH  # EOS ("stop"), LENGTH, "repetition", STOP_SEQUENCE or INTERRUPTED
    cache_source: str = "none"  # where the reused tokens came from: "memory", "disk" or "none"
    peak_memory_bytes: int = 0
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens

    @property
    def prompt_tps(self) -> float:
        return self.prefilled_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def api_finish_reason(self) -> str:
        """OpenAI's finish_reason: "length" at the budget, else "stop"."""
        return LENGTH if self.finish_reason == LENGTH else "stop"

    @property
    def stop_reason(self) -> str:
        """Why the answer ended, in the server's words ("eos" for the model's end)."""
        return "eos" if self.finish_reason == EOS else self.finish_reason


@dataclass(frozen=True)
class DocumentPrefix:
    """The leading tokens of a prompt worth keeping in the document cache, and their label
    (named in `selfextend cache list`)."""

    length: int
    label: str


class TurnRunner:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        doc_cache: Optional[DocumentCache] = None,
        model_info=None,
        notice: Callable[[str], None] = lambda message: None,
        step_seconds: Optional[float] = None,
    ):
        """`step_seconds`: a prefill step that takes longer is halved for the rest of the feed
        (down to MIN_STEP tokens), so cancel() is heard about that often (None: the plan's step)."""
        self.model, self.tokenizer, self.doc_cache, self.notice = model, tokenizer, doc_cache, notice
        self.step_seconds = step_seconds
        self.info = model_info
        self.plan: Optional[Plan] = None
        self.cache: Optional[list] = None
        self.tokens: list[int] = []  # exactly the tokens the cache holds
        self.origin = "none"  # where the held tokens came from: "memory" or "disk"
        self.last: Optional[Answer] = None  # the latest turn's record, filled in as it runs
        self._fed_tokens, self._fed_seconds = 0, 0.0  # computed since the last answer

    # -- the cache --------------------------------------------------------------------------------
    def use(self, plan: Plan) -> None:
        """Run under `plan` from now on: the shared model in its attention mode; a cache made
        under other settings is dropped."""
        if self.plan is not None and self.plan.cache_settings != plan.cache_settings:
            self.drop()
        self.plan = plan
        use_selfextend(self.model, plan.config)

    def drop(self) -> None:
        self.cache, self.tokens, self.origin = None, [], "none"

    def hold(self, cache: Optional[list], tokens: Sequence[int], origin: str = "memory") -> None:
        """Take over `cache`, which holds exactly `tokens` (None: start empty)."""
        if cache is None:
            self.drop()
        else:
            self.cache, self.tokens, self.origin = cache, list(tokens), origin

    def release(self) -> tuple[Optional[list], list[int]]:
        """Hand the cache and its tokens over to the caller (the runner starts empty again)."""
        held = self.cache, self.tokens
        self.drop()
        return held

    def rewind(self, target: Sequence[int]) -> int:
        """Cut the cache back to its longest common prefix with `target`; returns its length. A
        cache that cannot go back (a full rotating window) is dropped."""
        keep = common_prefix_length(self.tokens, target)
        drop = len(self.tokens) - keep
        if self.cache is None or drop == 0:
            return keep if self.cache is not None else 0
        if can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, drop)
            self.tokens = self.tokens[:keep]
            return keep
        self.drop()
        return 0

    def _settle(self, fed: Sequence[int]) -> None:
        """Make the cache hold one prefix of `fed` in every layer, and `tokens` say which (a
        step may stop between layers, or a token be computed but never handed out)."""
        if self.cache is None:
            return
        held = min(min(entry.offset for entry in self.cache), len(fed))
        for entry in self.cache:
            if entry.offset > held:
                if not entry.is_trimmable():
                    self.drop()
                    return
                entry.trim(entry.offset - held)
        self.tokens = list(fed[:held])

    # -- feeding ----------------------------------------------------------------------------------
    def feed(
        self,
        tokens: Sequence[int],
        on_progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> None:
        """Prefill `tokens` after those held, a plan's prefill step at a time. on_progress(done,
        total, seconds) counts within this call; cancel() is asked between steps (TurnCancelled).
        Whatever stops it, the cache keeps a consistent prefix."""
        if not tokens:
            return
        self._ensure_cache()
        started, before = time.perf_counter(), len(self.tokens)

        def progress(done: int, total: int, seconds: float) -> None:
            if cancel is not None and cancel():
                raise TurnCancelled()
            if on_progress is not None:
                on_progress(done, total, seconds)

        try:
            if self.step_seconds is None:
                prefill(self.model, self.cache, tokens, step=self.plan.prefill_step, on_progress=progress)
            else:
                self._feed_in_timed_steps(list(tokens), progress)
        finally:
            self._settle(self.tokens + list(tokens))
            self._fed_tokens += max(0, len(self.tokens) - before)
            self._fed_seconds += time.perf_counter() - started

    def _feed_in_timed_steps(self, tokens: list[int], progress: Progress) -> None:
        """prefill() a step at a time, halving the step while one takes over step_seconds."""
        step, done, started = self.plan.prefill_step, 0, time.perf_counter()
        progress(0, len(tokens), 0.0)
        while done < len(tokens):
            begun = time.perf_counter()
            prefill(self.model, self.cache, tokens[done : done + step], step=step)
            done = min(done + step, len(tokens))
            if time.perf_counter() - begun > self.step_seconds and step > MIN_STEP:
                step = max(MIN_STEP, step // 2)
            progress(done, len(tokens), time.perf_counter() - started)

    def _ensure_cache(self) -> None:
        """An empty cache under the current plan when none is held."""
        if self.cache is None:
            self.cache, self.tokens, self.origin = self._new_cache(), [], "memory"

    def _new_cache(self) -> list:
        return make_cache(self.model, self.plan.kv_bits, self.plan.kv_group_size)

    # -- the document cache -----------------------------------------------------------------------
    def _document_key(self, tokens: Sequence[int]) -> str:
        info, plan = self.info, self.plan
        return cache_key(info.model_id, plan.settings, plan.kv_bits, tokens, weights=weights_fingerprint(info))

    def read_document(
        self,
        tokens: Sequence[int],
        document: DocumentPrefix,
        on_progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> str:
        """Have the first `document.length` of `tokens` in the cache: held already ("memory"),
        from the document cache ("disk"), or prefilled and saved there ("prefill")."""
        prefix = list(tokens[: document.length])
        held = self.rewind(prefix)
        if held == len(prefix):
            return self.origin
        if self.doc_cache is not None:
            loaded = self.doc_cache.load(
                self._document_key(prefix), model_id=self.info.model_id, config=self.plan.config, tokens=len(prefix)
            )
            if loaded is not None:
                self.hold(loaded, prefix, origin="disk")
                return "disk"
        self.feed(prefix[held:], on_progress, cancel)
        if self.doc_cache is not None:
            self._save_document(prefix, document.label)
        return "prefill"

    def _save_document(self, tokens: list[int], label: str) -> None:
        try:
            self.doc_cache.save(
                self._document_key(tokens),
                self.cache,
                model_id=self.info.model_id,
                config=self.plan.config,
                metadata={"documents": label, "tokens": len(tokens), "kv_bits": self.plan.kv_bits},
            )
        except OSError as error:  # the answer does not need the file
            self.notice(f"could not save the document cache: {error.strerror or error}")

    # -- a turn -----------------------------------------------------------------------------------
    def answer(
        self,
        tokens: Sequence[int],
        sampling: Sampling = Sampling(),
        *,
        document: Optional[DocumentPrefix] = None,
        on_text: Callable[[str], None] = lambda text: None,
        on_progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None,
        stop: Sequence[str] = (),
        max_tokens: Optional[int] = None,
    ) -> Answer:
        """Answer after the prompt `tokens` under the current plan (see the module docstring),
        in at most the plan's answer budget (`max_tokens` may ask for fewer, never more).
        Ctrl-C and TurnCancelled end the turn (finish_reason "interrupted") and are raised again;
        `last` keeps what was answered."""
        budget = self.plan.max_tokens if max_tokens is None else max_tokens
        if not 1 <= budget <= self.plan.max_tokens:
            raise SettingsError(
                f"an answer of {budget} tokens is outside this run's plan (1 to {self.plan.max_tokens})"
            )
        tokens = list(tokens)
        answer = self.last = Answer(prompt_tokens=len(tokens))
        held = self.rewind(tokens[:-1])
        source = self.origin if held else "none"
        fed = list(tokens)
        first_token_at = None

        def on_token(token: int, text: str, finish_reason: Optional[str]) -> None:
            nonlocal first_token_at
            if cancel is not None and cancel():
                raise TurnCancelled()
            first_token_at = first_token_at or time.perf_counter()
            fed.append(token)
            if finish_reason != EOS:  # the end-of-sequence token is no part of the answer
                answer.generation_tokens += 1
                answer.token_ids.append(token)
            if finish_reason:
                answer.finish_reason = finish_reason
            safe = stops.feed(text)
            if safe:
                answer.text += safe
                on_text(safe)
            if stops.hit:
                raise _StopSequenceHit()

        stops = StopSequences(stop)
        generating = None  # when the prompt's last token went in with the first answer token
        try:
            if document is not None and held < document.length < len(tokens):
                if self.read_document(tokens, document, on_progress, cancel) == "disk":
                    source = "disk"
            self.feed(tokens[len(self.tokens) : -1], on_progress, cancel)
            generating = time.perf_counter()
            self._generate(tokens[-1], budget, sampling, stops, on_token, answer, on_text)
        except (KeyboardInterrupt, TurnCancelled):
            answer.finish_reason = INTERRUPTED
            raise
        finally:
            end = time.perf_counter()
            first = first_token_at or end
            self._settle(fed)
            answer.prefilled_tokens = min(len(tokens), self._fed_tokens + (generating is not None))
            answer.prompt_seconds = self._fed_seconds + (first - generating if generating is not None else 0.0)
            answer.generation_seconds = end - first if generating is not None else 0.0
            answer.cache_source = source if answer.cached_tokens else "none"
            answer.peak_memory_bytes = mx.get_peak_memory()
            self._fed_tokens, self._fed_seconds = 0, 0.0
            if self.cache is not None:
                self.origin = "memory"
        return answer

    def _generate(
        self, last_token: int, budget: int, sampling: Sampling, stops: StopSequences, on_token, answer, on_text
    ):
        self._ensure_cache()
        try:
            stream_answer(self.model, self.tokenizer, self.cache, last_token, budget, sampling, on_token)
        except _StopSequenceHit:
            answer.finish_reason = STOP_SEQUENCE
            return
        tail = stops.flush()
        if tail:
            answer.text += tail
            on_text(tail)


class _StopSequenceHit(Exception):
    pass
