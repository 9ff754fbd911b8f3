"""Retrieval prompts of a target token length with a needle at a chosen depth.

Passkey follows the paper's format exactly (../shared/SELFEXTEND.md); needle-in-a-haystack
uses the user's own text, split at sentence boundaries so the needle never cuts one.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import EvaluationError

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is "

NEEDLE_INTRO = "Read the following text and answer the question after it.\n\n"
NEEDLE_QUESTION = "\n\nQuestion: {question}\nAnswer:"

# Sentence ends: . ! ? (maybe closing a quote or bracket), whitespace, then what starts a
# sentence (a capital or digit, maybe after an opening quote) - so `"Who?" he asked` stays whole.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")

Encoder = Callable[[str], list]


@dataclass(frozen=True)
class RetrievalPrompt:
    text: str
    tokens: list
    answer: str  # what must appear in the model's output
    depth: float
    needle_char: int  # where the (first) needle starts in `text`
    intro: str = ""  # how `text` begins
    question: str = ""  # how `text` ends (what a retrieval method looks passages up for)
    answers: tuple = ()  # several answers (RULER's tasks): all must appear ...
    distractors: tuple = ()  # ... and none of these (values in the text that answer something else)

    def accepts(self, output: str) -> bool:
        """Is `output` right: the answer in it, or (several answers) each of them as a whole
        word and no distractor."""
        if not self.answers:
            return answer_found(self.answer, output)
        return all(word_found(a, output) for a in self.answers) and not any(
            word_found(d, output) for d in self.distractors
        )


def fit_prompt(
    encode: Encoder,
    intro: str,
    units: Sequence[str],
    needle: str,
    question: str,
    length: int,
    depth: float,
    answer: str,
) -> RetrievalPrompt:
    """The longest prompt of whole filler units (cycled) that is at most `length` tokens.

    The needle goes after round(depth * n) of the n units, so depth 0 is right after the
    intro and depth 1 right before the question.
    """
    text, needle_char = fit_needles(encode, intro, units, [(depth, needle)], question, length)
    return RetrievalPrompt(text, list(encode(text)), answer, depth, needle_char, intro, question)


def fit_needles(
    encode: Encoder,
    intro: str,
    units: Sequence[str],
    needles: Sequence[tuple],
    question: str,
    length: int,
) -> tuple[str, int]:
    """The longest text of whole filler units (cycled) with every (depth, needle) in it that is
    at most `length` tokens, and where its first needle starts. A needle at depth d goes after
    round(d * n) of the n units; needles at the same place keep their order."""
    if not units:
        raise EvaluationError("the filler text is empty")
    for depth, _ in needles:
        if not 0.0 <= depth <= 1.0:
            raise EvaluationError(f"depth must be between 0 and 1, got {depth}")

    def build(n: int) -> tuple[str, int]:
        places = sorted(((round(depth * n), i) for i, (depth, _) in enumerate(needles)))
        pieces, start, first = [intro], 0, None
        for place, i in places:
            pieces += [units[u % len(units)] for u in range(start, place)]
            if i == 0:
                first = sum(map(len, pieces))
            pieces.append(needles[i][1])
            start = place
        pieces += [units[u % len(units)] for u in range(start, n)]
        return "".join(pieces) + question, first

    def size(n: int) -> int:
        return len(encode(build(n)[0]))

    if size(0) > length:
        raise EvaluationError(
            f"{length} tokens is too short for the prompt's intro, needles and question ({size(0)} tokens)"
        )
    # Grow an upper bound, then binary search for the largest n that fits.
    low, high = 0, 1
    while size(high) <= length:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if size(middle) <= length:
            low = middle
        else:
            high = middle
    return build(low)


def passkey_prompt(encode: Encoder, length: int, depth: float, key: str) -> RetrievalPrompt:
    return fit_prompt(
        encode,
        PASSKEY_INTRO,
        [PASSKEY_FILLER],
        PASSKEY_LINE.format(key=key),
        PASSKEY_QUESTION,
        length,
        depth,
        answer=key,
    )


def split_sentences(text: str) -> list[str]:
    """Sentences with their trailing whitespace kept, so joining them gives the text back."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def needle_prompt(
    encode: Encoder, haystack: str, needle: str, question: str, answer: str, length: int, depth: float
) -> RetrievalPrompt:
    units = split_sentences(haystack.strip() + "\n")
    if not units:
        raise EvaluationError("the haystack text is empty")
    if not needle.strip():
        raise EvaluationError("the needle text is empty")
    if not answer.strip():
        raise EvaluationError("the answer text is empty")
    # Units end in whitespace, so the needle starts a sentence of its own.
    needle_text = needle.strip() + " "
    return fit_prompt(
        encode,
        NEEDLE_INTRO,
        units,
        needle_text,
        NEEDLE_QUESTION.format(question=question.strip()),
        length,
        depth,
        answer=answer.strip(),
    )


def answer_found(answer: str, output: str) -> bool:
    """Case-insensitive containment, which for a digits-only key is the paper's check."""
    return answer.strip().lower() in output.lower()


def word_found(word: str, output: str) -> bool:
    """`word` in `output` as a whole word, any case (1234567 is not in 12345678)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(word.strip())}(?![0-9A-Za-z])", output, re.IGNORECASE) is not None
