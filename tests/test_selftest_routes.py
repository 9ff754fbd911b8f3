"""`selfextend selftest` on a GPU also checks what backend="auto" runs for every dtype and head
size 64/128. Simulated here: a pretend CUDA or Metal device, where MLX's CPU backend refuses
the fused calls and the real Metal kernel cannot launch, so the checks must report the
routing's fallbacks and still agree with the explicit path."""

import pytest

from selfextend_mlx.core import attention, kernels
from selfextend_mlx.evaluation import selftest


@pytest.fixture
def pretend(monkeypatch):
    def device(kind):
        monkeypatch.setattr(attention, "device_kind", lambda: kind)
        monkeypatch.setattr(selftest, "device_kind", lambda: kind)

    monkeypatch.setattr(attention, "_unfused", set())
    monkeypatch.setattr(kernels, "_verified", {})
    return device


def run():
    return {c.name: c for c in selftest.run_selftest(n_keys=256, window=64, prefill=32, repeats=1)}


def test_cpu_runs_only_the_three_checks(pretend):
    pretend("cpu")
    assert list(run()) == ["decode: Metal kernel", "prefill: fused attention", "prefill: Metal kernel"]


def test_cuda_checks_the_route_of_every_dtype_and_head_size(pretend, capsys):
    pretend("cuda")
    checks = run()
    routes = {name: c for name, c in checks.items() if name.startswith(("decode ", "prefill "))}
    assert len(routes) == 2 * 3 * 2  # decode and prefill, three dtypes, two head sizes
    assert all(c.ok for c in routes.values()), [(n, c.max_error, c.note) for n, c in routes.items()]
    assert "decode bf16 D128: explicit" in routes and "prefill fp32 D64: explicit" in routes
    for name in ("prefill fp16 D64: fused", "prefill bf16 D64: fused"):
        assert routes[name].note == "MLX refused the fused call: the explicit path ran"
    assert routes["prefill bf16 D128: explicit"].tolerance == 5e-2
    assert capsys.readouterr().err.count("no fused attention") == 2  # one line per dtype refused


def test_metal_reports_a_kernel_that_failed_its_first_use_check(pretend, capsys):
    pretend("metal")
    checks = run()
    decode = checks["decode fp16 D64: metal"]
    assert decode.ok and decode.note == "the kernel failed its first-use check: the explicit path ran"
    err = capsys.readouterr().err
    assert err.count("failed its check") == 6  # the real kernel cannot launch without Metal: once per dtype and size
    assert "No Metal back-end" in err
    prefill = checks["prefill fp32 D64: fused"]  # routed to the fused call, which MLX's CPU backend refuses
    assert prefill.ok and prefill.note == "MLX refused the fused call: the explicit path ran"
    assert checks["prefill fp32 D128: explicit"].ok
