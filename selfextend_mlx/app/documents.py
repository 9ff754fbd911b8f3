"""Read documents as plain text: text, Markdown, HTML and PDF files, or stdin.

Every failure a user can cause (missing, empty, binary, undecodable, broken PDF) raises
DocumentError with a one-line message naming the file.
"""

import io
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO, Optional

from ..errors import DocumentError

STDIN = "-"
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
MARKDOWN_SUFFIXES = {".md", ".markdown", ".mdown", ".mkd"}
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


@dataclass(frozen=True)
class Document:
    name: str  # as the user named it: shown in the prompt and in messages
    text: str
    format: str  # "text", "markdown", "html" or "pdf"


def read_document(path: str, stdin: Optional[BinaryIO] = None) -> Document:
    """Read one document; `-` reads standard input (or `stdin` when given)."""
    if path == STDIN:
        stream = stdin if stdin is not None else sys.stdin.buffer
        data = stream.read()
        name = "stdin"
        suffix = ""
    else:
        data = _read_bytes(Path(path))
        name = path
        suffix = Path(path).suffix.lower()
    document = parse_document(name, data, suffix)
    if not document.text.strip():
        what = "has no extractable text (a scanned PDF needs OCR first)" if document.format == "pdf" else "is empty"
        raise DocumentError(f"{name} {what}")
    return document


def read_documents(paths: Iterable[str], stdin: Optional[BinaryIO] = None) -> list[Document]:
    paths = list(paths)
    if not paths:
        raise DocumentError("no document given: name a file, or - to read standard input")
    if paths.count(STDIN) > 1:
        raise DocumentError("standard input (-) can be read only once")
    return [read_document(path, stdin) for path in paths]


def parse_document(name: str, data: bytes, suffix: str = "") -> Document:
    """Bytes to text, choosing the reader from the content first and the file name second."""
    if data.startswith(b"%PDF-"):
        return Document(name, _pdf_text(name, data), "pdf")
    text = decode_text(name, data)
    if suffix in HTML_SUFFIXES or _looks_like_html(text):
        return Document(name, html_to_text(text), "html")
    return Document(name, text, "markdown" if suffix in MARKDOWN_SUFFIXES else "text")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DocumentError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise DocumentError(f"{path} is a directory; name the files inside it") from None
    except PermissionError:
        raise DocumentError(f"cannot read {path}: permission denied") from None
    except OSError as error:
        raise DocumentError(f"cannot read {path}: {error.strerror or error}") from None


def decode_text(name: str, data: bytes) -> str:
    """UTF-8 (or a BOM's encoding) when it fits, else a detected legacy encoding; binary refused."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _normalize_newlines(data.decode(encoding))
            except UnicodeDecodeError:
                raise DocumentError(
                    f"{name} starts with a {encoding} byte-order mark but is not valid {encoding}"
                ) from None
    if b"\x00" in data:
        raise DocumentError(f"{name} looks like a binary file, not text (it contains NUL bytes)")
    try:
        return _normalize_newlines(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = from_bytes(data)
    guess = matches.best()
    if guess is None:
        raise DocumentError(
            f"cannot tell the text encoding of {name}: it is not UTF-8 and no other encoding fits; "
            "convert it to UTF-8 (for example with iconv)"
        )
    text = str(guess)
    # Single-byte code pages often tie (cp1250 and cp1252 read "é" alike); on a tie take
    # Windows-1252, by far the most common legacy encoding of Western text.
    tied = [m for m in matches if (m.chaos, m.coherence) == (guess.chaos, guess.coherence)]
    if any("cp1252" in m.could_be_from_charset for m in tied):
        text = data.decode("cp1252", errors="replace")
    if _control_ratio(text) > 0.05:
        raise DocumentError(f"{name} looks like a binary file, not text")
    return _normalize_newlines(text)


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _control_ratio(text: str) -> float:
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\n\t\f\v")
    return controls / max(len(text), 1)


def _looks_like_html(text: str) -> bool:
    head = text.lstrip()[:200].lower()
    return head.startswith("<!doctype html") or head.startswith("<html")


# Elements whose end starts a new line in the extracted text.
_BLOCKS = {
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "tr",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "title",
    "dd",
    "dt",
    "hr",
    "main",
    "nav",
}
_SKIPPED = {"script", "style", "noscript", "template", "svg"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED:
            self.skipping += 1
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    lines = (" ".join(line.split()) for line in "".join(extractor.parts).split("\n"))
    # Collapse runs of blank lines left by nested blocks into one paragraph break.
    text, blank = [], False
    for line in lines:
        if line:
            text.append(line)
            blank = False
        elif not blank and text:
            text.append("")
            blank = True
    return "\n".join(text).strip()


def _pdf_text(name: str, data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf warns about harmless quirks on stderr
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypts_without_password(reader):
            raise DocumentError(f"{name} is an encrypted PDF; decrypt it first")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as error:
        raise DocumentError(f"cannot read PDF {name}: {error}") from None
    return "\n\n".join(page.strip() for page in pages if page.strip())


def _decrypts_without_password(reader) -> bool:
    try:
        return bool(reader.decrypt(""))
    except Exception:  # pypdf raises its own types, or needs `cryptography` for AES
        return False


def format_documents(documents: list[Document]) -> str:
    """The documents as they go into the prompt, each marked with its name."""
    return "\n\n".join(f'<document name="{doc.name}">\n{doc.text.strip()}\n</document>' for doc in documents)
