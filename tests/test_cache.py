"""The SelfExtend KV cache: windowed neighbor keys, trim, quantization, prompt-cache files,
and working inside mlx-lm's own generation loop."""

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache
from tiny_models import random_tokens, tiny_model

from selfextend_mlx import (
    CacheMismatchError,
    SelfExtendConfig,
    apply_selfextend,
    load_cache,
    make_cache,
    save_cache,
)
from selfextend_mlx.core.attention import rotate_further
from selfextend_mlx.core.cache import QuantizedSelfExtendKVCache, SelfExtendKVCache, cache_nbytes

CONFIG = SelfExtendConfig(group_size=3, window=16)


def prefilled(model, tokens, step=32, cache=None):
    cache = cache if cache is not None else make_cache(model)
    logits = None
    for s in range(0, tokens.size, step):
        logits = model(tokens[None, s : s + step], cache=cache)
    return cache, logits[:, -1]


def test_make_cache_types_and_sliding_layers_stay_plain():
    model = apply_selfextend(tiny_model("gemma3_text"), CONFIG)
    kinds = [type(c).__name__ for c in make_cache(model)]
    # layers 0 and 2 are sliding-window layers in this config: they keep mlx-lm's rotating cache
    assert kinds == ["RotatingKVCache", "SelfExtendKVCache", "RotatingKVCache", "SelfExtendKVCache"]
    assert [type(c).__name__ for c in make_prompt_cache(model)] == kinds  # mlx-lm finds it too
    quantized = make_cache(model, kv_bits=8)
    assert isinstance(quantized[1], QuantizedSelfExtendKVCache)


def test_each_key_is_held_about_once_and_memory_stays_near_plain():
    window = 300  # large next to the allocation step (256), so holding a key twice would show
    model = tiny_model("llama")
    tokens = random_tokens(900, seed=3)
    se = apply_selfextend(tiny_model("llama"), SelfExtendConfig(group_size=4, window=window))
    cache, _ = prefilled(se, tokens, step=128)
    for _ in range(70):  # decode steps compact the window left by the last prefill chunk
        se(mx.array([[5]]), cache=cache)
    plain = make_prompt_cache(model)
    prefilled(model, tokens, step=128, cache=plain)
    for _ in range(70):
        model(mx.array([[5]]), cache=plain)
    entry = cache[0]
    # neighbor keys only for the window, grouped keys only before it (+ what is converted ahead)
    assert entry.neighbor_start <= entry.offset - window + 1
    assert entry.neighbor_keys.shape[2] <= window + 2 * entry.neighbor_step
    assert entry.grouped_length <= entry.offset - window + 1 + entry.neighbor_step
    ratio = cache_nbytes(cache) / sum(c.nbytes for c in plain)
    # grouped keys kept for every position as well would make this about 1 + W / N = 1.3
    assert 1.0 < ratio < 1.12, ratio


@pytest.mark.parametrize("trim", [5, 40])  # 40 reaches back past the kept window: rebuilt keys
def test_trim_then_continue_equals_fresh_prefill(trim):
    model = apply_selfextend(tiny_model("qwen3"), CONFIG)
    tokens = random_tokens(120, seed=4)
    extra = random_tokens(9, seed=5)
    cache, _ = prefilled(model, tokens)
    for _ in range(3):
        model(mx.array([[7]]), cache=cache)
    assert trim_prompt_cache(cache, trim + 3) == trim + 3
    assert cache[0].offset == tokens.size - trim
    resumed = model(extra[None], cache=cache)
    fresh_cache, _ = prefilled(model, tokens[: tokens.size - trim])
    fresh = model(extra[None], cache=fresh_cache)
    assert mx.allclose(resumed, fresh, atol=1e-4).item()


def test_quantized_cache_tracks_full_precision_and_is_never_swapped():
    model = apply_selfextend(tiny_model("llama", head_dim=32), CONFIG)
    tokens = random_tokens(100, seed=6)
    _, full = prefilled(model, tokens)
    for bits, tol in ((8, 0.05), (4, 0.3)):
        cache, quantized = prefilled(model, tokens, cache=make_cache(model, kv_bits=bits, kv_group_size=32))
        err = mx.abs(quantized - full).max().item() / mx.abs(full).max().item()
        assert err < tol, (bits, err)
        assert all(c.to_quantized(group_size=64, bits=bits) is c for c in cache)
    plain_cache, _ = prefilled(model, tokens)
    converted = plain_cache[0].to_quantized(group_size=32, bits=8)
    assert isinstance(converted, QuantizedSelfExtendKVCache) and converted.offset == tokens.size


def test_mlx_lm_generation_loop_with_kv_bits_keeps_selfextend_caches():
    model = apply_selfextend(tiny_model("llama", head_dim=32), CONFIG)
    prompt = random_tokens(70, seed=7)
    cache = make_cache(model)
    greedy = [t for t, _ in generate_step(prompt, model, max_tokens=6, prompt_cache=cache)]
    manual, cache = [], make_cache(model)
    logits = model(prompt[None], cache=cache)
    for _ in range(6):
        manual.append(logits[0, -1].argmax().item())
        logits = model(mx.array([[manual[-1]]]), cache=cache)
    assert greedy == manual
    qcache = make_cache(model)
    list(
        generate_step(
            prompt, model, max_tokens=4, prompt_cache=qcache, kv_bits=8, kv_group_size=32, quantized_kv_start=0
        )
    )
    assert all(isinstance(c, QuantizedSelfExtendKVCache) for c in qcache)


def test_wrong_cache_type_is_refused_with_a_clear_message():
    model = apply_selfextend(tiny_model("llama"), CONFIG)
    with pytest.raises(TypeError, match="make_cache"):
        model(random_tokens(4)[None], cache=[KVCache() for _ in model.layers])


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_save_then_load_gives_identical_next_token_logits(tmp_path, kv_bits):
    model = apply_selfextend(tiny_model("phi3", hidden_size=128), CONFIG)  # head_dim 32
    tokens = random_tokens(90, seed=8)
    cache, _ = prefilled(model, tokens, cache=make_cache(model, kv_bits=kv_bits, kv_group_size=32))
    path = tmp_path / "doc.safetensors"
    save_cache(path, cache, model_id="tiny-phi3", config=CONFIG, metadata={"title": "doc"})
    loaded, metadata = load_cache(path, model_id="tiny-phi3", config=CONFIG)
    assert metadata["title"] == "doc"
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    nxt = mx.array([[11, 12]])
    assert mx.array_equal(model(nxt, cache=loaded), model(nxt, cache=cache)).item()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_format_1_files_with_grouped_keys_for_every_position_still_load(tmp_path, monkeypatch):
    # Format 1 kept grouped keys for all positions; format 2 keeps them only before the window.
    model = apply_selfextend(tiny_model("llama"), CONFIG)
    tokens = random_tokens(90, seed=9)
    cache, _ = prefilled(model, tokens)
    for layer, entry in zip(model.layers, cache):
        start = entry.grouped_length
        assert start < entry.offset
        window = entry.neighbor_keys[..., start - entry.neighbor_start : entry.neighbor_length, :]
        positions = mx.arange(start, entry.offset)
        rest = rotate_further(layer.self_attn.rope, window, positions // CONFIG.group_size - positions)
        entry.keys = mx.concatenate([entry.keys[..., :start, :], rest], axis=2)
        entry.grouped_length = entry.offset
    monkeypatch.setattr("selfextend_mlx.core.cache_file.CACHE_FORMAT_VERSION", "1")
    path = tmp_path / "old.safetensors"
    save_cache(path, cache, model_id="tiny", config=CONFIG)
    loaded, _ = load_cache(path, model_id="tiny", config=CONFIG)
    assert loaded[0].grouped_length == tokens.size
    fresh, _ = prefilled(model, tokens)
    nxt = mx.array([[11, 12, 13]])
    assert mx.allclose(model(nxt, cache=loaded), model(nxt, cache=fresh), atol=1e-5).item()


def test_mismatched_or_corrupt_cache_files_are_refused(tmp_path):
    model = apply_selfextend(tiny_model("llama"), CONFIG)
    cache, _ = prefilled(model, random_tokens(40))
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, model_id="model-a", config=CONFIG)
    with pytest.raises(CacheMismatchError, match="model-a"):
        load_cache(path, model_id="model-b", config=CONFIG)
    with pytest.raises(CacheMismatchError, match="G=3"):
        load_cache(path, model_id="model-a", config=SelfExtendConfig(group_size=4, window=16))
    with pytest.raises(CacheMismatchError, match="W=16"):
        load_cache(path, model_id="model-a", config=SelfExtendConfig(group_size=3, window=32))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CacheMismatchError, match="not a readable prompt cache"):
        load_cache(corrupt, model_id="model-a", config=CONFIG)
    with pytest.raises(CacheMismatchError):
        load_cache(tmp_path / "missing.safetensors", model_id="model-a", config=CONFIG)


def test_interrupted_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    model = apply_selfextend(tiny_model("llama"), CONFIG)
    cache, _ = prefilled(model, random_tokens(40))
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, model_id="m", config=CONFIG)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("selfextend_mlx.core.cache_file._write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_cache(path, cache, model_id="m", config=CONFIG)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_cache_entries_report_their_size():
    entry = SelfExtendKVCache(CONFIG)
    assert entry.nbytes == 0 and entry.empty()


def test_files_written_by_mlx_lms_save_prompt_cache_still_load(tmp_path):
    """What save_cache wrote before it had its own writer: mlx-lm's layout, no checksum."""
    from mlx_lm.models.cache import save_prompt_cache

    model = apply_selfextend(tiny_model("llama"), CONFIG)
    cache, _ = prefilled(model, random_tokens(60, seed=4))
    path = tmp_path / "old.safetensors"
    info = {"format_version": "2", "model_id": "tiny", "group_size": "3", "window": "16", "title": "doc"}
    save_prompt_cache(str(path), cache, info)
    loaded, metadata = load_cache(path, model_id="tiny", config=CONFIG)
    assert metadata == {"title": "doc"}
    nxt = mx.array([[7, 8]])
    assert mx.array_equal(model(nxt, cache=loaded), model(nxt, cache=cache)).item()
    with pytest.raises(CacheMismatchError, match="no checksum"):
        load_cache(path, model_id="tiny", config=CONFIG, require_checksum=True)


def test_float16_storage_halves_the_file_and_loads_back_in_float32(tmp_path):
    model = apply_selfextend(tiny_model("llama"), CONFIG)
    cache, _ = prefilled(model, random_tokens(200, seed=5))
    exact, compact = tmp_path / "exact.safetensors", tmp_path / "compact.safetensors"
    save_cache(exact, cache, model_id="tiny", config=CONFIG)
    save_cache(compact, cache, model_id="tiny", config=CONFIG, storage_dtype=mx.float16)
    assert compact.stat().st_size < 0.55 * exact.stat().st_size
    loaded, _ = load_cache(compact, model_id="tiny", config=CONFIG, require_checksum=True)
    assert {c.values.dtype for c in loaded} == {mx.float32}
    nxt = mx.array([[7, 8]])
    assert mx.allclose(model(nxt, cache=loaded), model(nxt, cache=cache), atol=1e-2).item()
