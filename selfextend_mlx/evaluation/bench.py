"""Speed and memory of plain attention, SelfExtend, a reference-style SelfExtend baseline and
the other long-context methods (RoPE scalings, STRING: evaluation/methods.py), measured in one
process on the same model and lengths.

The reference-style baseline does what the authors' own implementation does: it keeps keys
unrotated, and at every step re-rotates the whole key cache twice (normal and grouped
positions), builds two full score matrices, merges them with `where`, then one softmax.
"""

import time
from dataclasses import asdict, dataclass

import mlx.core as mx
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..core.attention import rope_at, rope_grouped
from ..core.cache import cache_nbytes
from ..core.config import SelfExtendConfig
from ..core.patch import (
    apply_selfextend,
    make_cache,
    remove_selfextend,
    selfextend_config,
    swap_attention,
    use_selfextend,
)
from ..core.prefill import prefill
from ..defaults import PREFILL_STEP
from ..planning import plain_settings
from .methods import LINEAR, NTK, PLAIN, STRING, YARN, Setup, method_setup, own_ropes

METHOD_MODES = (LINEAR, NTK, YARN, STRING)  # the eval arms that change the model, as eval sets them up
DEFAULT_MODES = ("plain", "selfextend", "reference")
MODES = (*DEFAULT_MODES, *METHOD_MODES)


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


def apply_reference_baseline(model, config: SelfExtendConfig):
    remove_selfextend(model)
    swap_attention(model, _reference_call, "Reference", "_reference_config", config)
    return model


# -- measuring --------------------------------------------------------------------------------


def _use_mode(model, mode, config, apply_method, length: int, trained_context: int):
    """Put `model` in `mode` for `length` tokens; cheap: classes and rope modules are swapped.
    A method mode runs as `eval --methods` would at that length (the plain model where the
    method says it fits)."""
    use_selfextend(model, config if mode == "selfextend" else None)
    if mode == "reference":
        apply_reference_baseline(model, config)
    if mode in METHOD_MODES:
        setup = method_setup(mode, length, trained_context=trained_context, context=trained_context)
    else:
        setup = Setup(PLAIN, plain_settings(length))  # the model's own ropes back
    apply_method(setup, trained_context)


def _new_cache(model, mode):
    if mode == "selfextend":
        return make_cache(model)
    if mode == "reference":
        return [KVCache() for _ in model.layers]
    return make_prompt_cache(model)


def _prefill(model, tokens, cache, step, resident: int):
    """Time a prefill (the session's loop: caches evaluated, logits only for the last step);
    its peak memory counts what was in use when the length's measurements began (weights,
    tokens) but not the other modes' caches, kept alive meanwhile for the interleaved decode."""
    mx.synchronize()
    others = max(0, mx.get_active_memory() - resident)
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = prefill(model, cache, tokens, step=step, keep_last=True)
    seconds = time.perf_counter() - start
    return seconds, int(mx.get_peak_memory()) - others, mx.argmax(logits).reshape(1, 1)


def run_bench(
    model,
    tokens: mx.array,
    lengths,
    config: SelfExtendConfig,
    modes=DEFAULT_MODES,
    decode_steps=16,
    prefill_step=PREFILL_STEP,
    repeats=1,
    on_row=None,
    trained_context=None,
):
    """Measure every mode at every length, in one process on the same tokens (the method
    modes need the model's `trained_context`).

    Prefill runs `repeats` times per mode (modes alternating) and keeps the fastest. Decode
    steps of the modes are interleaved one by one on their own caches, so whatever else the
    machine is doing slows them alike; a mode's decode speed is from its median step time.
    """
    if trained_context is None and set(modes) & set(METHOD_MODES):
        raise ValueError("the method modes need the model's trained_context")
    original = selfextend_config(model)
    rows = []
    with own_ropes(model) as apply_method:
        try:
            for length in lengths:
                if length > tokens.size:
                    raise ValueError(f"need {length} tokens of text, have {tokens.size}")

                def switch(mode, length=length):
                    _use_mode(model, mode, config, apply_method, length, trained_context)

                for row in _measure_length(model, tokens[:length], modes, switch, decode_steps, prefill_step, repeats):
                    rows.append(row)
                    if on_row:
                        on_row(row)
        finally:
            remove_selfextend(model)
            if original is not None:
                apply_selfextend(model, original)
    return rows


def _measure_length(model, prompt, modes, switch, decode_steps, prefill_step, repeats) -> list:
    """One length's rows; `switch(mode)` puts the model in a mode."""
    best, caches, next_token = {}, {}, {}
    mx.eval(prompt)
    mx.synchronize()
    resident = mx.get_active_memory()
    for _ in range(repeats):
        for mode in modes:
            switch(mode)
            cache = _new_cache(model, mode)
            seconds, peak, y = _prefill(model, prompt, cache, prefill_step, resident)
            kept = best.get(mode, (float("inf"), 0))
            best[mode] = (min(kept[0], seconds), max(kept[1], peak))
            caches[mode], next_token[mode] = cache, y
    step_times = {mode: [] for mode in modes}
    for step in range(decode_steps + 1):  # step 0 warms up
        order = modes[step % len(modes) :] + modes[: step % len(modes)]
        for mode in order:
            switch(mode)
            start = time.perf_counter()
            y = model(next_token[mode], cache=caches[mode])[:, -1:].argmax(axis=-1)
            mx.eval(y)
            if step:
                step_times[mode].append(time.perf_counter() - start)
            next_token[mode] = y
    rows = []
    for mode in modes:
        times = sorted(step_times[mode])
        rows.append(
            BenchRow(
                length=prompt.size,
                mode=mode,
                prefill_tps=prompt.size / best[mode][0],
                decode_tps=1.0 / times[len(times) // 2],
                peak_memory_bytes=best[mode][1],
                kv_cache_bytes=int(cache_nbytes(caches[mode])),
            )
        )
    return rows
