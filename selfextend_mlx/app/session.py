"""One conversation with a model about some documents: the conversation policy behind chat,
ask and summarize, on top of the turn runner (app.turns), which does the prefill, the answer
and the caches.

- The plan (selfextend_mlx.planning) is made from the documents plus room for a question:
  plain attention when that fits the model's own context, else the smallest G that reaches.
  Nothing is patched until the session runs: each turn puts the shared model in the plan's
  mode first, so several sessions can share one loaded model.
- The system text and documents are a stable token prefix: prefilled once (or read from the
  document cache) and every question appended; between turns the runner keeps the KV cache,
  so a new question prefills only what differs from what it holds.
- A turn that would pass the plan's reach re-plans with a larger G and reads the conversation
  again; at the model's largest reach the oldest turns are dropped (the documents stay).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from ..core.prefill import Progress
from ..defaults import MAX_TOKENS, PREFILL_STEP
from ..errors import InputTooLongError, SelfExtendError
from ..loading.load import model_info
from ..planning import QUESTION_RESERVE, check_memory, choose_strategy, largest_reach, plan_run
from .doccache import DocumentCache
from .documents import Document, format_documents
from .generation import Sampling
from .prompts import PromptFormat, encode
from .turns import Answer, DocumentPrefix, TurnRunner


@dataclass
class SessionOptions:
    group_size: Optional[int] = None
    window: Optional[int] = None
    max_tokens: int = MAX_TOKENS
    kv_bits: Optional[int] = None
    prefill_step_size: int = PREFILL_STEP
    use_chat_template: bool = True


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
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.options, self.doc_cache, self.notice = options, doc_cache, notice
        self.documents = list(documents)
        self.format = PromptFormat(tokenizer, system, options.use_chat_template)
        self.documents_text = format_documents(self.documents) if self.documents else ""
        self.prefix_text = self.format.document_prefix(self.documents_text)
        self.prefix_tokens = encode(tokenizer, self.prefix_text, first=True) if self.prefix_text else []
        if self.documents and self.prefix_text is None:
            notice("the chat template puts the question before the documents end: the document prefill is not reused")
        self.history: list[tuple[str, str]] = []
        self.runner = TurnRunner(model, tokenizer, doc_cache=doc_cache, model_info=info, notice=notice)
        self.document_source = "none"  # "cache", "prefill" or "none" (no reusable document part)

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

    # What the runner holds, for callers and tests that look at the conversation's cache.
    @property
    def cache(self) -> Optional[list]:
        return self.runner.cache

    @property
    def cache_tokens(self) -> list[int]:
        return self.runner.tokens

    @property
    def last_answer(self) -> Optional[Answer]:
        return self.runner.last

    @property
    def kv_group_size(self) -> int:
        return self.plan.kv_group_size

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

    # -- prompts ------------------------------------------------------------------------------
    def prompt_tokens(self, question: str) -> list[int]:
        """The whole prompt for `question` after the turns so far; the document prefix is
        tokenized on its own so it stays the same token prefix whatever follows it."""
        text = self.format.render(self.documents_text, self.history, question)
        if self.prefix_text and text.startswith(self.prefix_text):
            return self.prefix_tokens + encode(self.tokenizer, text[len(self.prefix_text) :], first=False)
        return encode(self.tokenizer, text, first=True)

    # -- the document part ----------------------------------------------------------------------
    @property
    def _document(self) -> Optional[DocumentPrefix]:
        if not self.prefix_tokens:
            return None
        return DocumentPrefix(len(self.prefix_tokens), ", ".join(doc.label for doc in self.documents))

    def prepare(self, on_progress: Optional[Progress] = None) -> str:
        """Have the document part in the KV cache: from the document cache, or by prefilling
        it (and saving it). Returns where it came from: "cache", "prefill" or "none"."""
        self.runner.use(self.plan)
        if self.runner.cache is not None or self._document is None:
            return self.document_source
        source = self.runner.read_document(self.prefix_tokens, self._document, on_progress)
        self.document_source = "cache" if source == "disk" else "prefill"
        return self.document_source

    # -- fitting a turn in ----------------------------------------------------------------------
    def _fit(self, question: str) -> list[int]:
        """The prompt tokens for `question`, after re-planning (a larger G, the conversation read
        again) or dropping the oldest turns when the conversation outgrew the plan: turns go
        only while the conversation is past every G's reach (past the given G's, with -G), and
        what is left is re-planned."""
        tokens = self.prompt_tokens(question)
        needed = len(tokens) + self.options.max_tokens
        if needed <= self.plan.max_length or self._replan(tokens, needed):
            return tokens
        given = self.options.group_size is not None
        limit = self.plan.max_length if given else largest_reach(self.info.limits, self.options.window)
        kept, dropped = list(self.history), 0
        while self.history and needed > limit:
            self.history.pop(0)
            dropped += 1
            tokens = self.prompt_tokens(question)
            needed = len(tokens) + self.options.max_tokens
        if needed > limit or (needed > self.plan.max_length and not self._replan(tokens, needed)):
            self.history = kept  # a question refused costs the conversation nothing
            within = self.plan.settings.describe() if given else "the largest G"
            raise InputTooLongError(
                f"too long: {len(tokens)} prompt tokens + {self.options.max_tokens} answer tokens = {needed} "
                f"> N_max {limit} ({within}, L={self.plan.trained_context}): "
                "shorten the question or lower --max-tokens"
            )
        if dropped:
            self.notice(
                f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to stay within the reach of "
                f"{'this model' if not given else self.plan.settings.describe()} ({limit:,} tokens); the documents stay"
            )
        return tokens

    def _replan(self, tokens: list[int], needed: int) -> bool:
        """Re-plan for `needed` tokens with a larger G (never with a given -G); False when no G
        reaches them."""
        if self.options.group_size is not None:
            return False
        try:
            plan = self._plan_for(needed, self.plan.prompt_tokens)
        except InputTooLongError:
            return False
        check_memory(plan.memory)
        self.notice(
            f"the conversation ({len(tokens):,} tokens + {self.options.max_tokens:,} for the answer) passes "
            f"the reach of {self.plan.settings.describe()} ({self.plan.max_length:,}): re-planned to "
            f"{plan.settings.describe()}, reading it again{self._estimate(len(tokens))}"
        )
        self.plan = plan
        self.runner.drop()
        return True

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
        *,
        max_tokens: Optional[int] = None,
    ) -> Answer:
        """Answer `question` after the conversation so far, streaming text through on_text;
        `max_tokens` may keep this answer shorter than the plan's budget.

        Ctrl-C (KeyboardInterrupt) stops the answer: the part already given stays in the
        conversation and the cache, and the interrupt is raised again for the caller."""
        tokens = self._fit(question)
        self.prepare(on_progress)
        try:
            answer = self.runner.answer(
                tokens,
                sampling or Sampling(),
                document=self._document,
                on_text=on_text,
                on_progress=on_progress,
                max_tokens=max_tokens,
            )
        finally:
            answer = self.runner.last
            if answer.text or answer.finish_reason != "interrupted":
                self.history.append((question, answer.text))
        return answer

    def reset(self) -> None:
        """Forget the conversation, keep the documents (the cache goes back to their end)."""
        self.history = []
        self.runner.rewind(self.prefix_tokens)

    @property
    def conversation_tokens(self) -> int:
        return len(self.runner.tokens)
