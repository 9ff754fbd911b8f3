"""Issue 12 and issue 13 point 8 through the command line: a model folder's code, input
limits, the document cache's commands (list, rm, clear) and its faults (changed weights, a
corrupted entry) as a user meets them: one line on stderr, a non-zero exit, nothing lost."""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_path
from typer.testing import CliRunner

from selfextend_cli.main import app
from selfextend_mlx.app.doccache import MARKER

runner = CliRunner()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "doc-cache"
    monkeypatch.setenv("SELFEXTEND_CACHE_DIR", str(folder))
    monkeypatch.delenv("SELFEXTEND_MAX_INPUT", raising=False)
    return folder


@pytest.fixture(scope="module")
def stories():
    return str(shared_path("models", "stories260K"))


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(shared_path("text", "tinystories_sample.txt").read_text()[:1500])
    return str(path)


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_error_line(result, exit_code=1) -> str:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def console_script() -> str:
    return str(Path(sys.executable).with_name("selfextend"))


def copy_of(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


# -- a model folder's code ------------------------------------------------------------------------------


def folder_with_tokenizer_code(stories, tmp_path):
    folder = copy_of(Path(stories), tmp_path / "evil")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTok", auto_map={"AutoTokenizer": ["evil.EvilTok", "evil.EvilTok"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "EVIL_RAN"
    (folder / "evil.py").write_text(
        f"open({str(ran)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTok(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder, ran


def test_a_model_folder_with_tokenizer_code_is_refused_without_asking(tmp_path, document, stories):
    folder, ran = folder_with_tokenizer_code(stories, tmp_path)
    result = subprocess.run(
        [console_script(), "ask", document, "-q", "Who?", "-m", str(folder), "-n", "2", "--json"],
        input="y\ny\ny\n",  # what a user piping answers would send
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and result.stdout == ""  # no question ahead of the JSON
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--trust-remote-code" in line
    assert not ran.exists()


def test_trust_remote_code_runs_it_when_asked(tmp_path, document, stories):
    folder, ran = folder_with_tokenizer_code(stories, tmp_path)
    result = invoke("ask", document, "-q", "Who?", "-m", folder, "-n", "2", "--json", "--trust-remote-code")
    assert result.exit_code == 0, result.stderr
    assert ran.exists() and json.loads(result.stdout)["answer"] is not None


# -- input limits -----------------------------------------------------------------------------------------


def test_dev_zero_is_refused_at_once(stories):
    if not Path("/dev/zero").exists():
        pytest.skip("this system has no /dev/zero")
    started = time.perf_counter()
    line = one_error_line(invoke("ask", "/dev/zero", "-q", "x", "-m", stories))
    assert "binary" in line and time.perf_counter() - started < 30


def test_an_endless_pipe_is_refused_within_seconds(stories):
    command = f"yes | {console_script()} ask - -q x -m {stories}"
    started = time.perf_counter()
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - started < 60
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: stdin is over the input limit of 10.0 MB") and "--max-input" in line


def test_the_input_limit_from_the_environment_or_the_flag(document, stories, monkeypatch):
    monkeypatch.setenv("SELFEXTEND_MAX_INPUT", "1k")
    line = one_error_line(invoke("ask", document, "-q", "Who?", "-m", stories))
    assert f"{document} is 1.5 KB, over the input limit of 1.0 KB" in line
    assert invoke("ask", document, "-q", "Who?", "-m", stories, "-n", "2", "--max-input", "2k").exit_code == 0
    monkeypatch.delenv("SELFEXTEND_MAX_INPUT")
    line = one_error_line(invoke("summarize", document, "-m", stories, "--max-input", "500"))
    assert "over the input limit of 500 B" in line
    assert "is not a size" in one_error_line(invoke("ask", document, "-q", "x", "-m", stories, "--max-input", "big"))


# -- the document cache's commands ------------------------------------------------------------------------


def cached(stories, document, *extra):
    result = invoke("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "6", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_cache_list_shows_sizes_a_total_and_typed_json(stories, document, cache_dir):
    cached(stories, document)
    piped = invoke("ask", "-", "-q", "Who?", "-m", stories, "-n", "4", input="Tom and Lily went to the park to play.")
    assert piped.exit_code == 0, piped.stderr
    result = invoke("cache", "list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    total = sum(p.stat().st_size for p in cache_dir.glob("*.safetensors"))
    assert lines[0].startswith("2 cached documents, ") and lines[0].endswith(f"in {cache_dir}:")
    assert 'stdin "Tom and Lily went to the park to..."' in result.stdout
    assert document in result.stdout
    record = json.loads(invoke("cache", "list", "--json").stdout)
    assert record["total_bytes"] == total
    entry = next(e for e in record["entries"] if e["documents"] == document)
    assert isinstance(entry["tokens"], int) and entry["kv_bits"] is None
    assert isinstance(entry["group_size"], int) and isinstance(entry["window"], int) and isinstance(entry["bytes"], int)


def test_cache_rm_removes_one_entry(stories, document, cache_dir, tmp_path):
    cached(stories, document)
    other = tmp_path / "other.txt"
    other.write_text("Tom has a red ball. He plays with it in the garden every day.")
    cached(stories, str(other))
    entries = json.loads(invoke("cache", "list", "--json").stdout)["entries"]
    assert len(entries) == 2
    gone = entries[0]["id"]
    result = invoke("cache", "rm", gone[:8])
    assert result.exit_code == 0 and result.stdout.startswith(f"removed {gone[:12]}")
    assert [e["id"] for e in json.loads(invoke("cache", "list", "--json").stdout)["entries"]] == [entries[1]["id"]]
    assert "no cached document with id" in one_error_line(invoke("cache", "rm", gone[:8]))


def test_cache_clear_asks_or_needs_yes(stories, document, cache_dir, monkeypatch):
    cached(stories, document)
    line = one_error_line(invoke("cache", "clear"))  # no terminal to ask on
    assert "confirm with --yes" in line and len(list(cache_dir.glob("*.safetensors"))) == 1
    monkeypatch.setattr("selfextend_cli.cache_cmd._can_ask", lambda: True)  # as on a terminal
    result = invoke("cache", "clear", input="n\n")
    assert result.exit_code == 1 and len(list(cache_dir.glob("*.safetensors"))) == 1
    result = invoke("cache", "clear", input="y\n")
    assert result.exit_code == 0 and not list(cache_dir.glob("*.safetensors"))


def test_cache_clear_on_a_model_folder_removes_nothing(stories, tmp_path):
    folder = copy_of(Path(stories), tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = one_error_line(invoke("cache", "clear", "--cache-dir", folder, "--yes"))
    assert "is not a selfextend document cache" in line and "nothing removed" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert "no cached documents" in invoke("cache", "list", "--cache-dir", folder).stdout


def test_cache_clear_yes_removes_the_entries_only(stories, document, cache_dir):
    cached(stories, document)
    (cache_dir / "keep.txt").write_text("mine")
    result = invoke("cache", "clear", "--yes")
    assert result.exit_code == 0 and result.stdout.startswith("removed 1 ")
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([MARKER, "keep.txt"])


# -- the document cache's faults -----------------------------------------------------------------------------


def test_weights_changed_at_the_same_path_miss_the_cache(tmp_path, stories, document):
    folder = copy_of(Path(stories), tmp_path / "model")
    first = cached(str(folder), document)
    assert first["document_cache"] == "miss"
    assert cached(str(folder), document)["document_cache"] == "hit"
    weights = folder / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    for i in range(8 + length + 4000, len(data) - 4, 4096):  # scale a few weights by 2 (fp32 exponent + 1)
        value = struct.unpack("<f", data[i : i + 4])[0]
        data[i : i + 4] = struct.pack("<f", value * 2)
    time.sleep(0.02)
    with open(weights, "r+b") as f:
        f.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = cached(str(folder), document)
    assert after["document_cache"] == "miss"
    assert after["answer"] == cached(str(folder), document, "--no-cache")["answer"]


def test_a_corrupted_entry_is_one_notice_then_rebuilt(stories, document, cache_dir):
    first = cached(stories, document)
    (entry,) = cache_dir.glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    data[-200] ^= 0xFF
    entry.write_bytes(bytes(data))
    result = invoke("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "6", "--json")
    assert result.exit_code == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["document_cache"] == "miss" and again["answer"] == first["answer"]
    notices = [line for line in result.stderr.splitlines() if "document cache unusable" in line]
    assert len(notices) == 1 and "checksum" in notices[0]
    assert cached(stories, document)["document_cache"] == "hit"
