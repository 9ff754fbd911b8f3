"""Run retrieval prompts (passkey or needle) over a length x depth grid, per mode."""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from ..app.generation import Sampling
from ..app.turns import TurnRunner
from ..defaults import PREFILL_STEP
from ..loading.load import model_info
from ..planning import plan_with
from .common import Mode, chunk_progress
from .methods import method_prompt, own_ropes
from .prompts import RetrievalPrompt

GREEDY = Sampling(stop_loops=False)  # the paper's passkey protocol: argmax, no loop detection


@dataclass
class Cell:
    """One (length, depth) point: its prompts and how many each mode got right."""

    length: int
    depth: float
    prompts: list
    correct: dict = field(default_factory=dict)  # mode name -> count
    outputs: dict = field(default_factory=dict)  # mode name -> decoded answers
    settings: dict = field(default_factory=dict)  # mode name -> (G, W), G=1 for plain attention
    setups: dict = field(default_factory=dict)  # mode name -> its methods.Setup

    @property
    def trials(self) -> int:
        return len(self.prompts)

    @property
    def tokens(self) -> int:
        """Prompt length actually reached (the longest of the trials)."""
        return max(len(p.tokens) for p in self.prompts)


def passkey_keys(seed: int, lengths: Sequence[int], depths: Sequence[float], trials: int) -> dict:
    """Random 5-digit keys, fixed by the seed alone, so every mode and model sees the same ones."""
    rng = random.Random(seed)
    return {
        (length, depth): [str(rng.randrange(10000, 100000)) for _ in range(trials)]
        for length in lengths
        for depth in depths
    }


def build_cells(
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    make_prompt: Callable[[int, float, int], RetrievalPrompt],
) -> list[Cell]:
    return [
        Cell(length, depth, [make_prompt(length, depth, t) for t in range(trials)])
        for length in lengths
        for depth in depths
    ]


def run_cells(
    model,
    tokenizer,
    cells: Sequence[Cell],
    modes: Sequence[Mode],
    max_tokens: int,
    kv_bits: Optional[int] = None,
    chunk_size: int = PREFILL_STEP,
    on_tokens: Optional[Callable[..., None]] = None,
    encode: Optional[Callable[[str], list]] = None,
) -> None:
    """Fill each cell's `correct`, `outputs`, `settings` and `setups` for every mode.

    A mode's method is set up for each cell's length (methods.Setup: a planned SelfExtend is
    plain attention where it fits, as the product runs it; a RoPE scaling takes the factor
    that covers the length). Prompts of one length share their filler up to the needle, so
    the turn runner cuts its cache back to the common prefix with the previous prompt instead
    of rebuilding it: at five depths (deepest first) that saves about a third of the prefill.
    A cell that a mode runs as the same computation as a mode before it (equal Setup keys: a
    planned mode inside the context is plain attention, as is yarn there) takes that mode's
    answers. `on_tokens(n, computed=...)` hears of prompt tokens done, chunk by chunk, and of
    those reused or left out (computed=False). `encode` makes a
    prompt method's new prompt (default: the tokenizer's).
    """
    info = model_info(model)
    encode = encode or tokenizer.encode
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    for mode in modes:
        runner, last_key = TurnRunner(model, tokenizer, model_info=info), None
        with own_ropes(model) as patch:
            for cell in cells:
                setup = cell.setups[mode.name] = mode.setup_for(cell.tokens + max_tokens, max_tokens)
                cell.settings[mode.name] = _group_and_window(setup)
                if _take_answers(cell, mode.name, on_tokens):
                    continue
                prompts = [method_prompt(setup, prompt, encode, count) for prompt in cell.prompts]
                longest = max(len(p) for p in prompts)
                plan = plan_with(
                    info,
                    setup.settings,
                    longest + max_tokens,
                    prompt_tokens=longest,
                    max_tokens=max_tokens,
                    kv_bits=kv_bits,
                    prefill_step=chunk_size,
                )
                runner.use(plan)
                if setup.key != last_key:  # a cache is only ever extended by the computation that made it
                    runner.drop()
                    last_key = setup.key
                patch(setup, info.trained_context)
                cell.outputs[mode.name] = [
                    _greedy_answer(runner, fed, on_tokens, len(prompt.tokens) - len(fed))
                    for prompt, fed in zip(cell.prompts, prompts)
                ]
                cell.correct[mode.name] = sum(p.accepts(o) for p, o in zip(cell.prompts, cell.outputs[mode.name]))


def _group_and_window(setup) -> tuple:
    settings = setup.settings
    return (1, 0) if settings.plain else (settings.group_size, settings.window)


def _take_answers(cell: Cell, name: str, on_tokens) -> bool:
    """A mode before this one in `cell` computed the same thing: take its answers."""
    key = cell.setups[name].key
    same = [other for other, setup in cell.setups.items() if other != name and setup.key == key]
    if not same:
        return False
    cell.outputs[name], cell.correct[name] = list(cell.outputs[same[0]]), cell.correct[same[0]]
    if on_tokens is not None:
        on_tokens(sum(len(p.tokens) for p in cell.prompts), computed=False)
    return True


def _greedy_answer(runner: TurnRunner, prompt: Sequence[int], on_tokens, skipped: int = 0) -> str:
    """The greedy answer after `prompt`; on_tokens hears of every prompt token, reused or fed
    (and of the `skipped` tokens of the original prompt a prompt method left out)."""
    progress = None
    if on_tokens is not None:
        on_tokens(runner.rewind(prompt[:-1]) + skipped, computed=False)
        progress = chunk_progress(on_tokens)
    answer = runner.answer(prompt, GREEDY, on_progress=progress)
    if on_tokens is not None:
        on_tokens(1)  # the prompt's last token, read with the first answer token
    return runner.tokenizer.decode(answer.token_ids)


def accuracy(cells: Sequence[Cell], mode_name: str) -> float:
    trials = sum(c.trials for c in cells)
    return sum(c.correct[mode_name] for c in cells) / trials if trials else float("nan")
