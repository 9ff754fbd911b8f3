"""The Metal kernel's check before first use, on a CPU with a simulated kernel.

There is no Metal here, so the kernel is replaced: by the explicit path (a kernel that works),
by one that is off by a little or returns NaN (a kernel that disagrees), and by one that
raises as a Metal compile error does. The guard must let only the first one run, say why in
one stderr line, and leave the plain-MLX path computing the answer."""

import mlx.core as mx
import pytest
from tiny_models import random_tokens, tiny_model

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.core import attention, kernels


def explicit_kernel(qn, qg, kv, *, q_start, window, scale, softcap=None):
    """A kernel that computes exactly what it should: the plain-MLX path."""
    assert scale == 1.0
    return attention._explicit_reference(qn * scale, qg * scale, kv, q_start=q_start, window=window, softcap=softcap)


def off_kernel(*args, **kwargs):
    return explicit_kernel(*args, **kwargs) + 0.05


def nan_kernel(*args, **kwargs):
    return explicit_kernel(*args, **kwargs) * mx.nan


def broken_kernel(*args, **kwargs):
    raise RuntimeError("[metal::Device] Unable to build metal library from source\nerror: use of undeclared identifier")


@pytest.fixture
def metal_like(monkeypatch):
    """A pretend Apple GPU: auto routing sends decode steps to the kernel; calls are counted."""
    calls = []

    def install(kernel):
        def counted(*args, **kwargs):
            calls.append(args[0].shape[2])
            return kernel(*args, **kwargs)

        monkeypatch.setattr(kernels, "selfextend_kernel_attention", counted)  # what the guard runs
        monkeypatch.setattr(attention, "selfextend_kernel_attention", counted)  # what attention runs
        return calls

    monkeypatch.setattr(kernels, "_verified", {})
    monkeypatch.setattr(attention, "device_kind", lambda: "metal")
    return install


def decode_logits(model, tokens, config):
    apply_selfextend(model, config)
    cache = make_cache(model)
    model(tokens[None, :-1], cache=cache)
    return model(tokens[None, -1:], cache=cache)


def test_a_kernel_that_agrees_is_used_after_one_check(metal_like, capsys):
    calls = metal_like(explicit_kernel)
    assert kernels.kernel_verified(mx.float32, 16, 16, attention._explicit_reference)
    checks = len(calls)
    assert checks == 4  # decode and prefill problems, with and without soft-capping
    assert kernels.kernel_verified(mx.float32, 16, 16, attention._explicit_reference)
    assert len(calls) == checks  # checked once per process
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kernel,why",
    [
        (off_kernel, "max |difference| 0.05 from the plain-MLX path"),
        (nan_kernel, "max |difference| inf"),
        (broken_kernel, "RuntimeError: [metal::Device] Unable to build metal library from source"),
    ],
)
def test_a_failing_kernel_is_turned_off_with_one_line(metal_like, capsys, kernel, why):
    metal_like(kernel)
    assert not kernels.kernel_verified(mx.float16, 64, 64, attention._explicit_reference)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Metal attention kernel failed its check for float16, head size 64" in err[0]
    assert why in err[0] and err[0].endswith("using the plain-MLX path")
    assert not kernels.kernel_verified(mx.float16, 64, 64, attention._explicit_reference)
    assert capsys.readouterr().err == ""  # said once


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped scores
def test_model_decodes_through_a_kernel_that_passed(metal_like, capsys, family):
    calls = metal_like(explicit_kernel)
    model, tokens = tiny_model(family), random_tokens(60)
    expected = decode_logits(model, tokens, SelfExtendConfig(group_size=3, window=16, backend="explicit"))
    got = decode_logits(model, tokens, SelfExtendConfig(group_size=3, window=16))
    assert mx.abs(got - expected).max().item() < 1e-5
    # the check's four problems, then the decode step's layers (the prefill is too long for it)
    assert calls == [1, 1, 5, 5] + [1] * len(model.layers)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kernel", [off_kernel, broken_kernel])
def test_model_output_comes_from_the_plain_path_when_the_kernel_fails(metal_like, capsys, kernel):
    calls = metal_like(kernel)
    model, tokens = tiny_model("llama"), random_tokens(60)
    expected = decode_logits(model, tokens, SelfExtendConfig(group_size=3, window=16, backend="explicit"))
    got = decode_logits(model, tokens, SelfExtendConfig(group_size=3, window=16))
    assert mx.abs(got - expected).max().item() == 0.0
    checks = len(calls)
    decode_logits(model, tokens, SelfExtendConfig(group_size=3, window=16))
    assert len(calls) == checks  # never run again after failing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "failed its check" in err[0]


def test_each_dtype_and_head_size_is_checked_on_its_own(metal_like, capsys):
    calls = metal_like(explicit_kernel)
    for dtype in (mx.float32, mx.float16):
        for head_dim in (16, 32):
            assert kernels.kernel_verified(dtype, head_dim, head_dim, attention._explicit_reference)
    assert len(calls) == 4 * 4
