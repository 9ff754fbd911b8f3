"""scripts/gpu_check.sh cannot run its GPU steps here: its shell is checked for syntax, its
Python pieces (the random Llama-3-8B-shaped model, the summary) run on the CPU. The whole
script runs on a CPU with `scripts/gpu_check.sh --dry-run` (minutes: not part of the suite)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check_model  # noqa: E402
import gpu_check_report  # noqa: E402


def test_script_is_valid_bash_and_executable():
    script = SCRIPTS / "gpu_check.sh"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine to check the script with")
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.stat().st_mode & 0o111, "scripts/gpu_check.sh must be executable"


def test_random_model_has_llama3_8b_attention_and_loads(tmp_path, stories_dir):
    from selfextend_mlx.loading.load import load

    config = gpu_check_model.write_model(tmp_path / "m", layers=1, tokenizer=stories_dir)
    assert config["quantization"]["bits"] == 4
    model, tokenizer = load(str(tmp_path / "m"), selfextend=False, dtype="native")
    shape = model.model_info.shape
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.layers) == (32, 8, 128, 1)
    assert model.model_info.trained_context == 8192
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert tokenizer.vocab_size == 512


def rows(length_tps):
    """bench --json rows: plain and selfextend at each length."""
    out = []
    for length, (plain, se) in length_tps.items():
        out.append(dict(length=length, mode="plain", prefill_tps=plain, decode_tps=plain / 10,
                        peak_memory_bytes=100 * 2**20, kv_cache_bytes=10 * 2**20))  # fmt: skip
        out.append(dict(length=length, mode="selfextend", prefill_tps=se, decode_tps=se / 10,
                        peak_memory_bytes=110 * 2**20, kv_cache_bytes=10 * 2**20))  # fmt: skip
    return out


def test_summary_has_every_figure_and_the_ratios(tmp_path):
    (tmp_path / "commands.txt").write_text("scripts/gpu_check.sh OUT\nselfextend bench ...\n")
    (tmp_path / "device.json").write_text(json.dumps({"device": "Device(gpu, 0)", "kind": "cuda", "mlx": "0.32.4"}))
    (tmp_path / "tests.txt").write_text("FAILED tests/test_x.py::test_y - boom\n1 failed, 411 passed in 90.1s\n")
    (tmp_path / "selftest.json").write_text(
        json.dumps(
            [
                {
                    "name": "prefill bf16 D64: fused",
                    "max_error": 0.004,
                    "reference_ms": 2.0,
                    "fast_ms": 1.0,
                    "note": "",
                    "tolerance": 0.05,
                    "ok": True,
                },  # fmt: skip
                {
                    "name": "decode: Metal kernel",
                    "max_error": None,
                    "reference_ms": 1.5,
                    "fast_ms": None,
                    "note": "no Metal GPU here",
                    "tolerance": 0.001,
                    "ok": False,
                },  # fmt: skip
            ]
        )
    )
    (tmp_path / "bench_smollm2.json").write_text(json.dumps(rows({8192: (2000.0, 1600.0), 32768: (900.0, 1000.0)})))
    (tmp_path / "bench_broken.json").write_text("")
    assert gpu_check_report.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert "- kind: cuda" in text and "`1 failed, 411 passed in 90.1s`" in text
    assert "- FAILED tests/test_x.py::test_y - boom" in text
    assert "| prefill bf16 D64: fused | OK | 4.00e-03 | 2.00 | 1.00 |" in text
    assert "| decode: Metal kernel | skipped |" in text
    assert "| 8192 | selfextend | 1600.0 | 160.00 | 110.0 MiB | 10.0 MiB |" in text
    assert "| 8192 | 1.25x | 1.25x | 1.10x | 1.00x |" in text  # plain 2000 tok/s vs SelfExtend 1600
    assert "| 32768 | 0.90x |" in text
    assert "### broken" in text and "is not JSON" in text


def test_summary_says_what_is_missing(tmp_path):
    assert gpu_check_report.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    for missing in ("device step did not finish", "test step did not run", "selftest step did not finish",
                    "bench step did not run"):  # fmt: skip
        assert missing in text


def test_summary_needs_a_folder(tmp_path, capsys):
    assert gpu_check_report.main([str(tmp_path / "nowhere")]) == 2
    assert "usage:" in capsys.readouterr().err
