"""Answering about documents of any length: one session when they fit the model's reach,
else the strategy planning names for the task.

- ask ("retrieval"): the passages most relevant to the question (BM25, from bm25s), as
  many as fill the reach, kept in document order and marked where text was left out.
- summarize ("map-reduce"): the document cut on paragraph boundaries into parts as large
  as the reach allows, each part summarized (a notice per part; the part summaries kept
  beside the document cache, so a re-run is quick), then the summaries summarized,
  recursively while they do not fit. SelfExtend makes each part many times the trained
  context, so a whole book takes one or two levels, not dozens of 4k-token chunks.

`LongDocument` decides the strategy before anything is prefilled (so the header can say it)
and `answer()` runs it; the final step is always an ordinary Session. Cutting and choosing
passages is app/passages.py; the part summaries kept on disk, app/summaries.py.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

from ..errors import SelfExtendError
from ..loading.load import model_info
from ..planning import FULL, MAP_REDUCE, RETRIEVAL, STRATEGY_FOR_TASK, choose_strategy, fill_reach, summary_reach
from .documents import Document, format_documents
from .generation import Sampling
from .passages import (
    Passage,
    balanced_parts,
    halves,
    join_selected,
    passages,
    select_passages,
)
from .session import Session, SessionOptions
from .summaries import SummaryMemo
from .turns import Answer

PART_ANSWER_TOKENS = 256  # the longest summary of one part
COUNT_SLICE = 100_000  # characters tokenized at once when counting a long document
MARGIN = 0.02  # of the reach kept free: tokens of joined pieces differ a little from their sum

PART_REQUEST = (
    "The text above is part {index} of {count} of a longer document. Summarize this part in one concise "
    "paragraph: the people, events, facts and conclusions it contains."
)
REDUCE_NAME = "summaries of the consecutive parts of {name}"


@dataclass
class DocumentAnswer:
    """The answer and how it was reached."""

    answer: Answer
    session: Session  # the session of the final step: its plan gives G, W and the reach used
    strategy: str  # FULL, RETRIEVAL or MAP_REDUCE
    document_tokens: int  # the whole document(s), as the model tokenizes them
    parts: Optional[int] = None  # map-reduce: parts of the document (first level)
    levels: Optional[int] = None  # map-reduce: summary levels, the final one included
    selected_tokens: Optional[int] = None  # retrieval: tokens of the passages kept
    selected_passages: Optional[int] = None
    total_passages: Optional[int] = None
    seconds: float = 0.0  # wall time of the whole answer, parts included
    part_summaries: list = field(default_factory=list)


# -- the strategies -------------------------------------------------------------------------------


class LongDocument:
    """One question (or summary request) about documents, whatever their length.

    Construction tokenizes and decides the strategy (nothing is prefilled): `strategy`,
    `document_tokens`, and for the full strategy `session` (whose plan the header shows).
    """

    def __init__(
        self,
        model,
        tokenizer,
        documents: Sequence[Document],
        question: str,
        *,
        task: str,
        options: SessionOptions = SessionOptions(),
        system: Optional[str] = None,
        doc_cache=None,
        memo: Optional[SummaryMemo] = None,
        notice: Callable[[str], None] = lambda message: None,
    ):
        if task not in STRATEGY_FOR_TASK:
            raise ValueError(f"task must be one of {', '.join(STRATEGY_FOR_TASK)}")
        self.model, self.tokenizer, self.documents, self.question = model, tokenizer, list(documents), question
        self.task, self.options, self.system, self.doc_cache, self.notice = task, options, system, doc_cache, notice
        self.memo = memo or SummaryMemo(None)
        self.info = model_info(model)
        self.document_tokens = self._count(format_documents(self.documents)) + 1  # + the BOS token
        needed = self._overhead(question) + self.document_tokens + options.max_tokens
        if options.group_size is not None:
            self.strategy = FULL  # given settings: used as given (the session refuses what they cannot reach)
        else:
            self.strategy = choose_strategy(task, self.info.limits, needed, options.window)
        self.session = self._session(self.documents, question, doc_cache) if self.strategy == FULL else None
        if self.session is not None and self.session.prefix_tokens:
            self.document_tokens = len(self.session.prefix_tokens)  # as the document cache counts them
        reach = summary_reach if task == "summarize" else fill_reach
        self.budget = reach(self.info.limits, options.window)

    def _count(self, text: str) -> int:
        """Tokens of `text`, tokenized a slice at a time so a long book never needs the memory of
        all its tokens' intermediate forms at once (each cut is at a paragraph break)."""
        total, start = 0, 0
        while start < len(text):
            end = len(text) if len(text) - start <= COUNT_SLICE else text.rfind("\n\n", start, start + COUNT_SLICE)
            end = start + COUNT_SLICE if end <= start else end
            total += len(self.tokenizer.encode(text[start:end], add_special_tokens=False))
            start = end
        return total

    def _session(self, documents, question, doc_cache=None, max_tokens=None) -> Session:
        options = self.options if max_tokens is None else replace(self.options, max_tokens=max_tokens)
        return Session(
            self.model,
            self.tokenizer,
            documents,
            system=self.system,
            options=options,
            doc_cache=doc_cache,
            first_question=question,
            notice=self.notice,
        )

    def _overhead(self, question: str) -> int:
        """Prompt tokens besides the document text: template, system text, names, question."""
        probe = Session(
            self.model,
            self.tokenizer,
            [Document(d.name, "x", d.format) for d in self.documents],
            system=self.system,
            options=self.options,
            notice=lambda message: None,
        )
        return len(probe.prompt_tokens(question))

    def _content_budget(self, question: str, answer_tokens: int) -> int:
        budget = self.budget - self._overhead(question) - answer_tokens
        return int(budget * (1 - MARGIN)) - 16

    def describe(self) -> str:
        """One line on how the answer will be reached (for the header)."""
        if self.strategy == RETRIEVAL:
            return (
                f"document {self.document_tokens:,} tokens is past the model's largest reach: answering from the "
                f"passages most relevant to the question (up to {self.budget:,} tokens)"
            )
        if self.strategy == MAP_REDUCE:
            return (
                f"document {self.document_tokens:,} tokens is more than one summary reads: summarizing it in "
                f"parts of up to {self.budget:,} tokens, then the summaries"
            )
        return ""

    def answer(
        self, sampling: Optional[Sampling] = None, on_text=lambda text: None, on_progress=None, on_session=None
    ) -> DocumentAnswer:
        """Run the strategy. `on_session(session)` hears of the final step's session just before
        it runs (for a header); `on_progress` hears of every prefill."""
        sampling = sampling or Sampling()
        announce = on_session or (lambda session: None)
        started = time.perf_counter()
        if self.strategy == FULL:
            announce(self.session)
            answer = self.session.ask(self.question, sampling, on_text, on_progress)
            result = DocumentAnswer(answer, self.session, FULL, self.document_tokens)
        elif self.strategy == RETRIEVAL:
            result = self._retrieve(sampling, on_text, on_progress, announce)
        else:
            result = self._map_reduce(sampling, on_text, on_progress, announce)
        result.seconds = time.perf_counter() - started
        return result

    def _retrieve(self, sampling, on_text, on_progress, announce) -> DocumentAnswer:
        pool = [(doc, passages(doc.text, self._count)) for doc in self.documents]
        flat = [p for _, items in pool for p in items]
        budget = self._content_budget(self.question, self.options.max_tokens)
        chosen = {id(p) for p in select_passages(flat, self.question, budget)}
        kept = []
        for doc, items in pool:
            selected = [p for p in items if id(p) in chosen]
            if selected:
                kept.append(Document(doc.name, join_selected(selected), doc.format))
        if not kept:
            raise SelfExtendError("no passage of the document fits the model's reach with this question")
        session = self._session(kept, self.question)
        announce(session)
        answer = session.ask(self.question, sampling, on_text, on_progress)
        selected_tokens = sum(p.tokens for p in flat if id(p) in chosen)
        return DocumentAnswer(
            answer,
            session,
            RETRIEVAL,
            self.document_tokens,
            selected_tokens=selected_tokens,
            selected_passages=len(chosen),
            total_passages=len(flat),
        )

    def _map_reduce(self, sampling, on_text, on_progress, announce) -> DocumentAnswer:
        name = ", ".join(doc.name for doc in self.documents)
        part_tokens = min(PART_ANSWER_TOKENS, self.options.max_tokens)  # parts keep the user's sampling
        part_budget = self._content_budget(PART_REQUEST.format(index=99, count=99), part_tokens)
        final_budget = self._content_budget(self.question, self.options.max_tokens)
        items = [p for doc in self.documents for p in passages(doc.text, self._count)]
        levels, first_parts = [], None
        while sum(p.tokens for p in items) > final_budget:
            groups = balanced_parts(items, part_budget)
            first_parts = first_parts or len(groups)
            level, count = len(levels) + 1, len(groups)
            summaries = [
                self._summarize_group(
                    group,
                    name,
                    PART_REQUEST.format(index=index, count=count),
                    f"level {level}, part {index} of {count}" if level > 1 else f"part {index} of {count}",
                    sampling,
                    part_tokens,
                    on_progress,
                )
                for index, group in enumerate(groups, 1)
            ]
            levels.append(summaries)
            shorter = [Passage(i, text, self._count(text)) for i, text in enumerate(summaries)]
            if sum(p.tokens for p in shorter) >= sum(p.tokens for p in items):
                raise SelfExtendError("the part summaries are no shorter than the parts: lower --max-tokens")
            items = shorter
        joined = "\n\n".join(f"Part {i + 1}: {p.text}" for i, p in enumerate(items))
        session = self._session([Document(REDUCE_NAME.format(name=name), joined, "text")], self.question)
        announce(session)
        answer = session.ask(self.question, sampling, on_text, on_progress)
        return DocumentAnswer(
            answer,
            session,
            MAP_REDUCE,
            self.document_tokens,
            parts=first_parts,
            levels=len(levels) + 1,
            part_summaries=levels,
        )

    def _summarize_group(self, group, name, request, where, sampling, max_tokens, on_progress) -> str:
        """The summary of consecutive passages. A small model can give nothing at all for a long
        part (SmolLM2-135M did, for 27k tokens of a novel at G=7): such a part is summarized in
        two halves instead, each at a smaller G, down to a single passage."""
        text = "\n\n".join(p.text for p in group)
        summary = self._summarize_part(text, name, request, where, sampling, max_tokens, on_progress)
        if summary or len(group) < 2:
            return summary
        first, second = halves(group)
        self.notice(f"no summary of {where}: summarizing it in two halves")
        pieces = [
            self._summarize_group(half, name, request, f"{where}, {label} half", sampling, max_tokens, on_progress)
            for half, label in ((first, "first"), (second, "second"))
        ]
        return "\n".join(piece for piece in pieces if piece)

    def _summarize_part(self, text, name, request, where, sampling, max_tokens, on_progress) -> str:
        info = self.info
        key = SummaryMemo.key(
            info.model_id, info.revision, self.system, request, text, sampling, max_tokens, self.options.window
        )
        kept = self.memo.get(key)
        if kept is not None:
            self.notice(f"summarizing {where}: kept from an earlier run")
            return kept
        started = time.perf_counter()
        session = self._session([Document(f"{name} ({where})", text, "text")], request, max_tokens=max_tokens)
        self.notice(f"summarizing {where}: {session.plan.prompt_tokens:,} tokens, {session.plan.settings.describe()}")
        answer = session.ask(request, sampling, on_progress=on_progress)
        self.notice(f"summarized {where} in {time.perf_counter() - started:.0f}s")
        summary = answer.text.strip()
        if summary:  # an empty one is worth another try (in halves, or another day)
            self.memo.put(key, summary)
        return summary
