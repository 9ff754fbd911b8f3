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
and `answer()` runs it; the final step is always an ordinary Session.
"""

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..core.files import atomic_write
from ..errors import SelfExtendError
from ..loading.load import model_info
from ..planning import FULL, MAP_REDUCE, RETRIEVAL, STRATEGY_FOR_TASK, choose_strategy, fill_reach, summary_reach
from .documents import Document, format_documents
from .generation import Sampling
from .session import Session, SessionOptions
from .turns import Answer

PASSAGE_TOKENS = 256  # retrieval unit: a few paragraphs
PART_ANSWER_TOKENS = 256  # the longest summary of one part
SKIPPED = "\n\n[...]\n\n"  # marks text left out between retrieved passages
COUNT_SLICE = 100_000  # characters tokenized at once when counting a long document
MARGIN = 0.02  # of the reach kept free: tokens of joined pieces differ a little from their sum

PART_REQUEST = (
    "The text above is part {index} of {count} of a longer document. Summarize this part in one concise "
    "paragraph: the people, events, facts and conclusions it contains."
)
REDUCE_NAME = "summaries of the consecutive parts of {name}"


@dataclass(frozen=True)
class Passage:
    index: int  # position in the document, in passages
    text: str
    tokens: int


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


# -- cutting text -----------------------------------------------------------------------------


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs (a text without blank lines: its lines)."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) <= 1:
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    return parts


# Sentence ends of any script: Latin-style ones before a space (not "3.14"), CJK, Indic,
# Arabic, Armenian and Ethiopic ones anywhere (those scripts put no space after them).
_SENTENCE_END = re.compile(r"(?<=[.!?;])(?=\s)|(?<=[。！？｡︒﹒﹖﹗！？；।॥؟۔։።‼⁇⁈⁉])")
_WORD_START = re.compile(r"(?<=\s)(?=\S)")


def _split_long(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """A paragraph longer than `limit` tokens, cut at sentence ends (any script's), a piece
    still too long at spaces, and one with no spaces (base64, minified JSON) at a token count:
    every piece fits `limit`, and joined they are the paragraph."""
    out = []
    for sentence in _pack(_SENTENCE_END.split(text), count, limit):
        if count(sentence) <= limit:
            out.append(sentence)
            continue
        for words in _pack(_WORD_START.split(sentence), count, limit):
            out += [words] if count(words) <= limit else _cut_at_tokens(words, count, limit)
    return [piece.strip() for piece in out if piece.strip()]


def _pack(pieces: list[str], count: Callable[[str], int], limit: int) -> list[str]:
    """Consecutive pieces joined while their tokens fit `limit` (a piece past it stays alone).
    Each run of short pieces is counted once: linear in the text, with few tokenizer calls."""
    out, current, tokens = [], "", 0
    for run in _runs(pieces, limit // 4):
        n = count(run)
        if current and tokens + n > limit:
            out.append(current)
            current, tokens = "", 0
        current += run
        tokens += n
    if current:
        out.append(current)
    return out


def _runs(pieces: list[str], max_bytes: int):
    """Consecutive pieces joined while under `max_bytes` of UTF-8 (a tokenizer gives at most
    about a token a byte, so a run fits wherever its bytes do); a longer piece alone."""
    run, size = "", 0
    for piece in pieces:
        n = len(piece.encode("utf-8", "surrogatepass"))
        if run and size + n > max_bytes:
            yield run
            run, size = "", 0
        run += piece
        size += n
    if run:
        yield run


def _cut_at_tokens(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """Text without any break, cut into slices of at most `limit` tokens."""
    step = max(1, len(text) * limit // max(1, count(text)))
    out, start = [], 0
    while start < len(text):
        size = step
        while size > 1 and count(text[start : start + size]) > limit:
            size //= 2
        out.append(text[start : start + size])
        start += size
    return out


def passages(text: str, count: Callable[[str], int], size: int = PASSAGE_TOKENS) -> list[Passage]:
    """Consecutive paragraphs joined into passages of about `size` tokens (never cutting a
    paragraph that fits in one)."""
    units = []
    for paragraph in paragraphs(text):
        n = count(paragraph)
        units += [(paragraph, n)] if n <= size else [(p, count(p)) for p in _split_long(paragraph, count, size)]
    out, texts, tokens = [], [], 0
    for unit, n in units:
        if texts and tokens + n > size:
            out.append(Passage(len(out), "\n\n".join(texts), tokens))
            texts, tokens = [], 0
        texts.append(unit)
        tokens += n
    if texts:
        out.append(Passage(len(out), "\n\n".join(texts), tokens))
    return out


def balanced_parts(items: Sequence[Passage], budget: int) -> list[list[Passage]]:
    """Consecutive groups of about equal size, each within `budget` tokens, as few as that allows."""
    total = sum(p.tokens for p in items)
    count = max(1, math.ceil(total / budget))
    while True:
        target, groups, current, size = total / count, [], [], 0
        for item in items:
            if current and (size + item.tokens > budget or (size >= target and len(groups) < count - 1)):
                groups.append(current)
                current, size = [], 0
            current.append(item)
            size += item.tokens
        groups.append(current)
        if all(sum(p.tokens for p in g) <= budget for g in groups) or count >= len(items):
            return groups
        count += 1


def halves(items: Sequence[Passage]) -> tuple[list[Passage], list[Passage]]:
    """Two consecutive, non-empty groups of about equal tokens (at least two items given)."""
    total, size, cut = sum(p.tokens for p in items), 0, 1
    while cut < len(items) - 1 and (size + items[cut - 1].tokens) * 2 < total:
        size += items[cut - 1].tokens
        cut += 1
    return list(items[:cut]), list(items[cut:])


def select_passages(items: Sequence[Passage], question: str, budget: int) -> list[Passage]:
    """The passages BM25 ranks highest for `question`, as many as fit `budget` tokens, in
    document order."""
    chosen, used = [], 0
    for i in rank_passages(items, question):
        cost = items[i].tokens + (len(SKIPPED) // 4 if chosen else 0)
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    return [items[i] for i in sorted(chosen)]


def rank_passages(items: Sequence[Passage], question: str) -> list[int]:
    """Indices of `items`: those BM25 scores for `question` first, best first, then every other
    in document order. Passages or a question with no searchable terms (punctuation, emoji,
    stopwords, single letters) score nothing: document order."""
    import bm25s

    order = list(range(len(items)))
    corpus = bm25s.tokenize([p.text for p in items], stopwords="en", show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)
    if not corpus.vocab or not query or not query[0] or not set(query[0]) & set(corpus.vocab):
        return order
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    found, scores = retriever.retrieve(query, k=len(items), show_progress=False)
    scored = [int(i) for i, score in zip(found[0], scores[0]) if score > 0]
    seen = set(scored)
    return scored + [i for i in order if i not in seen]


def join_selected(selected: Sequence[Passage]) -> str:
    text = ""
    for previous, passage in zip([None, *selected], selected):
        if previous is not None:
            text += "\n\n" if passage.index == previous.index + 1 else SKIPPED
        text += passage.text
    return text


# -- part summaries kept on disk ------------------------------------------------------------------


class SummaryMemo:
    """Part summaries by a key of everything that makes them (model and weights, part, request,
    sampling), as small JSON files in `folder`; unreadable or unwritable entries are simply
    recomputed (a notice says why)."""

    def __init__(self, folder: Optional[Path], notice: Callable[[str], None] = lambda message: None):
        self.folder, self.notice = folder, notice

    @staticmethod
    def key(*parts) -> str:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(str(part).encode("utf-8", "surrogatepass") + b"\0")
        return digest.hexdigest()

    def get(self, key: str) -> Optional[str]:
        if self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        summary = data.get("summary") if isinstance(data, dict) and data.get("key") == key else None
        return summary or None  # an empty one (kept by an earlier version) is no summary

    def put(self, key: str, summary: str) -> None:
        if self.folder is None:
            return
        record = {"key": key, "summary": summary, "saved": time.time()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / f"{key}.json") as tmp:
                Path(tmp).write_text(json.dumps(record), encoding="utf-8")
        except OSError as error:
            self.notice(f"could not keep a part summary: {error.strerror or error}")


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
