"""Turn a model reference into a loaded mlx-lm model and tokenizer, SelfExtend applied."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx_lm.utils import load_model, load_tokenizer

from .config import SelfExtendConfig
from .patch import apply_selfextend


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the project needs to know about a loaded model."""

    model_id: str  # stable name recorded in cache files
    family: str  # mlx-lm model_type
    trained_context: int  # L
    path: Optional[str] = None


def model_info(model: nn.Module) -> Optional[ModelInfo]:
    return getattr(model, "model_info", None)


def load(
    model_ref=None,
    group_size: Optional[int] = None,
    window: Optional[int] = None,
    selfextend: bool = True,
):
    """Load a model and its tokenizer; with `selfextend`, apply SelfExtend(G, W)."""
    path = Path(model_ref)
    model, config = load_model(path)
    tokenizer = load_tokenizer(path)
    trained = int(config.get("max_position_embeddings") or 4096)
    model.model_info = ModelInfo(
        model_id=str(path.resolve()), family=config["model_type"], trained_context=trained, path=str(path)
    )
    if selfextend:
        window = window or trained // 4
        group_size = group_size or 4
        apply_selfextend(model, SelfExtendConfig(group_size=group_size, window=window))
    return model, tokenizer
