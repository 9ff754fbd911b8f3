"""Run retrieval prompts (passkey or needle) over a length x depth grid, per mode."""

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .common import Mode, greedy_generate, new_cache, use_mode
from .prompts import RetrievalPrompt, answer_found

PASSKEY_MAX_TOKENS = 10  # five digits plus whatever the tokenizer puts around them
NEEDLE_MAX_TOKENS = 32


@dataclass
class Cell:
    """One (length, depth) point: its prompts and how many each mode got right."""

    length: int
    depth: float
    prompts: list
    correct: dict = field(default_factory=dict)  # mode name -> count
    outputs: dict = field(default_factory=dict)  # mode name -> decoded answers

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
    return {(length, depth): [str(rng.randrange(10000, 100000)) for _ in range(trials)]
            for length in lengths for depth in depths}


def build_cells(lengths: Sequence[int], depths: Sequence[float], trials: int,
                make_prompt: Callable[[int, float, int], RetrievalPrompt]) -> list[Cell]:
    return [Cell(length, depth, [make_prompt(length, depth, t) for t in range(trials)])
            for length in lengths for depth in depths]


def run_cells(model, tokenizer, cells: Sequence[Cell], modes: Sequence[Mode], max_tokens: int,
              kv_bits: Optional[int] = None, chunk_size: int = 512,
              on_prompt: Optional[Callable[[int], None]] = None) -> None:
    """Fill each cell's `correct` and `outputs` for every mode (the model is switched once per mode)."""
    stop_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    for mode in modes:
        use_mode(model, mode)
        for cell in cells:
            outputs = []
            for prompt in cell.prompts:
                answer_tokens = greedy_generate(model, prompt.tokens, new_cache(model, kv_bits),
                                                max_tokens, chunk_size, stop_ids)
                outputs.append(tokenizer.decode(answer_tokens))
                if on_prompt is not None:
                    on_prompt(len(prompt.tokens))
            cell.outputs[mode.name] = outputs
            cell.correct[mode.name] = sum(answer_found(p.answer, o) for p, o in zip(cell.prompts, outputs))


def accuracy(cells: Sequence[Cell], mode_name: str) -> float:
    trials = sum(c.trials for c in cells)
    return sum(c.correct[mode_name] for c in cells) / trials if trials else float("nan")
