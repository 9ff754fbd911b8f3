"""Speed and memory of plain attention, SelfExtend, and a reference-style SelfExtend baseline,
measured in one process on the same model and lengths.

The reference-style baseline does what the authors' own implementation does: it keeps keys
unrotated, and at every step re-rotates the whole key cache twice (normal and grouped
positions), builds two full score matrices, merges them with `where`, then one softmax.
"""

import time
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .attention import rope_at, rope_grouped
from .cache import cache_nbytes, make_cache
from .config import SelfExtendConfig
from .models import family_for
from .patch import apply_selfextend, layer_attention, remove_selfextend, selfextend_config

MODES = ("plain", "selfextend", "reference")


@dataclass
class BenchRow:
    length: int
    mode: str
    prefill_tps: float
    decode_tps: float
    peak_memory_bytes: int
    kv_cache_bytes: int

    def as_dict(self):
        return asdict(self)


# -- reference-style baseline ------------------------------------------------------------------


def _reference_call(self, x, mask=None, cache=None):
    family, config = self._selfextend_family, self._reference_config
    q, k, v = family.project(self, x)
    start = cache.offset
    k, v = cache.update_and_fetch(k, v)  # unrotated keys
    n, L = k.shape[2], q.shape[2]
    G, W = config.group_size, config.window
    # Every step re-rotates the whole cache, at normal and at grouped positions.
    k_neighbor = rope_at(self.rope, k, 0)
    k_grouped = rope_grouped(self.rope, k, 0, G)
    q_neighbor = rope_at(self.rope, q, start)
    q_grouped = rope_grouped(self.rope, q, start, G, config.shift)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k_neighbor, k_grouped, v = (mx.repeat(t, rep, axis=1) for t in (k_neighbor, k_grouped, v))
    scale = family.scale(self)
    s_neighbor = (q_neighbor * scale) @ k_neighbor.swapaxes(-1, -2)
    s_grouped = (q_grouped * scale) @ k_grouped.swapaxes(-1, -2)
    d = mx.arange(start, start + L)[:, None] - mx.arange(n)[None]
    s = mx.where(d >= 0, mx.where(d < W, s_neighbor, s_grouped), -mx.inf)
    out = mx.softmax(s.astype(mx.float32), axis=-1).astype(v.dtype) @ v
    return family.output(self, out)


_reference_classes = {}


def apply_reference_baseline(model, config: SelfExtendConfig):
    remove_selfextend(model)
    for layer in model.layers:
        attention = layer_attention(layer)
        family = family_for(attention)
        if family.is_sliding(layer, attention):
            continue
        cls = type(attention)
        if cls not in _reference_classes:
            _reference_classes[cls] = type(f"Reference{cls.__name__}", (cls,), {"__call__": _reference_call})
        attention.__class__ = _reference_classes[cls]
        attention._reference_original = cls
        attention._selfextend_family = family
        attention._reference_config = config
    return model


def remove_reference_baseline(model):
    for layer in model.layers:
        attention = layer_attention(layer)
        original = getattr(attention, "_reference_original", None)
        if original is not None:
            attention.__class__ = original
            del attention._reference_original, attention._selfextend_family, attention._reference_config
    return model


# -- measuring --------------------------------------------------------------------------------


def _use_mode(model, mode, config):
    remove_reference_baseline(model)
    remove_selfextend(model)
    if mode == "selfextend":
        apply_selfextend(model, config)
        return make_cache(model)
    if mode == "reference":
        apply_reference_baseline(model, config)
        return [KVCache() for _ in model.layers]
    return make_prompt_cache(model)


def measure(model, tokens: mx.array, mode: str, config: SelfExtendConfig, decode_steps=16, prefill_step=512):
    """Prefill `tokens`, then decode `decode_steps` tokens; returns a BenchRow."""
    cache = _use_mode(model, mode, config)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for s in range(0, tokens.size, prefill_step):
        logits = model(tokens[None, s : s + prefill_step], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    prefill_time = time.perf_counter() - start
    y = logits[:, -1:].argmax(axis=-1)
    mx.eval(y)
    # one warm-up step, then the timed ones
    y = model(y, cache=cache)[:, -1:].argmax(axis=-1)
    mx.eval(y)
    start = time.perf_counter()
    for _ in range(decode_steps):
        y = model(y, cache=cache)[:, -1:].argmax(axis=-1)
        mx.eval(y)
    decode_time = time.perf_counter() - start
    return BenchRow(
        length=int(tokens.size),
        mode=mode,
        prefill_tps=tokens.size / prefill_time,
        decode_tps=decode_steps / decode_time,
        peak_memory_bytes=int(mx.get_peak_memory()),
        kv_cache_bytes=int(cache_nbytes(cache)),
    )


def run_bench(model, tokens: mx.array, lengths, config: SelfExtendConfig, modes=MODES, decode_steps=16,
              prefill_step=512, repeats=1, on_row=None):
    """Measure every mode at every length; with repeats > 1 modes alternate and the fastest
    run of each is kept (this machine's other load only ever slows a run down)."""
    original = selfextend_config(model)
    rows = []
    try:
        for length in lengths:
            if length > tokens.size:
                raise ValueError(f"need {length} tokens of text, have {tokens.size}")
            best = {}
            for _ in range(repeats):
                for mode in modes:
                    row = measure(model, tokens[:length], mode, config, decode_steps, prefill_step)
                    kept = best.get(mode)
                    if kept is None:
                        best[mode] = row
                    else:
                        kept.prefill_tps = max(kept.prefill_tps, row.prefill_tps)
                        kept.decode_tps = max(kept.decode_tps, row.decode_tps)
                        kept.peak_memory_bytes = max(kept.peak_memory_bytes, row.peak_memory_bytes)
            for mode in modes:
                rows.append(best[mode])
                if on_row:
                    on_row(best[mode])
    finally:
        remove_reference_baseline(model)
        remove_selfextend(model)
        if original is not None:
            apply_selfextend(model, original)
    return rows
