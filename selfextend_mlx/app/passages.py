"""Cutting a document into passages and choosing among them: paragraphs, then sentence ends
of any script, then spaces, then a token count, so that every document can be cut; passages
packed up to a token size; parts of balanced size; and BM25 ranking (bm25s) of passages for a
question, in document order, with a marker where text was left out.
"""

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PASSAGE_TOKENS = 256  # retrieval unit: a few paragraphs
SKIPPED = "\n\n[...]\n\n"  # marks text left out between retrieved passages


@dataclass(frozen=True)
class Passage:
    index: int  # position in the document, in passages
    text: str
    tokens: int


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
    paragraph that fits in one). A passage's `tokens` are its joined text's: the blank lines
    between short paragraphs cost tokens too (a passkey filler's, 4% of its count)."""
    units = []
    for paragraph in paragraphs(text):
        n = count(paragraph)
        units += [(paragraph, n)] if n <= size else [(p, count(p)) for p in _split_long(paragraph, count, size)]
    join = count("\n\n")
    out, texts, tokens = [], [], 0
    for unit, n in units:
        if texts and tokens + join + n > size:
            out.append(_passage(len(out), texts, count))
            texts, tokens = [], 0
        tokens += (join if texts else 0) + n
        texts.append(unit)
    if texts:
        out.append(_passage(len(out), texts, count))
    return out


def _passage(index: int, paragraphs_in_it: list[str], count: Callable[[str], int]) -> Passage:
    joined = "\n\n".join(paragraphs_in_it)
    return Passage(index, joined, count(joined))


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
