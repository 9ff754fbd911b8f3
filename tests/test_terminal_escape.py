"""Text from documents and file names reaches the terminal escaped (issue 29.6): `cache list`
shows the first words of piped text and file names with their control characters as escapes,
and an error line naming a file with a newline and escapes in its name stays one line."""

import os
import subprocess
import sys

import mlx.core as mx
from conftest import shared_path

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import DocumentCache, cache_key
from selfextend_mlx.app.documents import for_terminal
from selfextend_mlx.loading.load import load

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x1b]52;c;ZXZpbA==\x07\u202etxt.exe\x9b1m"


def selfextend(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "selfextend_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_for_terminal_escapes_what_a_terminal_acts_on():
    shown = for_terminal(HOSTILE + "\nline two\ttab é 中")
    assert not any(ord(c) < 32 and c != "\t" or 0x7F <= ord(c) <= 0x9F for c in shown)
    assert "\\x1b]0;owned\\x07" in shown and "\\x0a" in shown and "\\u202e" in shown
    assert shown.endswith("\ttab é 中")  # text stays text


def test_cache_list_prints_document_names_escaped(tmp_path):
    config = SelfExtendConfig(group_size=2, window=32)
    model, _ = load(str(shared_path("models", "stories260K")), selfextend=False)
    model = apply_selfextend(model, config)
    cache = make_cache(model)
    model(mx.array([[1, 2, 3, 4]]), cache=cache)
    store = DocumentCache(tmp_path / "cache")
    key = cache_key("stories", config, None, [1, 2, 3, 4])
    store.save(key, cache, model_id="stories", config=config, metadata={"documents": f'stdin "{HOSTILE}"'})
    done = selfextend("cache", "list", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
    assert "\\x1b]0;owned" in done.stdout


def test_an_error_naming_a_hostile_file_is_one_escaped_line(tmp_path):
    name = str(tmp_path / f"report\n{HOSTILE}.txt")
    done = selfextend("ask", name, "-q", "hi", "-m", str(shared_path("models", "stories260K")))
    assert done.returncode == 1
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: no such file") and "\\x0a" in line
