"""SelfExtend attention for MLX language models: long inputs without fine-tuning."""

from .cache import CacheMismatchError, load_cache, make_cache, save_cache
from .config import SelfExtendConfig
from .loading import ModelInfo, load, model_info
from .patch import apply_selfextend, remove_selfextend, selfextend_config

__all__ = [
    "CacheMismatchError",
    "ModelInfo",
    "SelfExtendConfig",
    "apply_selfextend",
    "load",
    "load_cache",
    "make_cache",
    "model_info",
    "remove_selfextend",
    "save_cache",
    "selfextend_config",
]
