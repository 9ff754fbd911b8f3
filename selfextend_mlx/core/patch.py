"""Apply SelfExtend to an already-loaded mlx-lm model, in place.

Each global attention module gets a subclass of its own class whose __call__ runs SelfExtend:
the parameter tree is untouched, so quantized weights and LoRA adapters keep working, and
`remove_selfextend` puts the original class back.
"""

from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import Llama3RoPE, SuScaledRoPE, YarnRoPE

from ..errors import UnsupportedModelError
from .attention import CachedKV, rotate_queries_and_keys, selfextend_attention
from .cache import QuantizedSelfExtendKVCache, SelfExtendKVCache, is_selfextend_cache
from .config import SelfExtendConfig
from .families import SUPPORTED, family_for

# Ropes whose angle is position x fixed frequencies: these can be evaluated at any position.
SUPPORTED_ROPES = (nn.RoPE, Llama3RoPE, SuScaledRoPE, YarnRoPE)

_patched_classes = {}


def _selfextend_call(self, x, mask=None, cache=None):
    family = self._selfextend_family
    q, k, v = family.project(self, x)
    return family.output(self, _selfextend_attend(self, q * family.scale(self), k, v, cache))


def _selfextend_attend(self, q, k, v, cache):
    """SelfExtend attention of projected, pre-scaled q (and k, v) with `cache`: what
    _selfextend_call does between the projections and the output projection."""
    config = self._selfextend_config
    start = 0 if cache is None else cache.offset
    q_neighbor, q_grouped, neighbor_keys, grouped_keys = rotate_queries_and_keys(self.rope, q, k, start, config)
    if cache is None:
        kv = CachedKV(grouped_keys, v, neighbor_keys, 0)
    elif is_selfextend_cache(cache):
        kv = cache.update_and_fetch(grouped_keys, v, neighbor_keys, self.rope)
    else:
        raise TypeError(
            f"SelfExtend layers need their own cache ({type(cache).__name__} given): "
            "build it with selfextend_mlx.make_cache(model)"
        )
    return selfextend_attention(
        q_neighbor,
        q_grouped,
        kv,
        q_start=start,
        config=config,
        softcap=self._selfextend_family.softcap(self),
        quant=getattr(cache, "quant", None),
    )


def selfextend_rows(attention, x, caches: list):
    """A SelfExtend layer on a batch of rows, row i with its own caches[i]: the projections
    run on all rows at once, the attention row by row exactly as in _selfextend_call."""
    family = attention._selfextend_family
    q, k, v = family.project(attention, x)
    q = q * family.scale(attention)
    rows = [
        _selfextend_attend(attention, q[i : i + 1], k[i : i + 1], v[i : i + 1], cache) for i, cache in enumerate(caches)
    ]
    return family.output(attention, mx.concatenate(rows, axis=0))


def _patched_class(cls, call, prefix):
    if (cls, call) not in _patched_classes:
        _patched_classes[(cls, call)] = type(f"{prefix}{cls.__name__}", (cls,), {"__call__": call})
    return _patched_classes[(cls, call)]


def swap_attention(model, call, prefix: str, config_name: str, config) -> None:
    """Give every global attention module a subclass of its own class whose __call__ is `call`,
    with its family and `config` as plain attributes (out of the parameter tree)."""
    for layer in model.layers:
        attention = layer_attention(layer)
        family = family_for(attention)
        if family.is_sliding(layer, attention):
            continue
        original = getattr(attention, "_patched_original", type(attention))
        attention.__class__ = _patched_class(original, call, prefix)
        attention._patched_original = original
        attention._patched_names = ("_patched_original", "_patched_names", "_selfextend_family", config_name)
        attention._selfextend_family = family
        setattr(attention, config_name, config)


def restore_attention(model) -> None:
    """Undo swap_attention: the original classes, none of the added attributes."""
    for layer in model.layers:
        attention = layer_attention(layer)
        original = getattr(attention, "_patched_original", None)
        if original is not None:
            attention.__class__ = original
            for name in attention._patched_names:
                delattr(attention, name)


def layer_attention(layer):
    return getattr(layer, "self_attn", None)


def selfextend_config_of(attention):
    return getattr(attention, "_selfextend_config", None) if attention is not None else None


def selfextend_config(model):
    """The SelfExtendConfig applied to `model`, or None for a plain model."""
    for layer in model.layers:
        config = selfextend_config_of(layer_attention(layer))
        if config is not None:
            return config
    return None


def make_cache(model, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> list:
    """One cache per layer: SelfExtend caches for SelfExtend layers, the model's own otherwise."""
    own = type(model).make_cache(model) if hasattr(type(model), "make_cache") else [KVCache() for _ in model.layers]
    caches = []
    for layer, base in zip(model.layers, own):
        config = selfextend_config_of(layer_attention(layer))
        if config is None:
            # mlx-lm can quantize only its plain KVCache (not the rotating one of sliding layers)
            quantize = kv_bits is not None and type(base) is KVCache
            caches.append(base.to_quantized(kv_group_size, kv_bits) if quantize else base)
        elif kv_bits is None:
            caches.append(SelfExtendKVCache(config))
        else:
            caches.append(QuantizedSelfExtendKVCache(config, group_size=kv_group_size, bits=kv_bits))
    return caches


def check_supported(model):
    model_type = getattr(getattr(model, "args", None), "model_type", type(model).__module__.rsplit(".", 1)[-1])
    layers = getattr(model, "layers", None)
    if not layers:
        raise UnsupportedModelError(f"model type {model_type!r} has no transformer layers SelfExtend can use")
    for layer in layers:
        attention = layer_attention(layer)
        if family_for(attention) is None:
            raise UnsupportedModelError(
                f"SelfExtend does not support model type {model_type!r}; supported: {', '.join(SUPPORTED)}"
            )
        rope = getattr(attention, "rope", None)
        if not isinstance(rope, SUPPORTED_ROPES):
            raise UnsupportedModelError(
                f"SelfExtend does not support the rotary embedding {type(rope).__name__} of {model_type!r}; "
                "supported: default, linear, llama3, yarn and longrope RoPE"
            )


def apply_selfextend(model, config: SelfExtendConfig):
    """Make every global attention layer of `model` use SelfExtend with `config`; returns it.

    Sliding-window layers never see distances beyond their window, so they stay plain.
    Applying again replaces the configuration.
    """
    if not isinstance(config, SelfExtendConfig):
        raise TypeError("config must be a SelfExtendConfig")
    check_supported(model)
    restore_attention(model)
    swap_attention(model, _selfextend_call, "SelfExtend", "_selfextend_config", config)
    model.make_cache = partial(make_cache, model)
    return model


def remove_selfextend(model):
    """Put the plain attention back; returns the model."""
    restore_attention(model)
    if "make_cache" in vars(model):
        del model.make_cache
    return model


def use_selfextend(model, config: Optional[SelfExtendConfig]) -> None:
    """The one switch between plain attention (None) and SelfExtend(config) for callers that
    share a loaded model between runs; cheap (classes are swapped), a no-op when already so."""
    if config is None:
        remove_selfextend(model)  # also undoes any other attention swap
    elif selfextend_config(model) != config:
        apply_selfextend(model, config)
