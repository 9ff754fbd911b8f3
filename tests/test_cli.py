"""The `selfextend` CLI, through Typer's runner (in process) and through real subprocesses of
the installed console script. Most runs use stories260K (real weights, 512-token context) so
documents beyond its context stay cheap; a few use the default chat model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import (  # fixtures by name: the autouse ones apply to this module too
    invoke,
    isolated_cache,
    load_each_model_once,
    stories,
    story_text,
    write,
)
from conftest import shared_path
from pdf_fixture import make_pdf
from typer.testing import CliRunner

import selfextend_mlx.loading.load as loading
from selfextend_cli.main import app


def json_of(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["chat"], ["ask"], ["summarize"], ["generate"], ["cache"], ["cache", "list"], ["cache", "clear"]]
)
def test_every_help_teaches_with_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    example = result.stdout.split("Example", 1)[1]
    assert "selfextend " + (command[0] if command else "") in example


# -- ask, summarize, generate -----------------------------------------------------------------


def test_ask_json_beyond_the_trained_context(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:3000])
    record = json_of(invoke("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "24", "--json"))
    for key in (
        "answer",
        "prompt_tokens",
        "generation_tokens",
        "group_size",
        "window",
        "prompt_tps",
        "generation_tps",
        "peak_memory_bytes",
    ):
        assert key in record
    assert isinstance(record["answer"], str) and record["answer"].strip()
    assert record["trained_context"] == 512 and record["prompt_tokens"] > 2 * 512
    assert 1 <= record["generation_tokens"] <= 24 and record["prompt_tps"] > 0 and record["peak_memory_bytes"] > 0
    reach = (512 - record["window"]) * record["group_size"] + record["window"]
    assert record["max_length"] == reach >= record["prompt_tokens"] + 24


def test_ask_reads_stdin_and_streams_plain_text(stories, story_text):
    result = invoke("ask", "-", "-q", "Who is Lily?", "-m", stories, "-n", "8", input=story_text[:800])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and not result.stdout.lstrip().startswith("{")
    # stderr is not a terminal here, and still gets the header first and the stats line last
    lines = result.stderr.splitlines()
    assert lines[0].startswith("model stories260K | document ") and lines[-1].startswith("prompt ")
    quiet = invoke("ask", "-q", "Who is Lily?", "-m", stories, "-n", "8", "--quiet", input=story_text[:800])
    assert quiet.exit_code == 0 and quiet.stderr == ""  # --quiet: nothing but errors
    assert quiet.stdout == result.stdout  # and piped text without `-` is the same document


def test_planned_settings_are_shown_in_the_header(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:4500])  # ~2.3k tokens: G=4 reaches 1664
    result = invoke("ask", document, "-q", "Who?", "-m", stories, "-n", "4", "--progress")
    assert result.exit_code == 0, result.stderr
    header = next(line for line in result.stderr.splitlines() if line.startswith("model "))
    assert "trained context 512" in header and "| selfextend G=7 W=128 (the smallest G that reaches)" in header
    assert "N_max" in header and "memory ~" in header
    short = write(tmp_path, "short.txt", story_text[:300])
    result = invoke("ask", short, "-q", "Who?", "-m", stories, "-n", "4", "--progress")
    assert "plain attention (fits the model's context)" in result.stderr


def test_a_given_group_size_that_does_not_reach_is_one_error_line(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:4500])
    result = invoke("ask", document, "-q", "Who?", "-m", stories, "-n", "4", "-G", "4")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: input too long for -G 4: ") and result.stderr.count("\n") == 1
    assert "> N_max 1664; it needs G=7 W=128" in result.stderr


def test_summarize_styles(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:1500])
    for style in ("bullets", "paragraph"):
        record = json_of(invoke("summarize", document, "--style", style, "-m", stories, "-n", "8", "--json"))
        assert record["generation_tokens"] >= 1
    # Two styles, one document: the second run reused the document prefill.
    assert record["document_cache"] == "hit"


def test_generate_with_mlx_lm_flags(stories):
    def run(seed):
        return json_of(
            invoke(
                "generate",
                "--prompt",
                "Once upon a time",
                "-m",
                stories,
                "--max-tokens",
                "12",
                "--temp",
                "1.5",
                "--top-p",
                "0.95",
                "--seed",
                seed,
                "--prefill-step-size",
                "4",
                "-G",
                "2",
                "-W",
                "64",
                "--json",
            )
        )

    first, second = run(3), run(3)
    assert first["text"] and first["text"] == second["text"]  # the seed makes sampling repeatable
    assert len({run(seed)["text"] for seed in (4, 5, 6)} | {first["text"]}) > 1  # and the seed matters
    assert (first["group_size"], first["window"]) == (2, 64)
    assert first["prompt_tokens"] == 5  # BOS + 4 tokens, no template: stories260K has none


def test_generate_prompt_from_stdin(stories):
    result = invoke("generate", "--prompt", "-", "-m", stories, "-n", "6", input="Tom and Lily went to the park.")
    assert result.exit_code == 0 and result.stdout.strip()


# -- the document cache --------------------------------------------------------------------------


def test_second_run_answers_from_the_document_cache(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "stories.txt", story_text[:2000])
    args = ("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "12", "--json")
    first = json_of(invoke(*args))
    second = json_of(invoke(*args))
    assert (first["document_cache"], second["document_cache"]) == ("miss", "hit")
    assert first["prefilled_tokens"] == first["prompt_tokens"]
    # Only the question was computed: the whole document (and the template before it) came from the cache.
    assert second["prefilled_tokens"] < 20
    assert second["prompt_tokens"] - second["prefilled_tokens"] >= second["document_tokens"]
    assert second["answer"] == first["answer"]

    listed = invoke("cache", "list")
    assert listed.exit_code == 0 and "1 cached document" in listed.stdout and document in listed.stdout
    entries = json_of(invoke("cache", "list", "--json"))["entries"]
    assert len(entries) == 1 and entries[0]["tokens"] == first["document_tokens"]
    cleared = invoke("cache", "clear", "--yes")  # no terminal to ask at
    assert cleared.exit_code == 0 and cleared.stdout.startswith("removed 1 cached document")
    assert "no cached documents" in invoke("cache", "list").stdout
    # --no-cache neither reads nor writes.
    assert json_of(invoke(*args, "--no-cache"))["document_cache"] == "off"
    assert not list(isolated_cache.glob("*.safetensors"))


def test_corrupt_cache_file_is_reported_in_one_line_and_rebuilt(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "stories.txt", story_text[:1500])
    args = ("ask", document, "-q", "Who is Lily?", "-m", stories, "-n", "8", "--json", "--quiet")
    json_of(invoke(*args))
    (saved,) = isolated_cache.glob("*.safetensors")
    saved.write_bytes(b"this is not a cache")
    rebuilt = invoke(*args)
    assert json_of(rebuilt)["document_cache"] == "miss"
    assert len(rebuilt.stderr.splitlines()) == 1
    assert (
        rebuilt.stderr.startswith("document cache unusable, rebuilding it:")
        and "not a readable prompt cache" in rebuilt.stderr
    )
    assert json_of(invoke(*args))["document_cache"] == "hit"


def test_cache_dir_option(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:600])
    elsewhere = tmp_path / "elsewhere"
    json_of(invoke("ask", document, "-q", "Who?", "-m", stories, "-n", "4", "--json", "--cache-dir", elsewhere))
    assert len(list(elsewhere.glob("*.safetensors"))) == 1
    assert "1 cached document" in invoke("cache", "list", "--cache-dir", elsewhere).stdout


# -- chat --------------------------------------------------------------------------------------


def info_lines(stdout: str) -> dict:
    return {line.split(":", 1)[0]: line for line in stdout.splitlines() if ":" in line}


def test_chat_two_turns_reuses_the_cache(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text[:2000])
    result = invoke(
        "chat",
        document,
        "-m",
        stories,
        "-n",
        "10",
        input="Who is Lily?\nWhat did Tom find?\n/info\n/quit\nNever asked?\n",
    )
    assert result.exit_code == 0, result.stderr
    stderr = result.stderr.splitlines()
    assert stderr[0].startswith("model stories260K | document ")  # the one header line
    answers = result.stdout.split("\n\n")
    assert len([a for a in answers[:2] if a.strip()]) == 2
    info = info_lines(result.stdout)
    assert "2 turns" in info["conversation"]
    computed, reused = [int(w.replace(",", "")) for w in info["last turn"].split() if w.replace(",", "").isdigit()][1:3]
    # Turn two computed only its own tokens (and, at most, the re-encoded first answer).
    assert reused > 500 and computed < 40


def test_each_chat_turn_ends_with_the_stats_line_and_why_it_stopped(tmp_path, stories):
    document = write(tmp_path, "note.txt", "Tom has a red ball. Lily has a blue kite. " * 5)
    result = invoke("chat", document, "-m", stories, "-n", "5", "--allow-repeats", input="Who has a ball?\nAnd Lily?\n")
    assert result.exit_code == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt ") and "| answer " in line]
    assert len(stats) == 2
    assert any("answer 5 tokens" in line and "stopped at the answer limit (-n 5)" in line for line in stats)
    quiet = invoke("chat", document, "-m", stories, "-n", "5", "--quiet", input="Who has a ball?\n")
    assert quiet.exit_code == 0 and "| answer " not in quiet.stderr


def test_chat_without_a_document_talks_to_the_model(stories):
    result = invoke("chat", "-m", stories, "-n", "8", input="Once upon a time\n/info\n")
    assert result.exit_code == 0, result.stderr
    assert "1 turn," in result.stdout and "| answer " in result.stderr


def test_chat_commands(tmp_path, stories):
    document = write(tmp_path, "note.txt", "Tom has a red ball. Lily has a blue kite.")
    result = invoke("chat", document, "-m", stories, "-n", "6", input="Who has a ball?\n/reset\n/bogus\n/help\n/info\n")
    assert result.exit_code == 0
    assert "conversation cleared" in result.stderr and "unknown command /bogus: try /help" in result.stderr
    assert "/reset" in result.stdout and "0 turns" in result.stdout


def test_ctrl_c_stops_the_answer_not_the_chat(tmp_path, stories, monkeypatch):
    import selfextend_cli.chat_cmd as chat_cmd

    document = write(tmp_path, "note.txt", "Tom has a red ball. Lily has a blue kite. " * 5)
    written = []
    real_write = chat_cmd.write_out

    def write_then_ctrl_c(text):
        written.append(text)
        if len(written) == 2:  # the user presses Ctrl-C during the first answer
            raise KeyboardInterrupt
        real_write(text)

    monkeypatch.setattr(chat_cmd, "write_out", write_then_ctrl_c)
    result = invoke("chat", document, "-m", stories, "-n", "12", input="Who has a ball?\nWho has a kite?\n/info\n")
    assert result.exit_code == 0
    assert "(answer stopped)" in result.stderr
    assert "2 turns" in result.stdout  # the stopped answer stays in the conversation, the next one ran


# -- bad input: one line on stderr, non-zero exit, never a traceback ------------------------------


def assert_one_line_error(result, code, starts):
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(starts), lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "content, starts",
    [
        (None, "error: no such file: "),
        (b"", "error: "),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "error: "),
        (bytes(range(128, 256)) * 10, "error: cannot tell the text encoding of "),
        (make_pdf(["x"])[:100], "error: cannot read PDF "),
    ],
    ids=["missing", "empty", "binary", "encoding", "broken-pdf"],
)
def test_bad_documents(tmp_path, stories, content, starts):
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    result = invoke("ask", path, "-q", "Why?", "-m", stories)
    assert_one_line_error(result, 1, starts)
    if content == b"":
        assert result.stderr.strip() == f"error: {path} is empty"
    if content and content.startswith(b"\x89PNG"):
        assert "looks like a binary file" in result.stderr


def test_unknown_model(tmp_path):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    assert_one_line_error(invoke("ask", document, "-q", "Why?", "-m", str(tmp_path / "no-such-model")), 1, "error: ")


def test_past_the_largest_reach_ask_retrieves_and_summarize_maps_and_reduces(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text)  # ~9.3k tokens; stories260K reaches 6272 at G=16
    record = json_of(invoke("ask", document, "-q", "Why did Lily cry?", "-m", stories, "-n", "16", "--json"))
    assert record["strategy"] == "retrieval" and record["document_tokens"] > 9000
    assert (
        record["selected_tokens"] < record["document_tokens"] and record["total_passages"] > record["selected_passages"]
    )
    assert record["prompt_tokens"] + 16 <= record["max_length"] <= 6272 and record["group_size"] > 1
    assert record["method"] == "selfextend"
    record = json_of(invoke("summarize", document, "-m", stories, "-n", "16", "--json"))
    assert record["strategy"] == "map-reduce" and record["parts"] >= 2 and record["levels"] >= 2
    assert "summary" in record and "answer" not in record and record["document_tokens"] > 9000


def test_fitting_documents_say_strategy_full(tmp_path, stories):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    record = json_of(invoke("ask", document, "-q", "What does Tom have?", "-m", stories, "-n", "4", "--json"))
    assert record["strategy"] == "full" and record["document_tokens"] > 0 and record["group_size"] == 1
    assert set(record) >= {"prompt_tokens", "max_length", "group_size", "window"} and record["method"] == "plain"


def test_a_chat_about_a_document_past_the_largest_reach_is_one_error_line(tmp_path, stories, story_text):
    document = write(tmp_path, "stories.txt", story_text)
    result = invoke("chat", document, "-m", stories, input="Why?\n")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "use `selfextend ask`" in result.stderr and "`selfextend summarize`" in result.stderr


def test_not_enough_memory(tmp_path, stories, monkeypatch):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    monkeypatch.setenv("SELFEXTEND_MAX_MEMORY", "1MB")
    result = invoke("ask", document, "-q", "Why?", "-m", stories)
    assert_one_line_error(result, 1, "error: not enough memory: this run needs about ")


@pytest.mark.parametrize(
    "args",
    [
        ["ask", "DOC", "-q", "x", "--temp", "-1"],
        ["ask", "DOC", "-q", "x", "--top-p", "2"],
        ["ask", "DOC", "-q", "x", "-G", "0"],
        ["ask", "DOC", "-q", "x", "--kv-bits", "3"],
        ["ask", "DOC", "-q", "x", "--max-tokens", "0"],
        ["ask", "DOC", "-q", "x", "--bogus"],
        ["ask", "DOC", "-q", "x", "--temp", "inf"],
        ["ask", "DOC", "-q", "x", "--top-p", "nan"],
        ["ask", "DOC", "-q", ""],
        ["ask", "DOC", "-q", "  "],
        ["ask", "DOC", "-q", "x", "-n", "12q"],
        ["summarize", "DOC", "--style", "poem"],
        ["generate", "-p", "x", "--verbose", "maybe"],
        ["chat", "-"],  # a chat's questions come on stdin: its documents must be files
        ["frobnicate"],
    ],
)
def test_wrong_flags(tmp_path, args):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    result = invoke(*[document if a == "DOC" else a for a in args])
    assert_one_line_error(result, 2, "error: ")
    assert "--help" in result.stderr


def test_window_beyond_the_context(tmp_path, stories):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    result = invoke("ask", document, "-q", "x", "-m", stories, "-W", "600")
    assert_one_line_error(result, 1, "error: --window 600 must be smaller than the model's trained context 512")


def test_question_needed_when_stdin_is_not_a_terminal(tmp_path, stories):
    document = write(tmp_path, "note.txt", "Tom has a red ball.")
    assert_one_line_error(invoke("ask", document, "-m", stories, input="x"), 2, "error: give the question with -q")
    assert_one_line_error(invoke("ask", "-m", stories, input="x"), 2, "error: give the question with -q")
    assert_one_line_error(
        invoke("chat", "-", "-m", stories, input="x"), 2, "error: chat reads its questions from standard input"
    )


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.txt"
    for args in (["--debug", "ask", missing, "-q", "x"], ["ask", missing, "-q", "x", "--debug"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert "Traceback" in result.stderr and result.stderr.splitlines()[-1] == f"error: no such file: {missing}"


# -- real subprocesses of the installed console script -------------------------------------------


def console_script() -> str:
    script = Path(sys.executable).with_name("selfextend")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project (pip install -e .) before running the tests")
    return str(script)


def run_script(*args, input=None, env=None, timeout=240):
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [console_script(), *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def test_script_chat_piped_two_turns(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "stories.txt", story_text[:2000])
    done = run_script("chat", document, "-m", stories, "-n", "10", input="Who is Lily?\nWhat did Tom find?\n/info\n")
    assert done.returncode == 0, done.stderr
    assert "model stories260K | document " in done.stderr and "Traceback" not in done.stderr
    info = info_lines(done.stdout)
    assert "2 turns" in info["conversation"] and "reused from the cache" in info["last turn"]
    # The chat saved the document: a second chat starts from the cache.
    again = run_script("chat", document, "-m", stories, "-n", "4", input="Who is Lily?\n/info\n")
    assert "document read from the cache" in again.stderr and "read from the document cache" in again.stdout


def test_script_ask_json_from_stdin(stories, story_text):
    done = run_script("ask", "-q", "Who is Lily?", "-m", stories, "-n", "8", "--json", input=story_text[:2000])
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["prompt_tokens"] > 512 and record["group_size"] >= 1
    lines = done.stderr.splitlines()  # a log (stderr is a pipe here) gets the header and the stats line
    assert lines[0].startswith("model stories260K | document ") and lines[-1].startswith("prompt ")
    assert "Traceback" not in done.stderr


def test_script_error_is_one_line(tmp_path):
    binary = write(tmp_path, "data.bin", bytes(range(256)) * 4)
    done = run_script("ask", binary, "-q", "x")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"error: {binary} looks like a binary file, not text (it contains NUL bytes)"]


def test_script_ctrl_c_during_prefill_exits_130_and_saves_nothing(tmp_path, stories, story_text, isolated_cache):
    document = write(tmp_path, "stories.txt", story_text[:10000])  # ~5k tokens: seconds of prefill
    process = subprocess.Popen(
        [console_script(), "ask", document, "-q", "Who?", "-m", stories, "-n", "8", "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    for line in process.stderr:  # the progress bar's first line: prefill has started
        if line.startswith("reading ["):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert not isolated_cache.exists() or list(isolated_cache.iterdir()) == []


# -- the default chat model --------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_answers_from_the_document_with_its_chat_template(tmp_path):
    document = write(
        tmp_path,
        "bakery.md",
        (
            "# Harbor Street Bakery\n\nThe bakery opened in 1987. Its founder, Marta Keller, baked rye bread every "
            "morning at four. In 2003 it moved to a larger building near the river.\n\nThe secret ingredient in its "
            "famous apple cake is cardamom.\n"
        ),
    )
    result = invoke(
        "chat",
        document,
        "-n",
        "40",
        input="What is the secret ingredient in the apple cake?\nWho founded the bakery?\n/info\n",
    )
    assert result.exit_code == 0, result.stderr
    assert "model SmolLM2-135M-Instruct" in result.stderr
    answers = result.stdout.lower()
    assert "cardamom" in answers and "marta keller" in answers
    info = info_lines(result.stdout)
    computed, reused = [int(w.replace(",", "")) for w in info["last turn"].split() if w.replace(",", "").isdigit()][1:3]
    assert reused > 100 and computed < 30  # the template's turn markers and the new question only
