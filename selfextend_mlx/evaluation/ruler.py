"""RULER-style synthetic tasks, generated here: the task definitions of RULER (Hsieh et al.,
"RULER: What's the Real Context Size of Your Long-Context Language Models?", COLM 2024, arXiv
2404.06654, section 3), with this project's own generator and scorer.

Every task hides needles in a haystack (the passkey filler repeated, or the sentences of a
given text) and asks about them:
  single       one needle "One of the special magic numbers for KEY is: VALUE."; ask its value.
  multikey     four needles of four keys; ask one key's value (the others' values are distractors).
  multivalue   four needles of one key; ask for all of its values.
  multiquery   four needles of four keys; ask for all four keys' values.
  vartrack     a chain "VAR A = VALUE." "VAR B = VAR A." ... (five variables) and a second chain
               of another value; ask which variables hold the first value (the second chain's
               names are distractors).
The asked (first) needle sits at the cell's depth, as in passkey; the others at depths drawn
from the seed (a chain in order). Keys are two words, values seven-digit numbers, variables five
capital letters, all drawn from `random.Random(seed, task, length, depth, trial)`: the same seed
gives the same prompts on any model. An answer is right when it holds every answer as a whole
word and no distractor (RetrievalPrompt.accepts): exact match per task.
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import EvaluationError
from .prompts import PASSKEY_FILLER, RetrievalPrompt, fit_needles, split_sentences

SINGLE, MULTIKEY, MULTIVALUE, MULTIQUERY, VARTRACK = "single", "multikey", "multivalue", "multiquery", "vartrack"
TASKS = (SINGLE, MULTIKEY, MULTIVALUE, MULTIQUERY, VARTRACK)
NEEDLES = 4  # keys (multikey, multiquery) or values (multivalue), as RULER's defaults
CHAIN = 5  # variables in a variable-tracking chain (RULER: one value, four hops)

INTRO = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
)
VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
NEEDLE = "One of the special magic numbers for {key} is: {value}.\n"
ONE = (
    "\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
ALL = (
    "\nWhat are all the special magic numbers for {keys} mentioned in the provided text? "
    "The special magic numbers for {keys} mentioned in the provided text are"
)
VT_FIRST, VT_NEXT = "VAR {name} = {value}.\n", "VAR {name} = VAR {previous}.\n"
VT_QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain of variable assignments in the text above, "
    "{count} variables are assigned the value {value}, they are:"
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "kind", "lucky")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jungle", "kettle")


def parse_tasks(text: str) -> list[str]:
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise EvaluationError(f"--tasks: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class Task:
    """One generated question: its needles (depth, text), the question, what answers it and
    what must not appear (values in the text that answer something else)."""

    intro: str
    needles: list
    question: str
    answers: tuple
    distractors: tuple


def _keys(rng: random.Random, count: int) -> list[str]:
    return rng.sample([f"{a}-{n}" for a in ADJECTIVES for n in NOUNS], count)


def _values(rng: random.Random, count: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]


def _depths(rng: random.Random, depth: float, count: int) -> list[float]:
    """The asked needle at `depth`, then `count - 1` more at seeded depths."""
    return [depth] + [rng.random() for _ in range(count - 1)]


def make_task(task: str, rng: random.Random, depth: float) -> Task:
    if task == VARTRACK:
        return _vartrack(rng, depth)
    many = 1 if task == SINGLE else NEEDLES
    keys = _keys(rng, 1 if task == MULTIVALUE else many)
    values = _values(rng, many)
    pairs = list(zip(keys * many if task == MULTIVALUE else keys, values))
    needles = [(d, NEEDLE.format(key=k, value=v)) for d, (k, v) in zip(_depths(rng, depth, many), pairs)]
    if task in (SINGLE, MULTIKEY):
        return Task(INTRO, needles, ONE.format(key=keys[0]), (values[0],), tuple(values[1:]))
    asked = keys[:1] if task == MULTIVALUE else keys
    return Task(INTRO, needles, ALL.format(keys=", ".join(asked)), tuple(values), ())


def _vartrack(rng: random.Random, depth: float) -> Task:
    names: list[str] = []
    while len(names) < 2 * CHAIN:  # distinct names
        name = "".join(rng.choices(LETTERS, k=5))
        if name not in names:
            names.append(name)
    value, other = _values(rng, 2)
    chain, decoy = names[:CHAIN], names[CHAIN:]
    needles = []
    for group, first_value, start in ((chain, value, depth), (decoy, other, rng.random())):
        depths = [start] + sorted(start + (1 - start) * rng.random() for _ in range(CHAIN - 1))  # in order
        needles.append((depths[0], VT_FIRST.format(name=group[0], value=first_value)))
        needles += [(d, VT_NEXT.format(name=b, previous=a)) for d, a, b in zip(depths[1:], group, group[1:])]
    return Task(VT_INTRO, needles, VT_QUESTION.format(value=value, count=CHAIN), tuple(chain), tuple(decoy))


def task_rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")


def ruler_prompt(
    encode: Callable[[str], list], task: str, length: int, depth: float, seed: int, trial: int, units: Sequence[str]
) -> RetrievalPrompt:
    """Trial `trial` of `task` at `length` tokens, the asked needle at `depth`."""
    generated = make_task(task, task_rng(seed, task, length, depth, trial), depth)
    text, needle_char = fit_needles(encode, generated.intro, units, generated.needles, generated.question, length)
    return RetrievalPrompt(
        text,
        list(encode(text)),
        " ".join(generated.answers),
        depth,
        needle_char,
        generated.intro,
        generated.question,
        answers=generated.answers,
        distractors=generated.distractors,
    )


def haystack_units(text: str = "") -> list[str]:
    """The filler: a text's sentences, or (none given) the passkey filler line repeated."""
    if not text:
        return [PASSKEY_FILLER]
    units = split_sentences(text.strip() + "\n")
    if not units:
        raise EvaluationError("the haystack text is empty")
    return units
