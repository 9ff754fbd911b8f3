"""What the in-process CLI tests share: the models and text they run on, a document cache per
test, loaded weights shared between runs, and the runner. Test modules import the fixtures they
use by name (the autouse ones as well, so they apply there)."""

import json
import shutil

import pytest
from conftest import shared_path
from typer.testing import CliRunner

import selfextend_mlx.loading.load as loading
from selfextend_cli.main import app

runner = CliRunner()
REAL_LOAD = loading.load  # before any fixture shares loaded models between runs
_loaded = {}


@pytest.fixture(scope="module")
def stories():
    return str(shared_path("models", "stories260K"))


@pytest.fixture(scope="module")
def story_text():
    return shared_path("text", "tinystories_sample.txt").read_text()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own document cache folder, and no debugging from the environment."""
    folder = tmp_path / "doc-cache"
    monkeypatch.setenv("SELFEXTEND_CACHE_DIR", str(folder))
    monkeypatch.delenv("SELFEXTEND_DEBUG", raising=False)
    return folder


@pytest.fixture(autouse=True)
def load_each_model_once(monkeypatch):
    """In-process runs share loaded weights (sessions re-apply their own G and W); the
    subprocess tests load for real."""

    def load(model_ref=None, **kwargs):
        key = (model_ref, tuple(sorted(kwargs.items())))
        if key not in _loaded:
            _loaded[key] = REAL_LOAD(model_ref, **kwargs)
        return _loaded[key]

    monkeypatch.setattr(loading, "load", load)


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"  # minutes without the bound
)


def stories_with_template(tmp_path, template):
    """A copy of stories260K whose tokenizer_config.json carries `template` as its chat template."""
    folder = tmp_path / "model"
    shutil.copytree(shared_path("models", "stories260K"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
