"""SelfExtend attention for MLX language models: long inputs without fine-tuning.

The public API is imported on first use, so `import selfextend_mlx` (and the command line's
--help) does not load MLX, mlx-lm or transformers.
"""

from importlib import import_module

_EXPORTS = {
    "CacheMismatchError": "selfextend_mlx.errors",
    "SelfExtendConfig": "selfextend_mlx.core.config",
    "apply_selfextend": "selfextend_mlx.core.patch",
    "remove_selfextend": "selfextend_mlx.core.patch",
    "selfextend_config": "selfextend_mlx.core.patch",
    "make_cache": "selfextend_mlx.core.patch",
    "load_cache": "selfextend_mlx.core.cache_file",
    "save_cache": "selfextend_mlx.core.cache_file",
    "ModelInfo": "selfextend_mlx.loading.load",
    "load": "selfextend_mlx.loading.load",
    "model_info": "selfextend_mlx.loading.load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'selfextend_mlx' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
