"""Inputs that never end (issue 28.6): a named pipe no one writes to is refused after a
bounded wait, and every text a user sends, chat lines included, is held to the one input
cap (one line, non-zero exit, never a MemoryError). Each run is a child process bounded in
time: past its bound the test fails, it does not hang."""

import io
import os
import subprocess
import sys
import threading

import pytest
from conftest import shared_path

import selfextend_mlx.app.documents as documents
from selfextend_mlx.app.documents import check_text_size, read_document, read_line
from selfextend_mlx.errors import DocumentError

STORIES = str(shared_path("models", "stories260K"))


def selfextend(*args, input="", env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "selfextend_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_error_line(done, words):
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and words in lines[0], done.stderr


def test_a_fifo_without_a_writer_is_refused_after_a_bounded_wait(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = selfextend("ask", str(fifo), "-q", "hi", "-m", STORIES, timeout=60)  # the wait is 10 s
    one_error_line(done, "nothing was written to the named pipe")


def test_a_fifo_with_a_writer_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "FIFO_WAIT_SECONDS", 5.0)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "w") as pipe:
            pipe.write("Tom has a red ball. " * 1000)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert read_document(str(fifo)).text.startswith("Tom has a red ball.")
    writer.join(5)


def test_one_cap_for_lines_and_questions():
    assert read_line(io.BytesIO(b"short\nnext"), "chat", max_bytes=100) == b"short\n"
    with pytest.raises(DocumentError, match="over the input limit"):
        read_line(io.BytesIO(b"x" * 1000), "chat", max_bytes=100)
    with pytest.raises(DocumentError, match="over the input limit"):
        check_text_size("é" * 60, "the question", max_bytes=100)  # 120 bytes


def test_an_endless_chat_line_is_one_line_not_a_memory_error(tmp_path):
    document = tmp_path / "story.txt"
    document.write_text("Tom has a red ball. He plays with it in the park.")
    endless = "why " * 300_000  # 1.2 MB and no newline: past the 1 MB cap set here
    done = selfextend(
        "chat",
        str(document),
        "-m",
        STORIES,
        "-n",
        "2",
        "--no-cache",
        input=endless,
        env={"SELFEXTEND_MAX_INPUT": "1MB"},
    )
    one_error_line(done, "a line of the chat's input is over the input limit")


def test_a_question_of_many_lines_keeps_to_the_cap(tmp_path):
    document = tmp_path / "story.txt"
    document.write_text("Tom has a red ball.")
    many = '"""\n' + "why is the ball red\n" * 60_000  # 1.2 MB in lines that each fit
    done = selfextend(
        "chat", str(document), "-m", STORIES, "-n", "2", "--no-cache", input=many, env={"SELFEXTEND_MAX_INPUT": "1MB"}
    )
    one_error_line(done, "the question is over the input limit")
