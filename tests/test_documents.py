"""Reading documents: formats, encodings, and every bad input a user can give."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pdf_fixture import make_pdf

from selfextend_mlx.app.documents import (
    DEFAULT_MAX_INPUT,
    ENV_MAX_INPUT,
    format_documents,
    html_to_text,
    max_input_bytes,
    read_document,
    read_documents,
    reads_as_western,
)
from selfextend_mlx.errors import DocumentError, SelfExtendError


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def test_plain_text_and_markdown(tmp_path):
    text = read_document(write(tmp_path, "notes.txt", "Line one.\r\nLine two.\n"))
    assert (text.text, text.format) == ("Line one.\nLine two.\n", "text")
    markdown = read_document(write(tmp_path, "README.md", "# Title\n\nSome *text*."))
    assert markdown.format == "markdown" and markdown.text.startswith("# Title")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_byte_order_marks(tmp_path, encoding):
    doc = read_document(write(tmp_path, "bom.txt", "Grüße aus Köln".encode(encoding)))
    assert doc.text == "Grüße aus Köln"


def test_legacy_encoding_is_detected(tmp_path):
    text = "Le café était fermé, mais la crème brûlée restait délicieuse pour l'élève. " * 20
    doc = read_document(write(tmp_path, "latin.txt", text.encode("cp1252")))
    assert "crème brûlée" in doc.text and "élève" in doc.text


def test_html_text_is_extracted(tmp_path):
    html = (
        "<!DOCTYPE html><html><head><title>Report</title><style>p {color: red}</style>"
        "<script>var secret = 1;</script></head><body><h1>Results</h1><p>Sales rose &amp; costs fell.</p>"
        "<ul><li>one</li><li>two</li></ul></body></html>"
    )
    doc = read_document(write(tmp_path, "page.html", html))
    assert doc.format == "html"
    assert "Sales rose & costs fell." in doc.text.splitlines()
    assert "one" in doc.text.splitlines() and "two" in doc.text.splitlines()
    assert "secret" not in doc.text and "color" not in doc.text
    # Content, not the file name, decides: HTML under a .txt name is still HTML.
    assert read_document(write(tmp_path, "saved.txt", html)).format == "html"


def test_html_to_text_collapses_blank_lines():
    assert html_to_text("<div><div><p>a</p></div></div><div><p>b</p></div>") == "a\n\nb"


def test_pdf_text_is_extracted(tmp_path):
    doc = read_document(write(tmp_path, "paper.pdf", make_pdf(["First page text.", "The code word is (zebra)."])))
    assert doc.format == "pdf"
    assert "First page text." in doc.text and "The code word is (zebra)." in doc.text


def test_pdf_is_recognised_by_content(tmp_path):
    assert read_document(write(tmp_path, "download", make_pdf(["Hello."]))).format == "pdf"


def test_stdin(tmp_path):
    doc = read_document("-", stdin=io.BytesIO(b"from a pipe"))
    assert (doc.name, doc.text) == ("stdin", "from a pipe")


def test_several_documents_are_marked_with_their_names(tmp_path):
    a = write(tmp_path, "a.txt", "Alpha text.")
    b = write(tmp_path, "b.md", "Beta text.")
    prompt = format_documents(read_documents([a, b]))
    assert prompt.index(f'<document name="{a}">') < prompt.index("Alpha text.") < prompt.index(f'<document name="{b}">')
    assert prompt.index("Beta text.") < prompt.rindex("</document>")


# -- bad input: one clear line naming the file --------------------------------------------------


def error_of(path, **kwargs) -> str:
    with pytest.raises(DocumentError) as caught:
        read_document(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert error_of(str(tmp_path / "nope.txt")) == f"no such file: {tmp_path / 'nope.txt'}"


def test_directory(tmp_path):
    assert "is a directory" in error_of(str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"  \n\n\t  \n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, "empty.txt", content)
    assert error_of(path) == f"{path} is empty"


def test_binary_file(tmp_path):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10" + bytes(range(256))
    path = write(tmp_path, "image.txt", png)
    assert error_of(path) == f"{path} looks like a binary file, not text (it contains NUL bytes)"


def test_undecodable_text(tmp_path):
    path = write(tmp_path, "mystery.txt", bytes(range(128, 256)) * 10)
    message = error_of(path)
    assert message.startswith(f"cannot tell the text encoding of {path}") and "UTF-8" in message


def test_broken_pdf(tmp_path):
    path = write(tmp_path, "broken.pdf", make_pdf(["Hello."])[:120])
    assert error_of(path).startswith(f"cannot read PDF {path}:")


def test_pdf_without_text(tmp_path):
    path = write(tmp_path, "scan.pdf", make_pdf([""]))
    assert "has no extractable text" in error_of(path)


def test_empty_stdin():
    assert error_of("-", stdin=io.BytesIO(b"")) == "stdin is empty"


def test_no_documents_and_stdin_twice():
    with pytest.raises(DocumentError, match="no document given"):
        read_documents([])
    with pytest.raises(DocumentError, match="only once"):
        read_documents(["-", "-"], stdin=io.BytesIO(b"x"))


# -- the input limit: sizes checked before reading, pipes read only up to it ------------------------


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    sparse = tmp_path / "huge.txt"
    with open(sparse, "wb") as f:
        f.truncate(2_000_000_000)  # 2 GB on paper, nothing on disk
    read = []
    real_open = open

    def watched_open(path, *args, **kwargs):
        file = real_open(path, *args, **kwargs)
        if str(path) == str(sparse):
            original = file.read
            file.read = lambda *a: read.append(a) or original(*a)
        return file

    monkeypatch.setattr("builtins.open", watched_open)
    message = error_of(str(sparse))
    assert message.startswith(f"{sparse} is 2.0 GB, over the input limit of 10.0 MB")
    assert "--max-input" in message and "SELFEXTEND_MAX_INPUT" in message
    assert read == []  # refused from its size alone


class Endless(io.RawIOBase):
    """A pipe that never ends (`yes | selfextend ask -`), counting what was taken from it."""

    def __init__(self, line=b"y\n"):
        self.line, self.taken = line, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = len(buffer)
        buffer[:n] = (self.line * (n // len(self.line) + 1))[:n]
        self.taken += n
        return n


def test_an_endless_pipe_is_read_only_up_to_the_limit():
    pipe = Endless()
    message = error_of("-", stdin=io.BufferedReader(pipe), max_bytes="1MB")
    assert message.startswith("stdin is over the input limit of 1.0 MB")
    assert pipe.taken <= 1_000_000 + (1 << 20) + 8192  # the limit and one chunk at most


def test_dev_zero_is_refused_at_once():
    if not Path("/dev/zero").exists():
        pytest.skip("this system has no /dev/zero")
    assert "looks like a binary file" in error_of("/dev/zero")


def test_the_limit_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, "book.txt", "word " * 3000)  # 15 kB
    assert read_document(path).text.startswith("word")
    monkeypatch.setenv(ENV_MAX_INPUT, "10k")
    assert "over the input limit of 10.0 KB" in error_of(path)
    assert read_document(path, max_bytes="20kB").text.startswith("word")
    assert max_input_bytes() == 10_000
    monkeypatch.setenv(ENV_MAX_INPUT, "lots")
    with pytest.raises(SelfExtendError, match="SELFEXTEND_MAX_INPUT='lots' is not a size"):
        read_document(path)
    monkeypatch.delenv(ENV_MAX_INPUT)
    assert max_input_bytes() == DEFAULT_MAX_INPUT >= 5_000_000  # a long book gets through


def test_the_limit_applies_to_the_documents_together(tmp_path):
    a = write(tmp_path, "a.txt", "alpha " * 1000)
    b = write(tmp_path, "b.txt", "beta " * 1000)
    assert len(read_documents([a, b], max_bytes=20_000)) == 2
    with pytest.raises(DocumentError, match="over the input limit"):
        read_documents([a, b], max_bytes=8_000)


def test_pdf_text_is_held_to_the_limit(tmp_path):
    path = write(tmp_path, "long.pdf", make_pdf(["x" * 400] * 5))
    assert "over the input limit" in error_of(path, max_bytes=1000)


# -- encodings: UTF-8 first, then the common Western ones unless the evidence is strong -------------


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("Le café était fermé.", "latin-1"),  # was read as mac_latin2: "cafť ťtait"
        ("À l'été, la crème brûlée était délicieuse.", "cp1252"),
        ("Grüße aus Köln, schöne Straße.", "cp1252"),
        ("Über den Fluß gehen die Bären.", "latin-1"),
        ("\u201cHello,\u201d she said \u2014 it\u2019s fine\u2026", "cp1252"),  # was read as cp775
        ("¿Dónde está el niño? ¡Aquí!", "cp1252"),
    ],
)
def test_short_western_texts_are_decoded_right(tmp_path, text, encoding):
    assert read_document(write(tmp_path, "short.txt", text.encode(encoding))).text == text


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("Привет, как дела? Это короткий текст на русском языке.", "cp1251"),
        ("Zażółć gęślą jaźń. Łódź jest pięknym miastem.", "cp1250"),
        ("Καλημέρα, πώς είστε σήμερα;", "cp1253"),
        ("これは日本語の短い文章です。", "shift_jis"),
    ],
)
def test_other_code_pages_are_not_forced_into_western(tmp_path, text, encoding):
    assert read_document(write(tmp_path, "other.txt", text.encode(encoding))).text == text


def test_reads_as_western():
    assert reads_as_western("Le café était fermé, l’élève à côté.")
    assert not reads_as_western("Ïðèâåò, êàê äåëà?")  # Cyrillic read as cp1252
    assert not reads_as_western("Za¿ó³æ gêœl¹ jaŸñ.")  # Polish read as cp1252


# -- HTML however it starts, PDFs however they break, names however they are spelt ------------------


@pytest.mark.parametrize(
    "start",
    [
        "<!-- saved from a browser -->\n<html>",
        '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0//EN">\n<html>',
        "<head>",
        "\n\n  <!-- one --><!-- two -->\n<HTML lang='en'>",
    ],
)
def test_html_on_stdin_is_recognised_however_it_starts(start):
    page = f"{start}<title>T</title><script>var secret = 1;</script><body><p>Visible text.</p></body></html>"
    doc = read_document("-", stdin=io.BytesIO(page.encode()))
    assert doc.format == "html" and "Visible text." in doc.text and "secret" not in doc.text


def test_xml_and_markdown_are_not_taken_for_html():
    assert read_document("-", stdin=io.BytesIO(b'<?xml version="1.0"?><rss><item>x</item></rss>')).format == "text"
    assert read_document("-", stdin=io.BytesIO(b"# Title\n\n<div>inline</div>")).format == "text"


def test_cyclic_pdf_names_the_file(tmp_path):
    looped = make_pdf(["Hello."]).replace(b"/Kids [4 0 R]", b"/Kids [2 0 R]")
    path = write(tmp_path, "loop.pdf", looped)
    message = error_of(path)
    assert message.startswith(f"cannot read PDF {path}:")


def test_any_pdf_library_failure_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import pypdf

    from selfextend_mlx.app import documents

    path = write(tmp_path, "odd.pdf", make_pdf(["Hello."]))
    for error in (pypdf.errors.LimitReachedError("Limit reached while decompressing."), AttributeError("'NoneType'")):

        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(pypdf, "PdfReader", broken)
        message = error_of(path)
        assert message.startswith(f"cannot read PDF {path}: {type(error).__name__}")
    assert documents.DocumentError is DocumentError


def test_a_file_name_that_is_not_utf8_is_shown_and_read(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(b"The code is 4711.")
    name = os.fsdecode(raw)  # what Python makes of the bytes on the command line
    doc = read_document(name)
    assert doc.text == "The code is 4711." and "\ufffd" in doc.name
    doc.name.encode("utf-8")  # no lone surrogates: every tokenizer takes it
    assert "\ufffd" in error_of(name + "-missing")


def test_stdin_is_labelled_by_its_first_words():
    doc = read_document("-", stdin=io.BytesIO(b"Once upon a time there was a little girl named Lily who loved."))
    assert doc.name == "stdin"  # what the prompt says stays the same
    assert doc.label == 'stdin "Once upon a time there was a little..."'


def test_a_piped_prompt_is_held_to_the_limit_and_decoded():
    from selfextend_mlx.app.documents import read_text

    assert read_text(io.BytesIO("Grüße".encode("cp1252"))) == "Grüße"
    with pytest.raises(DocumentError, match="stdin is over the input limit of 1.0 KB"):
        read_text(io.BufferedReader(Endless()), max_bytes="1k")


# -- HTML in linear time (issue 29.2) ----------------------------------------------------------

HOSTILE_PAGES = {
    "unclosed tags": "<!doctype html>" + "<a " * 20000,
    "nested divs": "<div>" * 100_000 + "deep" + "</div>" * 100_000,
    "an open comment": "<!doctype html><p>x<!--" + "-" * 500_000,
    "many attributes": "<p " + "a=b " * 100_000 + ">hi",
}


PARSE_BOUND = 60  # seconds: the child is killed past it and the test fails (the old parser: hours)


def parse_seconds(page: str) -> float:
    """Seconds html_to_text takes on `page`, in a child process bounded in time."""
    script = (
        "import sys, time\nfrom selfextend_mlx.app.documents import html_to_text\n"
        "page = sys.stdin.read()\nstarted = time.perf_counter()\nhtml_to_text(page)\n"
        "print(time.perf_counter() - started)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=page, capture_output=True, text=True, timeout=PARSE_BOUND
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


@pytest.mark.parametrize("kind", sorted(HOSTILE_PAGES))
def test_hostile_html_parses_in_linear_time(kind):
    once, tenfold = parse_seconds(HOSTILE_PAGES[kind]), parse_seconds(HOSTILE_PAGES[kind] * 10)
    assert tenfold < 5, f"{kind}: {tenfold:.1f}s for ten copies"
    assert tenfold < 40 * max(once, 0.01)  # linear: ten times the input, not a hundred times the time


def test_html_on_stdin_with_unclosed_tags_is_read_quickly():
    page = "<!doctype html>" + "<a " * 20000 + "<p>after</p>"
    script = (
        "import sys\nfrom selfextend_mlx.app.documents import read_document\n"
        "print(read_document('-', stdin=sys.stdin.buffer).format)"
    )
    done = subprocess.run([sys.executable, "-c", script], input=page, capture_output=True, text=True, timeout=15)
    assert done.stdout.strip() == "html", done.stderr
