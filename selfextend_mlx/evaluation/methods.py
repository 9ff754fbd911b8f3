"""The evaluations' arms: each long-context method a name, and for one pass over `tokens`
tokens (prompt + answer) a Setup: the planning Settings its Plan runs under, what it patches into
the model, and what it does to the prompt. The turn runner runs every method; nothing here
prefills or generates.

  plain       the model as trained.
  selfextend  SelfExtend: G/W as planning chooses for the length (plain where it fits), or -G/-W.
  linear      position interpolation: mlx-lm's `initialize_rope` with {"type": "linear"}.
  ntk         dynamic NTK: the base mlx-lm's DynamicNTKScalingRoPE computes for a sequence of
              `tokens` tokens, fixed for the whole pass (mlx-lm's module recomputes it at each
              call, which in a chunked prefill would rotate each chunk's keys with another base).
  yarn        YaRN: mlx-lm's `initialize_rope` with {"type": "yarn"} (its YarnRoPE).
  string      STRING (selfextend_mlx.core.string), the paper's S = L/3 and w = 128.
  truncate    the prompt's last tokens that leave room for the answer in the model's context,
              as Ollama does with an over-long prompt.
  retrieval   the BM25 passages `ask` fills the context with past its reach (app/passages.py's
              select_passages), then the question.

The RoPE scalings take a factor; by default the one that covers the length, tokens / L (L the
trained context), and so none (the plain model, the same computation) where the input fits.
For ntk the factor is mlx-lm's dynamic factor f: the base grows for alpha = f * tokens / L -
(f - 1), so f = 1 (the default) scales it for tokens / L. STRING is the plain model while every
distance is below S; truncate and retrieval are while the prompt and answer fit the context.
Two setups with equal `key`s compute the same thing, so an evaluation runs one of them.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from ..app.longdoc import MARGIN
from ..app.passages import PASSAGE_TOKENS, join_selected, passages, select_passages
from ..core.families import family_for
from ..core.patch import layer_attention, use_selfextend
from ..core.string import StringConfig, apply_string, string_defaults
from ..errors import EvaluationError
from ..planning import Settings, plain_settings

PLAIN, SELFEXTEND, LINEAR, NTK, YARN, STRING, TRUNCATE, RETRIEVAL = (
    "plain",
    "selfextend",
    "linear",
    "ntk",
    "yarn",
    "string",
    "truncate",
    "retrieval",
)
METHODS = (PLAIN, SELFEXTEND, LINEAR, NTK, YARN, STRING, TRUNCATE, RETRIEVAL)
ROPE_SCALINGS = (LINEAR, NTK, YARN)
PROMPT_METHODS = (TRUNCATE, RETRIEVAL)  # they change the prompt, not the model


def parse_methods(text: str) -> list[str]:
    """`plain,selfextend,yarn` -> the names, checked: known, none twice, at least one."""
    names = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise EvaluationError(
            f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(METHODS)}"
        )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise EvaluationError(f"--methods names {', '.join(twice)} more than once")
    return names


def check_factor(factor: Optional[float], methods) -> None:
    if factor is None:
        return
    if not [m for m in methods if m in ROPE_SCALINGS]:
        raise EvaluationError(f"--factor scales RoPE: add one of {', '.join(ROPE_SCALINGS)} to --methods")
    if not (factor >= 1.0 and math.isfinite(factor)):
        raise EvaluationError(f"--factor must be a number >= 1, got {factor}")


@dataclass(frozen=True)
class Setup:
    """One method's pass over `tokens` tokens.

    settings: planning's Settings for the Plan (SelfExtend's G/W; plain for every other method).
    factor: a RoPE scaling's factor (None: the model's own RoPE).
    string: STRING's S and w (None: not shifted).
    keep: the prompt tokens a prompt method keeps (None: the whole prompt).
    """

    method: str
    settings: Settings
    factor: Optional[float] = None
    string: Optional[StringConfig] = None
    keep: Optional[int] = None
    length: Optional[int] = None  # ntk: the sequence length its base is computed for

    @property
    def key(self) -> tuple:
        """What is computed: equal keys, equal answers (every plain pass is ("plain",))."""
        if self.factor is not None:
            return (self.method, self.factor, self.length)
        if self.string is not None:
            return (STRING, self.string.offset, self.string.local_window)
        if self.keep is not None:
            return (self.method, self.keep)
        if not self.settings.plain:
            return (SELFEXTEND, self.settings.group_size, self.settings.window)
        return (PLAIN,)

    def describe(self) -> dict:
        """For --json: the method and what it ran with."""
        out = {"method": self.method, "plain": self.key == (PLAIN,)}
        if not self.settings.plain:
            out.update(group_size=self.settings.group_size, window=self.settings.window)
        if self.factor is not None:
            out["factor"] = self.factor
        if self.string is not None:
            out.update(offset=self.string.offset, local_window=self.string.local_window)
        if self.keep is not None:
            out["kept_tokens"] = self.keep
        return out


def covering_factor(tokens: int, trained_context: int) -> float:
    """The RoPE factor that stretches the trained context over `tokens` (1: it fits)."""
    return round(max(1.0, tokens / trained_context), 4)


def method_setup(
    method: str,
    tokens: int,
    *,
    trained_context: int,
    context: int,
    max_tokens: int = 0,
    selfextend: Optional[Settings] = None,
    factor: Optional[float] = None,
) -> Setup:
    """The Setup of `method` for `tokens` tokens (prompt + answer); `selfextend` is SelfExtend's
    Settings for them, `context` where the plain model works (truncate and retrieval fill it)."""
    plain = plain_settings(tokens)
    if method == SELFEXTEND:
        return Setup(method, selfextend)
    if method == NTK:  # at or below L the dynamic base is the model's own, whatever the factor
        return (
            Setup(method, plain, factor=factor or 1.0, length=tokens)
            if tokens > trained_context
            else Setup(method, plain)
        )
    if method in ROPE_SCALINGS:
        scaled = factor or covering_factor(tokens, trained_context)
        return Setup(method, plain, factor=None if scaled == 1.0 else scaled)
    if method == STRING:
        config = string_defaults(trained_context)
        return Setup(method, plain, string=config if tokens > config.offset else None)
    if method in PROMPT_METHODS:
        keep = context - max_tokens
        if keep < 1:
            raise EvaluationError(f"an answer of {max_tokens} tokens leaves no room in the {context}-token context")
        return Setup(method, plain_settings(context), keep=keep if tokens > context else None)
    return Setup(PLAIN, plain)


# -- patching the model for a pass ------------------------------------------------------------------


def dynamic_ntk_base(base: float, dims: int, factor: float, tokens: int, trained_context: int) -> float:
    """The RoPE base mlx-lm's DynamicNTKScalingRoPE uses for a sequence of `tokens` tokens."""
    seq = max(tokens, trained_context)
    return base * ((factor * seq / trained_context) - (factor - 1)) ** (dims / (dims - 2))


def scaled_rope(rope, setup: Setup, trained_context: int):
    """A rope module for `setup`, built from the model's own plain RoPE with mlx-lm's classes."""
    if type(rope) is not nn.RoPE or getattr(rope, "scale", 1.0) != 1.0:
        raise EvaluationError(
            f"{setup.method} rescales a plain RoPE; this model's is {type(rope).__name__} (already scaled)"
        )
    dims, base, traditional = rope.dims, rope.base, rope.traditional
    if setup.method == NTK:
        return nn.RoPE(
            dims,
            traditional=traditional,
            base=dynamic_ntk_base(base, dims, setup.factor, setup.length, trained_context),
        )
    if setup.method == LINEAR:
        return initialize_rope(dims, base, traditional, {"type": "linear", "factor": setup.factor})
    scaling = {"type": "yarn", "factor": setup.factor, "original_max_position_embeddings": trained_context}
    return initialize_rope(dims, base, traditional, scaling, math.ceil(setup.factor * trained_context))


def global_attention(model) -> list:
    """The attention modules a method changes: every layer's but the sliding-window ones."""
    modules = []
    for layer in model.layers:
        attention = layer_attention(layer)
        family = family_for(attention)
        if family is None or not family.is_sliding(layer, attention):
            modules.append(attention)
    return modules


@contextmanager
def own_ropes(model):
    """Yield `apply(setup, trained_context)`, which patches the model for a setup (after
    the turn runner put it in its plan's attention); the model's own ropes come back on exit."""
    originals = [(attention, attention.rope) for attention in global_attention(model)]

    def apply(setup: Setup, trained_context: int) -> None:
        for attention, rope in originals:
            attention.rope = rope if setup.factor is None else scaled_rope(rope, setup, trained_context)
        if setup.string is not None:
            apply_string(model, setup.string)

    try:
        yield apply
    finally:
        for attention, rope in originals:
            attention.rope = rope


@contextmanager
def applied(model, setup: Setup, trained_context: int):
    """The model patched for `setup` (a pass without the turn runner, as perplexity scores);
    plain again, with its own ropes, on exit."""
    use_selfextend(model, setup.settings.config())
    with own_ropes(model) as apply:
        apply(setup, trained_context)
        try:
            yield
        finally:
            use_selfextend(model, None)


# -- what a prompt method does to the prompt ------------------------------------------------------


def method_prompt(setup: Setup, prompt, encode, count) -> list:
    """The tokens `setup` feeds for `prompt` (an evaluation prompt: its text ends with its
    question). `encode` makes the prompt's tokens; `count` counts a piece of text's."""
    tokens = list(prompt.tokens)
    if setup.keep is None or len(tokens) <= setup.keep:
        return tokens
    if setup.method == RETRIEVAL:
        tokens = list(encode(retrieved_text(prompt, setup.keep, count)))
    return tokens[-setup.keep :]  # truncate; a retrieval that came out long is cut the same way


def retrieved_text(prompt, budget: int, count) -> str:
    """The prompt's intro, the passages BM25 ranks highest for its question as many as fill
    `budget` tokens with the question (in document order, gaps marked), then the question on
    a line of its own. Fewer passages while the whole comes out longer than `budget`: cut
    from the front instead (as method_prompt would), it would lose the intro and a key at
    depth 0, as a 32k passkey did."""
    body = prompt.text[len(prompt.intro) : len(prompt.text) - len(prompt.question)]
    room = max(0, int((budget - count(prompt.intro) - count(prompt.question)) * (1 - MARGIN)))
    # `ask`'s passages, smaller where the context is small, so that several fit
    pieces = passages(body, count, size=max(1, min(PASSAGE_TOKENS, room // 4)))
    while True:
        text = prompt.intro + join_selected(select_passages(pieces, prompt.question, room)) + "\n" + prompt.question
        over = count(text) - budget
        if over <= 0 or room == 0:
            return text
        room = max(0, room - over)
