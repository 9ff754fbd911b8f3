"""Reading documents: formats, encodings, and every bad input a user can give."""

import io

import pytest
from pdf_fixture import make_pdf

from selfextend_mlx.app.documents import format_documents, html_to_text, read_document, read_documents
from selfextend_mlx.errors import DocumentError


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
