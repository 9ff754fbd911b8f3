"""Status lines (the header, notices, the cache's report) name untrusted text: a model
folder's name, a cache folder, a document's file name. Like error lines, they reach the
terminal with control characters escaped (issue 28)."""

import shutil

import cli_support
from cli_support import invoke, write
from conftest import shared_path

from selfextend_cli.output import log_lines, status

isolated_cache, load_each_model_once = cli_support.isolated_cache, cli_support.load_each_model_once
story_text = cli_support.story_text
HOSTILE = "x\x1b[2J\nerror: fake\x07"
ESCAPED = "x\\x1b[2J\\x0aerror: fake\\x07"  # as documents.for_terminal shows it


def test_status_and_the_server_log_escape_control_characters(capsys):
    status(f"reading {HOSTILE}")
    log_lines(f"GET /{HOSTILE} 200\nTraceback (most recent call last):")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    first, *log = err.splitlines()
    assert first == f"reading {ESCAPED}"  # one line, whatever the name holds
    # the server's log keeps the lines of a record (a traceback), each one escaped
    assert log == ["GET /x\\x1b[2J", "error: fake\\x07 200", "Traceback (most recent call last):"]


def test_a_model_folder_and_a_cache_folder_with_escapes_in_their_names(tmp_path, story_text):
    model = tmp_path / f"stories{HOSTILE}"
    shutil.copytree(shared_path("models", "stories260K"), model)
    cache = tmp_path / f"cache{HOSTILE}"
    cache.mkdir()
    (cache / "notes.txt").write_text("not a cache")  # a folder of other files: a notice names it
    document = write(tmp_path, f"doc{HOSTILE}.txt", story_text[:800])
    result = invoke("ask", document, "-q", "Who?", "-m", model, "-n", "2", "--cache-dir", cache, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    lines = result.stderr.splitlines()
    assert not any(line.startswith("error: fake") for line in lines)  # no line forged by a name
    header = next(line for line in lines if line.startswith("model "))
    assert f"model stories{ESCAPED} | " in header
    notice = next(line for line in lines if line.startswith("document cache not used"))
    assert f"cache{ESCAPED} is not a selfextend document cache" in notice
