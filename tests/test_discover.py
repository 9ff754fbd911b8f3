"""Models where other tools keep them: fake Hugging Face cache, LM Studio and Ollama trees and
a ./models folder under a temporary HOME, listed by `selfextend models` and loaded by `-m`;
`selfextend pull` failing to reach the Hub is one line."""

import json
import shutil

import pytest
import typer
from test_gguf import write_stories_gguf
from typer.testing import CliRunner

from selfextend_cli import models_cmd
from selfextend_mlx import load
from selfextend_mlx.errors import ModelNotFoundError
from selfextend_mlx.loading import discover
from selfextend_mlx.loading.load import describe
from selfextend_mlx.loading.resolve import resolve

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def home(tmp_path, monkeypatch, stories_dir):
    """A HOME with one model in each store (stories260K, as a folder or a Q8_0 GGUF)."""
    home = tmp_path / "home"
    for variable in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "LMSTUDIO_MODELS", "OLLAMA_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(home))
    snapshot = home / ".cache/huggingface/hub/models--acme--stories/snapshots/0123abc"
    shutil.copytree(stories_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    gguf_file = tmp_path / "stories.gguf"
    write_stories_gguf(gguf_file, stories_dir, "Q8_0")
    studio = home / ".lmstudio/models/acme/stories-GGUF"
    studio.mkdir(parents=True)
    shutil.copy(gguf_file, studio / "stories-Q8_0.gguf")
    (studio / "mmproj-stories-f16.gguf").write_bytes(b"GGUF")  # a vision projector: not listed
    ollama = home / ".ollama/models"
    (ollama / "blobs").mkdir(parents=True)
    shutil.copy(gguf_file, ollama / "blobs" / DIGEST.replace(":", "-"))
    manifest = ollama / "manifests/registry.ollama.ai/library/stories/latest"
    manifest.parent.mkdir(parents=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": DIGEST, "size": 1}]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    (manifest.parent / "broken").write_text("{not json")  # skipped, not fatal
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    shutil.copy(gguf_file, project / "models" / "mine.gguf")
    monkeypatch.chdir(project)
    return home


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    models_cmd.register(app)
    return app


def test_every_store_is_listed_with_what_it_holds(home, app):
    result = CliRunner().invoke(app, ["models", "--local", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"acme/stories", "lmstudio:acme/stories-GGUF/stories-Q8_0", "ollama:stories:latest",
                         "models/mine.gguf"}  # fmt: skip
    assert rows["acme/stories"]["family"] == "llama" and rows["acme/stories"]["where"] == "hf-cache"
    for name in ("lmstudio:acme/stories-GGUF/stories-Q8_0", "ollama:stories:latest", "models/mine.gguf"):
        row = rows[name]
        assert row["family"] == "llama" and row["trained_context"] == 512 and row["error"] is None
        assert row["quantization"] == "Q8_0" and row["size"] > 100_000
        assert row["reach"] == (512 - 128) * 16 + 128  # W = L/4, the largest G
    text = CliRunner().invoke(app, ["models"]).stdout
    assert "ON THIS MACHINE" in text and "ollama:stories:latest" in text and "SmolLM2-135M-Instruct" in text


@pytest.mark.parametrize(
    "ref", ["ollama:stories:latest", "ollama:stories", "lmstudio:stories-Q8_0", "lmstudio:acme/stories-GGUF"]
)
def test_minus_m_takes_the_names_other_tools_use(home, ref):
    source = resolve(ref)
    assert source.kind == "gguf" and source.model_id == ref
    assert describe(ref).family == "llama"


def test_a_hub_id_in_the_cache_loads_without_the_network(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load("acme/stories", selfextend=False)
    assert tokenizer.encode("Once upon a time")[0] == 1


def test_an_ollama_model_loads(home):
    model, tokenizer = load("ollama:stories", selfextend=False)
    assert model.model_info.model_id == "ollama:stories" and model.model_info.family == "llama"


@pytest.mark.parametrize(
    "ref, message",
    [("ollama:nothing:7b", "no model ollama:nothing:7b in Ollama's store"), ("lmstudio:zzz", "no model lmstudio:zzz")],
)
def test_unknown_names_are_one_line(home, ref, message):
    with pytest.raises(ModelNotFoundError, match=message) as error:
        resolve(ref)
    assert "\n" not in str(error.value)


def test_an_ambiguous_lmstudio_name_says_so(home):
    studio = home / ".lmstudio/models/acme/stories-GGUF"
    shutil.copy(studio / "stories-Q8_0.gguf", studio / "stories-Q4_0.gguf")
    with pytest.raises(ModelNotFoundError, match="names 2 models"):
        resolve("lmstudio:stories")


def test_an_empty_home_lists_nothing(tmp_path, monkeypatch, app):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for variable in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "LMSTUDIO_MODELS", "OLLAMA_MODELS"):
        monkeypatch.delenv(variable, raising=False)
    assert discover.local_models() == []
    assert json.loads(CliRunner().invoke(app, ["models", "--local", "--json"]).stdout) == []


def test_a_hub_id_not_in_the_cache_is_refused_not_downloaded(tmp_path, monkeypatch):
    """Only `pull` downloads: -m and info with an uncached Hub id say how to get it, and never
    reach the Hub (its endpoint here is a closed loopback port, which would read 'could not download')."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    document = tmp_path / "doc.txt"
    document.write_text("The bakery opened in 1998.")
    from selfextend_cli.main import app

    for args in (["info", "acme/missing"], ["ask", str(document), "-q", "When?", "-m", "acme/missing"]):
        result = CliRunner().invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (args, result.stderr)
        assert "not in the Hugging Face cache: `selfextend pull acme/missing` downloads it" in lines[0], lines[0]


def test_pull_without_a_network_is_one_clear_line(tmp_path, monkeypatch, app):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    # a closed loopback port: refused at once, whatever this machine's network
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["pull", "acme/stories"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download") and "acme/stories" in lines[0]
    bad = CliRunner().invoke(app, ["pull", "not a repo"])
    assert bad.exit_code == 1 and "not a Hugging Face repo id" in bad.stderr
