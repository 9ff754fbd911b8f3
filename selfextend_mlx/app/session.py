"""One conversation with a model about some documents: the engine behind chat, ask,
summarize, generate and the server.

- The plan (selfextend_mlx.planning) is made from the documents plus room for a question:
  plain attention when that fits the model's own context, else the smallest G that reaches.
  Nothing is patched until the session runs: each turn puts the shared model in the plan's
  mode first, so several sessions can share one loaded model.
- The system text and documents are a stable token prefix: prefilled once (or read from the
  document cache) and every question appended.
- Between turns the KV cache is kept: a new question prefills only the tokens that differ
  from what the cache already holds (the cache is trimmed back to the common prefix).
- A turn that would pass the plan's reach re-plans with a larger G and reads the conversation
  again; at the model's largest reach the oldest turns are dropped (the documents stay).
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ..core.patch import make_cache, use_selfextend
from ..core.prefill import DEFAULT_STEP, Progress, prefill
from ..errors import InputTooLongError, SelfExtendError
from ..loading.load import model_info
from ..planning import QUESTION_RESERVE, check_memory, choose_strategy, kv_group_size, plan_run
from .doccache import DocumentCache, cache_key, weights_fingerprint
from .documents import Document, format_documents
from .generation import DEFAULT_MAX_TOKENS, Answer, Sampling, stream_answer
from .prompts import PromptFormat, common_prefix_length, encode


@dataclass
class SessionOptions:
    group_size: Optional[int] = None
    window: Optional[int] = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    kv_bits: Optional[int] = None
    prefill_step_size: int = DEFAULT_STEP
    use_chat_template: bool = True


@dataclass
class _Prefill:
    tokens: int = 0
    seconds: float = 0.0


class Session:
    """A conversation with a model about some documents (or none, for a bare prompt)."""

    def __init__(
        self,
        model,
        tokenizer,
        documents: Sequence[Document] = (),
        *,
        system: Optional[str] = None,
        options: SessionOptions = SessionOptions(),
        doc_cache: Optional[DocumentCache] = None,
        first_question: Optional[str] = None,
        notice: Callable[[str], None] = lambda message: None,
    ):
        info = model_info(model)
        if info is None:
            raise SelfExtendError("the model has no model_info; load it with selfextend_mlx.load")
        if options.max_tokens < 1:
            raise SelfExtendError(f"--max-tokens must be at least 1, got {options.max_tokens}")
        if options.prefill_step_size < 1:
            raise SelfExtendError(f"--prefill-step-size must be at least 1, got {options.prefill_step_size}")
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.kv_group_size = kv_group_size(info.shape.head_dim, options.kv_bits)
        self.options, self.doc_cache, self.notice = options, doc_cache, notice
        self.documents = list(documents)
        self.format = PromptFormat(tokenizer, system, options.use_chat_template)
        self.documents_text = format_documents(self.documents) if self.documents else ""
        self.prefix_text = self.format.document_prefix(self.documents_text)
        self.prefix_tokens = encode(tokenizer, self.prefix_text, first=True) if self.prefix_text else []
        if self.documents and self.prefix_text is None:
            notice("the chat template puts the question before the documents end: the document prefill is not reused")
        self.history: list[tuple[str, str]] = []
        self.cache: Optional[list] = None
        self.cache_tokens: list[int] = []  # exactly the tokens the cache holds
        self.document_source = "none"  # "cache", "prefill" or "none" (no reusable document part)
        self._pending = _Prefill()  # document prefill not yet reported in an Answer
        self.last_answer: Optional[Answer] = None

        # Planned on the documents plus room for a question, so chat and ask about the same
        # documents pick the same settings (and share the document cache).
        prompt = len(self.prefix_tokens) or len(self.prompt_tokens(""))
        if first_question is not None:
            prompt = len(self.prompt_tokens(first_question))
        planned = max(prompt, len(self.prefix_tokens) + QUESTION_RESERVE) + options.max_tokens
        try:
            self.plan = self._plan_for(planned, prompt)
        except InputTooLongError:  # without the room for a question it may still fit; else say by how much
            try:
                self.plan = self._plan_for(prompt + options.max_tokens, prompt)
            except InputTooLongError:
                if self.documents and options.group_size is None:  # a conversation needs them whole
                    choose_strategy("chat", info.limits, prompt + options.max_tokens, options.window)
                raise
        check_memory(self.plan.memory)

    def _plan_for(self, tokens: int, prompt: int, **overrides):
        options = self.options
        settings = dict(group_size=options.group_size, window=options.window, **overrides)
        return plan_run(
            self.info,
            tokens,
            prompt_tokens=prompt,
            max_tokens=options.max_tokens,
            kv_bits=options.kv_bits,
            prefill_step=options.prefill_step_size,
            **settings,
        )

    def _activate(self) -> None:
        """Put the shared model in this session's attention mode."""
        use_selfextend(self.model, self.plan.config)

    # -- prompts ------------------------------------------------------------------------------
    def prompt_tokens(self, question: str) -> list[int]:
        """The whole prompt for `question` after the turns so far; the document prefix is
        tokenized on its own so it stays the same token prefix whatever follows it."""
        text = self.format.render(self.documents_text, self.history, question)
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.prefix_tokens + encode(self.tokenizer, text[len(self.prefix_text) :], first=False)
        return encode(self.tokenizer, text, first=True)

    # -- the document part ----------------------------------------------------------------------
    def _document_key(self) -> str:
        return cache_key(
            self.info.model_id,
            self.plan.settings,
            self.options.kv_bits,
            self.prefix_tokens,
            weights=weights_fingerprint(self.info),
        )

    def _new_cache(self) -> list:
        return make_cache(self.model, self.options.kv_bits, self.kv_group_size)

    def prepare(self, on_progress: Optional[Progress] = None) -> str:
        """Have the document part in the KV cache: from the document cache, or by prefilling
        it (and saving it). Returns where it came from: "cache", "prefill" or "none"."""
        if self.cache is not None:
            return self.document_source
        self._activate()
        if self.prefix_tokens and self.doc_cache is not None:
            cache = self.doc_cache.load(
                self._document_key(),
                model_id=self.info.model_id,
                config=self.plan.config,
                tokens=len(self.prefix_tokens),
            )
            if cache is not None:
                self.cache, self.cache_tokens, self.document_source = cache, list(self.prefix_tokens), "cache"
                return self.document_source
        self.cache, self.cache_tokens = self._new_cache(), []
        if not self.prefix_tokens:
            self.document_source = "none"
            return self.document_source
        seconds = self._prefill(self.prefix_tokens, on_progress)
        self.cache_tokens = list(self.prefix_tokens)
        self._pending = _Prefill(len(self.prefix_tokens), seconds)
        self.document_source = "prefill"
        if self.doc_cache is not None:
            self._save_document_cache()
        return self.document_source

    def _prefill(self, tokens: Sequence[int], on_progress: Optional[Progress]) -> float:
        started = time.perf_counter()
        prefill(self.model, self.cache, tokens, step=self.options.prefill_step_size, on_progress=on_progress)
        return time.perf_counter() - started

    def _save_document_cache(self):
        try:
            self.doc_cache.save(
                self._document_key(),
                self.cache,
                model_id=self.info.model_id,
                config=self.plan.config,
                metadata={
                    "documents": ", ".join(doc.label for doc in self.documents),
                    "tokens": len(self.prefix_tokens),
                    "kv_bits": self.options.kv_bits,
                },
            )
        except OSError as error:
            self.notice(f"could not save the document cache: {error.strerror or error}")

    # -- fitting a turn in ----------------------------------------------------------------------
    def _fit(self, question: str) -> list[int]:
        """The prompt tokens for `question`, after re-planning (a larger G, the conversation read
        again) or dropping the oldest turns when the conversation outgrew the plan."""
        tokens = self.prompt_tokens(question)
        needed = len(tokens) + self.options.max_tokens
        if needed <= self.plan.max_length:
            return tokens
        if self.options.group_size is None:
            try:
                plan = self._plan_for(needed, self.plan.prompt_tokens)
            except InputTooLongError:
                plan = None
            if plan is not None:
                check_memory(plan.memory)
                self.notice(
                    f"the conversation ({len(tokens):,} tokens + {self.options.max_tokens:,} for the answer) passes "
                    f"the reach of {self.plan.settings.describe()} ({self.plan.max_length:,}): re-planned to "
                    f"{plan.settings.describe()}, reading it again{self._estimate(len(tokens))}"
                )
                self.plan, self.cache, self.cache_tokens = plan, None, []
                return tokens
        dropped = 0
        while self.history and needed > self.plan.max_length:
            self.history.pop(0)
            dropped += 1
            tokens = self.prompt_tokens(question)
            needed = len(tokens) + self.options.max_tokens
        if needed > self.plan.max_length:
            raise InputTooLongError(
                f"too long: {len(tokens)} prompt tokens + {self.options.max_tokens} answer tokens = {needed} "
                f"> N_max {self.plan.max_length} ({self.plan.settings.describe()}, L={self.plan.trained_context}): "
                "shorten the question or lower --max-tokens"
            )
        if dropped:
            self.notice(
                f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to stay within the reach of "
                f"{self.plan.settings.describe()} ({self.plan.max_length:,} tokens); the documents stay"
            )
        return tokens

    def _estimate(self, tokens: int) -> str:
        last = self.last_answer
        if last is None or last.prompt_tps <= 0:
            return ""
        return f" (about {tokens / last.prompt_tps:.0f}s)"

    # -- turns --------------------------------------------------------------------------------
    def ask(
        self,
        question: str,
        sampling: Optional[Sampling] = None,
        on_text: Callable[[str], None] = lambda text: None,
        on_progress: Optional[Progress] = None,
    ) -> Answer:
        """Answer `question` after the conversation so far, streaming text through on_text.

        Ctrl-C (KeyboardInterrupt) stops the answer: the part already given stays in the
        conversation and the cache, and the interrupt is raised again for the caller."""
        sampling = sampling or Sampling(max_tokens=self.options.max_tokens)
        tokens = self._fit(question)
        self.prepare(on_progress)
        self._activate()
        answer = Answer(prompt_tokens=len(tokens))
        answer.prefilled_tokens, answer.prompt_seconds = self._pending.tokens, self._pending.seconds
        self._pending = _Prefill()

        keep = self._rewind_to(tokens[:-1], on_progress)
        fed = list(tokens)  # what the cache holds once this turn is through, kept exact
        new = tokens[keep:]
        start = time.perf_counter()
        first_token_at = None

        def on_token(token, text, finish_reason):
            nonlocal first_token_at
            if first_token_at is None:
                first_token_at = time.perf_counter()
            fed.append(token)
            answer.text += text
            if finish_reason != "stop":
                answer.generation_tokens += 1
            if finish_reason:
                answer.finish_reason = finish_reason
            if text:
                on_text(text)

        try:
            self._prefill(new[:-1], on_progress)
            stream_answer(self.model, self.tokenizer, self.cache, new[-1], sampling, on_token)
        except KeyboardInterrupt:
            answer.finish_reason = "interrupted"
            raise
        finally:
            end = time.perf_counter()
            first = first_token_at or end
            answer.prefilled_tokens += len(new)
            answer.prompt_seconds += first - start
            answer.generation_seconds = end - first
            answer.peak_memory_bytes = mx.get_peak_memory()
            self._settle(fed)
            if answer.text or answer.finish_reason != "interrupted":
                self.history.append((question, answer.text))
            self.last_answer = answer
        return answer

    def _rewind_to(self, target: Sequence[int], on_progress=None) -> int:
        """Cut the cache back to its longest common prefix with `target`; returns its length."""
        keep = common_prefix_length(self.cache_tokens, target)
        drop = len(self.cache_tokens) - keep
        if drop == 0:
            return keep
        if can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, drop)
            self.cache_tokens = self.cache_tokens[:keep]
            return keep
        # A cache that cannot go back (a full rotating window): start again from the
        # document part, or from nothing when even that does not fit.
        self.cache = None
        self.prepare(on_progress)
        self._pending = _Prefill()
        keep = common_prefix_length(self.cache_tokens, target)
        if keep < len(self.cache_tokens):
            self.cache, self.cache_tokens = self._new_cache(), []
            return 0
        return keep

    def _settle(self, fed: list[int]) -> None:
        """After a turn (finished or interrupted), make cache_tokens match the cache exactly."""
        if self.cache is None:
            return
        offsets = {entry.offset for entry in self.cache}
        if len(offsets) != 1:  # interrupted between layers: the cache is unusable
            self.cache, self.cache_tokens = None, []
            return
        held = offsets.pop()
        if held > len(fed):  # a token computed but never handed out
            trim_prompt_cache(self.cache, held - len(fed))
            held = len(fed)
        self.cache_tokens = fed[:held]

    def reset(self) -> None:
        """Forget the conversation, keep the documents (the cache goes back to their end)."""
        self.history = []
        if self.cache is not None:
            self._rewind_to(self.prefix_tokens)

    @property
    def conversation_tokens(self) -> int:
        return len(self.cache_tokens)
