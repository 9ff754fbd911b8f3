"""Pieces every evaluation shares: argument parsing, the modes (a method under a name: plain,
SelfExtend given or planned, or any of evaluation.methods), fresh caches and greedy decoding."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from ..core.config import SelfExtendConfig
from ..core.patch import make_cache, use_selfextend
from ..core.prefill import prefill
from ..errors import EvaluationError
from ..loading.load import model_shape
from ..planning import ModelLimits, Settings, choose_settings, given_settings, kv_group_size, plain_settings
from .methods import PLAIN, SELFEXTEND, Setup, method_setup


def parse_depths(text: str) -> list[float]:
    try:
        depths = [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise EvaluationError(f"depths must be numbers between 0 and 1, got {text!r}") from None
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvaluationError(f"depths must be numbers between 0 and 1, got {text!r}")
    return depths


@dataclass(frozen=True)
class Mode:
    """How the model runs during one pass: plainly, with SelfExtend(config), or (limits
    given) with what planning chooses for each prompt's length, as the product does; or, with
    `method` and the model's `bounds`, one of evaluation.methods (`factor`: a RoPE scaling's)."""

    name: str
    config: Optional[SelfExtendConfig] = None
    limits: Optional[ModelLimits] = None
    method: Optional[str] = None
    bounds: Optional[ModelLimits] = None
    factor: Optional[float] = None

    @property
    def kind(self) -> str:
        """The method's name (plain or selfextend for the modes without one)."""
        if self.method is not None:
            return self.method
        return PLAIN if self.config is None and self.limits is None else SELFEXTEND

    def setup_for(self, tokens: int, max_tokens: int = 0) -> Setup:
        """The method's Setup for a pass over `tokens` tokens (prompt + answer)."""
        if self.kind in (PLAIN, SELFEXTEND):
            return Setup(self.kind, self.settings_for(tokens))
        bounds = self.bounds
        return method_setup(
            self.kind,
            tokens,
            trained_context=bounds.trained_context,
            context=bounds.context,
            max_tokens=max_tokens,
            factor=self.factor,
        )

    @property
    def planned(self) -> bool:
        return self.limits is not None

    def settings_for(self, tokens: int) -> Settings:
        """planning's Settings for a pass over `tokens` tokens."""
        if self.limits is not None:
            return choose_settings(self.limits, tokens)
        if self.method not in (None, SELFEXTEND) or self.config is None:
            return plain_settings(tokens)
        return given_settings(self.config.group_size, self.config.window, tokens)

    def config_for(self, tokens: int) -> Optional[SelfExtendConfig]:
        """The configuration for a pass over `tokens` tokens (None: plain attention)."""
        if self.limits is None:
            return self.config
        return self.settings_for(tokens).config()


def use_mode(model, mode: Mode, tokens: int = 0) -> Optional[SelfExtendConfig]:
    """Put the one loaded model in `mode` for a pass over `tokens` tokens; returns the config."""
    config = mode.config_for(tokens)
    use_selfextend(model, config)
    return config


def new_cache(model, kv_bits: Optional[int] = None) -> list:
    if kv_bits is None:
        return make_cache(model)
    # Small heads need a smaller quantization group (or cannot be quantized: one error line).
    head_dim = model_shape(vars(model.args)).head_dim
    return make_cache(model, kv_bits=kv_bits, kv_group_size=kv_group_size(head_dim, kv_bits))


def greedy_generate(
    model,
    prompt: Sequence[int],
    cache: list,
    max_tokens: int,
    chunk_size: int,
    stop_ids: Sequence[int] = (),
    on_progress: Optional[Callable[[int], None]] = None,
) -> list[int]:
    """Greedy decoding: the paper's passkey protocol (no sampling, so runs repeat exactly)."""
    if not prompt:
        raise EvaluationError("nothing to feed: the prompt is empty")
    progress = None if on_progress is None else chunk_progress(on_progress)
    logits = prefill(model, cache, prompt, step=chunk_size, on_progress=progress, keep_last=True)
    stop = set(stop_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(mx.argmax(logits).item())
        if token in stop:
            break
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out


def chunk_progress(on_tokens: Callable[[int], None]):
    """prefill's (done, total, seconds) progress as the evaluations' tokens-done increments."""
    done = 0

    def progress(now: int, total: int, seconds: float) -> None:
        nonlocal done
        if now > done:
            on_tokens(now - done)
        done = now

    return progress
