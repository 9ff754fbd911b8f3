"""The benchmark's baseline must compute SelfExtend too, and its rows must have the schema."""

import json

import mlx.core as mx
import pytest
from tiny_models import random_tokens, tiny_model
from typer.testing import CliRunner

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache, remove_selfextend
from selfextend_mlx.evaluation.bench import apply_reference_baseline, run_bench

CONFIG = SelfExtendConfig(group_size=4, window=12)


def test_reference_baseline_computes_the_same_selfextend():
    model = tiny_model("qwen2")
    tokens = random_tokens(60)
    apply_selfextend(model, CONFIG)
    cache = make_cache(model)
    expected = mx.concatenate(
        [model(tokens[None, :40], cache=cache)] + [model(tokens[None, i : i + 1], cache=cache) for i in range(40, 60)],
        axis=1,
    )
    remove_selfextend(model)
    apply_reference_baseline(model, CONFIG)
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    got = mx.concatenate(
        [model(tokens[None, :40], cache=cache)] + [model(tokens[None, i : i + 1], cache=cache) for i in range(40, 60)],
        axis=1,
    )
    remove_selfextend(model)  # restores any swapped attention
    assert mx.allclose(got, expected, atol=1e-4).item()


def test_run_bench_rows_and_restores_the_model():
    model = tiny_model("llama")
    plain = model(random_tokens(20)[None])
    rows = run_bench(model, random_tokens(64), [32, 64], CONFIG, decode_steps=2, prefill_step=16)
    assert [(r.length, r.mode) for r in rows] == [
        (n, m) for n in (32, 64) for m in ("plain", "selfextend", "reference")
    ]
    for r in rows:
        assert r.prefill_tps > 0 and r.decode_tps > 0 and r.peak_memory_bytes > 0 and r.kv_cache_bytes > 0
    by = {(r.length, r.mode): r for r in rows}
    assert by[(64, "selfextend")].kv_cache_bytes >= by[(64, "plain")].kv_cache_bytes
    assert mx.array_equal(model(random_tokens(20)[None]), plain).item()  # plain again afterwards


def test_method_modes_run_as_eval_sets_them_up_and_the_model_comes_back(monkeypatch):
    from selfextend_mlx.evaluation import methods

    built = []
    real = methods.scaled_rope

    def spy(rope, setup, trained_context):
        built.append((setup.method, setup.factor))
        return real(rope, setup, trained_context)

    monkeypatch.setattr(methods, "scaled_rope", spy)
    model = tiny_model("llama")
    ropes = [layer.self_attn.rope for layer in model.layers]
    plain = model(random_tokens(20)[None])
    modes = ("plain", "yarn", "linear", "string")
    rows = run_bench(model, random_tokens(64), [16, 64], CONFIG, modes=modes, decode_steps=2, trained_context=16)
    assert [(r.length, r.mode) for r in rows] == [(n, m) for n in (16, 64) for m in modes]
    # at 16 tokens (the trained context) the scalings are the plain model; at 64 they stretch by 4
    assert set(built) == {("yarn", 4.0), ("linear", 4.0)}
    assert [layer.self_attn.rope for layer in model.layers] == ropes
    assert mx.array_equal(model(random_tokens(20)[None]), plain).item()
    with pytest.raises(ValueError, match="trained_context"):
        run_bench(model, random_tokens(64), [16], CONFIG, modes=("plain", "ntk"), decode_steps=1)


def test_peak_memory_of_a_mode_leaves_out_the_other_modes_caches():
    # The modes' caches all stay alive for the interleaved decode: a mode measured after
    # another must not be charged for the other's cache (here larger than its own working set).
    model = tiny_model(
        "llama",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=8,
        intermediate_size=64,
        vocab_size=64,
    )
    tokens = random_tokens(512, vocab=64)
    config = SelfExtendConfig(group_size=4, window=64)
    alone = run_bench(model, tokens, [512], config, modes=("selfextend",), decode_steps=1, prefill_step=128)
    after = run_bench(model, tokens, [512], config, modes=("plain", "selfextend"), decode_steps=1, prefill_step=128)
    plain_cache = after[0].kv_cache_bytes
    assert abs(after[1].peak_memory_bytes - alone[0].peak_memory_bytes) < plain_cache / 4


def test_bench_command_json(stories_dir):
    from selfextend_cli.main import app

    result = CliRunner().invoke(
        app,
        ["bench", "--model", str(stories_dir), "-l", "256,384", "-G", "4", "-W", "64", "--decode-steps", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {tuple(sorted(r)) for r in rows} == {
        ("decode_tps", "kv_cache_bytes", "length", "mode", "peak_memory_bytes", "prefill_tps")
    }
    assert [r["length"] for r in rows] == [256] * 3 + [384] * 3


def test_bench_refuses_a_window_that_leaves_selfextend_idle(stories_dir):
    from selfextend_cli.main import app

    result = CliRunner().invoke(app, ["bench", "--model", str(stories_dir), "-l", "256", "-G", "4", "-W", "300"])
    assert result.exit_code != 0
    assert "not below the shortest length" in result.output


def test_selftest_checks_the_fused_path_and_says_why_the_kernel_is_skipped():
    import mlx.core as mx

    from selfextend_mlx.evaluation.selftest import run_selftest

    checks = {c.name: c for c in run_selftest(n_keys=256, window=64, prefill=32, repeats=1)}
    fused = checks["prefill: fused attention"]
    assert fused.ok and fused.fast_ms > 0
    for name in ("decode: Metal kernel", "prefill: Metal kernel"):
        kernel = checks[name]
        if mx.metal.is_available():
            assert kernel.ok, name
        else:
            assert kernel.max_error is None and "no Metal GPU" in kernel.note


def test_selftest_reports_a_kernel_that_cannot_run_as_failed(monkeypatch):
    # Pretend Metal is there: the "metal" backend then raises (no Apple GPU), as a kernel
    # that does not compile would on a Mac. One FAILED line per kernel check, exit 1.
    import mlx.core as mx

    from selfextend_cli.main import app

    if mx.metal.is_available():
        import pytest

        pytest.skip("this machine has Metal: the kernel really runs here")
    monkeypatch.setattr("selfextend_mlx.evaluation.selftest.metal_available", lambda: True)
    result = CliRunner().invoke(app, ["selftest", "--keys", "512"])
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if "FAILED" in line]
    assert len(failed) == 2 and all("needs an Apple GPU" in line for line in failed), result.output
    assert "Traceback" not in result.output


def test_metal_backend_is_refused_without_metal():
    import mlx.core as mx
    import pytest

    if mx.metal.is_available():
        pytest.skip("this machine has Metal: the refusal applies only without it")
    with pytest.raises(ValueError, match="needs an Apple GPU"):
        SelfExtendConfig(group_size=2, window=8, backend="metal")


def test_selftest_memory_estimate_follows_the_measured_peak():
    """The estimate that bounds --keys (issue 28.3), against the peak of a real run."""
    from selfextend_mlx.evaluation.selftest import run_selftest, selftest_memory

    mx.reset_peak_memory()
    held = mx.get_active_memory()  # arrays earlier tests still hold count in the peak, not in the run
    run_selftest(n_keys=8192, repeats=1)
    peak, estimate = mx.get_peak_memory() - held, selftest_memory(8192).total
    assert 0.8 * peak <= estimate <= 1.5 * peak, (peak, estimate)
    assert selftest_memory(1 << 20).total > 14 * 10**9  # 1m keys: ~15 GB, what killed the run at 6 GB


def test_selftest_refuses_what_the_machine_cannot_hold(monkeypatch):
    from selfextend_mlx.errors import InsufficientMemoryError
    from selfextend_mlx.evaluation.selftest import run_selftest

    monkeypatch.setenv("SELFEXTEND_MAX_MEMORY", "500MB")
    with pytest.raises(InsufficientMemoryError):
        run_selftest(n_keys=65536, repeats=1)  # 940 MB: refused before anything is allocated
