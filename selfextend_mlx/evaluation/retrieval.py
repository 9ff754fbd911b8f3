"""Run retrieval prompts (passkey or needle) over a length x depth grid, per mode."""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from ..app.prompts import common_prefix_length
from .common import Mode, greedy_generate, new_cache, use_mode
from .prompts import RetrievalPrompt, answer_found


@dataclass
class Cell:
    """One (length, depth) point: its prompts and how many each mode got right."""

    length: int
    depth: float
    prompts: list
    correct: dict = field(default_factory=dict)  # mode name -> count
    outputs: dict = field(default_factory=dict)  # mode name -> decoded answers
    settings: dict = field(default_factory=dict)  # mode name -> (G, W), G=1 for plain attention

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
    chunk_size: int = 512,
    on_tokens: Optional[Callable[[int], None]] = None,
) -> None:
    """Fill each cell's `correct`, `outputs` and `settings` for every mode.

    A planned mode is set up for each cell's length (plain attention where it fits, as the
    product runs it). Prompts of one length share their filler up to the needle, so the cache
    is trimmed back to the common prefix with the previous prompt instead of being rebuilt:
    at five depths (deepest first) that saves about a third of the prefill. A cell that a mode
    runs with the same attention as a mode before it (a planned mode inside the context is
    plain attention) takes that mode's answers: the computation would be the same one.
    `on_tokens(n)` hears of prompt tokens done, chunk by chunk.
    """
    stop_ids = list(getattr(tokenizer, "eos_token_ids", None) or [])
    for mode in modes:
        reuse, current = None, object()
        for cell in cells:
            config = use_mode(model, mode, cell.tokens + max_tokens)
            cell.settings[mode.name] = (1, 0) if config is None else (config.group_size, config.window)
            same = [
                name for name, ran in cell.settings.items() if name != mode.name and ran == cell.settings[mode.name]
            ]
            if same:
                cell.outputs[mode.name], cell.correct[mode.name] = list(cell.outputs[same[0]]), cell.correct[same[0]]
                if on_tokens is not None:
                    on_tokens(sum(len(p.tokens) for p in cell.prompts))
                continue
            if reuse is None or config != current:
                reuse, current = _PrefixCache(model, kv_bits), config
            outputs = []
            for prompt in cell.prompts:
                cache, held = reuse.rewind(prompt.tokens)
                if on_tokens is not None:
                    on_tokens(held)
                answer_tokens = greedy_generate(
                    model, prompt.tokens[held:], cache, max_tokens, chunk_size, stop_ids, on_progress=on_tokens
                )
                reuse.holds(prompt.tokens + answer_tokens)
                outputs.append(tokenizer.decode(answer_tokens))
            cell.outputs[mode.name] = outputs
            cell.correct[mode.name] = sum(answer_found(p.answer, o) for p, o in zip(cell.prompts, outputs))


class _PrefixCache:
    """One cache reused across prompts, cut back to what the next prompt has in common with it."""

    def __init__(self, model, kv_bits):
        self.model, self.kv_bits = model, kv_bits
        self.cache, self.tokens = new_cache(model, kv_bits), []

    def rewind(self, prompt: Sequence[int]) -> tuple:
        """(cache, tokens of `prompt` it already holds); at least one prompt token is left to feed."""
        keep = min(common_prefix_length(self.tokens, prompt), len(prompt) - 1)
        held = self.cache[0].offset if self.cache else 0
        if keep == held:
            return self.cache, keep
        if keep > 0 and can_trim_prompt_cache(self.cache):
            trim_prompt_cache(self.cache, held - keep)
            return self.cache, keep
        self.cache = new_cache(self.model, self.kv_bits)
        return self.cache, 0

    def holds(self, tokens: Sequence[int]) -> None:
        # Everything generated was fed back except a final stop token: the offset says how much.
        held = self.cache[0].offset if self.cache else 0
        self.tokens = list(tokens[:held])


def accuracy(cells: Sequence[Cell], mode_name: str) -> float:
    trials = sum(c.trials for c in cells)
    return sum(c.correct[mode_name] for c in cells) / trials if trials else float("nan")
