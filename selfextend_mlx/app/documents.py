"""Read documents as plain text: text, Markdown, HTML and PDF files, or stdin.

Every failure a user can cause (missing, empty, binary, undecodable, broken PDF, larger than
the input limit) raises DocumentError with a one-line message naming the file. Memory stays
bounded: a file's size is checked before it is read, a pipe or device is read only up to the
limit, and a PDF's extracted text is held to the same limit.
"""

import io
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
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

# A long book is 1-4 MB of text; 10 MB lets any of them through while keeping the tokenizer's
# working memory near 1.4 GB (measured on SmolLM2's tokenizer: docs/reliability.md).
DEFAULT_MAX_INPUT = 10_000_000
ENV_MAX_INPUT = "SELFEXTEND_MAX_INPUT"
_CHUNK = 1 << 20  # pipes and devices are read a megabyte at a time
_SNIFF = 1 << 16  # binary data is recognised from its first 64 KB, before the rest is read
FIFO_WAIT_SECONDS = 10.0  # how long a named pipe may stay without a writer before it is refused


@dataclass(frozen=True)
class Document:
    name: str  # as the user named it: shown in the prompt and in messages
    text: str
    format: str  # "text", "markdown", "html" or "pdf"

    @property
    def label(self) -> str:
        """A name for listings: the file name, or for stdin its first words (so two piped
        documents can be told apart in `selfextend cache list`)."""
        if self.name != "stdin":
            return self.name
        words = " ".join(self.text.split()[:8])
        return f'stdin "{words[:40]}{"..." if len(words) > 40 or len(self.text.split()) > 8 else ""}"'


def max_input_bytes(value=None) -> int:
    """The input limit in bytes: `value` (bytes, or a size such as '10MB'), else
    $SELFEXTEND_MAX_INPUT, else DEFAULT_MAX_INPUT."""
    from ..planning import parse_size

    if value is None:
        value = os.environ.get(ENV_MAX_INPUT) or DEFAULT_MAX_INPUT
        what = ENV_MAX_INPUT
    else:
        what = "--max-input"
    return value if isinstance(value, int) and value > 0 else parse_size(str(value), what)


# What a terminal acts on rather than shows: C0 controls but tab (escape sequences, clear
# screen, OSC titles and clipboard writes start with ESC; a newline breaks one-line messages),
# DEL, C1 controls (0x9b is a one-character CSI) and the bidirectional overrides.
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def for_terminal(text: str) -> str:
    """`text` from a document or a file name made safe to print: every character a terminal
    would act on is shown as its escape (\\x1b, \\n, \\u202e). The one helper for this."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def display_name(path: str) -> str:
    """A file name as text that any tokenizer and terminal take: bytes that are not UTF-8
    (which Python keeps as lone surrogates) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace") if path != STDIN else "stdin"


def read_document(path: str, stdin: Optional[BinaryIO] = None, max_bytes=None) -> Document:
    """Read one document; `-` reads standard input (or `stdin` when given). `max_bytes`: the
    input limit (see max_input_bytes)."""
    limit = max_input_bytes(max_bytes)
    name = display_name(path)
    if path == STDIN:
        data = _read_stream(stdin if stdin is not None else sys.stdin.buffer, name, limit)
        suffix = ""
    else:
        data = _read_file(Path(path), name, limit)
        suffix = Path(path).suffix.lower()
    document = parse_document(name, data, suffix, max_chars=limit)
    if not document.text.strip():
        what = "has no extractable text (a scanned PDF needs OCR first)" if document.format == "pdf" else "is empty"
        raise DocumentError(f"{name} {what}")
    return document


def read_text(stream: BinaryIO, name: str = "stdin", max_bytes=None) -> str:
    """Plain text from a stream (a prompt piped in), held to the input limit and decoded as
    documents are; no format detection."""
    return decode_text(name, _read_stream(stream, name, max_input_bytes(max_bytes)))


def read_line(stream: BinaryIO, name: str, max_bytes=None) -> Optional[bytes]:
    """One line of a stream (a chat's question), newline kept, held to the input limit like
    every text a user sends; None at the end of the stream."""
    limit = max_input_bytes(max_bytes)
    raw = stream.readline(limit + 1)
    if len(raw) > limit:
        raise DocumentError(f"a line of {name} is {_over(limit)}")
    return raw or None


def check_text_size(text: str, name: str, max_bytes=None) -> str:
    """`text` (typed or gathered from several lines), refused past the input limit."""
    limit = max_input_bytes(max_bytes)
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise DocumentError(f"{name} is {_over(limit)}")
    return text


def read_documents(paths: Iterable[str], stdin: Optional[BinaryIO] = None, max_bytes=None) -> list[Document]:
    """Read each document; the input limit applies to their sum."""
    paths = list(paths)
    if not paths:
        raise DocumentError("no document given: name a file, or - to read standard input")
    if paths.count(STDIN) > 1:
        raise DocumentError("standard input (-) can be read only once")
    limit = max_input_bytes(max_bytes)
    documents, used = [], 0
    for path in paths:
        if used >= limit:
            raise DocumentError(f"the documents up to {display_name(path)} are {_over(limit)}")
        document = read_document(path, stdin, max_bytes=limit - used)
        used += len(document.text.encode("utf-8", errors="replace"))
        documents.append(document)
    return documents


def _over(limit: int) -> str:
    from ..planning import format_bytes

    return (
        f"over the input limit of {format_bytes(limit)}; raise it with --max-input or "
        f"${ENV_MAX_INPUT} (e.g. 50MB) if you mean it"
    )


def parse_document(name: str, data: bytes, suffix: str = "", max_chars: Optional[int] = None) -> Document:
    """Bytes to text, choosing the reader from the content first and the file name second."""
    if data.startswith(b"%PDF-"):
        return Document(name, _pdf_text(name, data, max_chars), "pdf")
    text = decode_text(name, data)
    if suffix in HTML_SUFFIXES or _looks_like_html(text):
        return Document(name, html_to_text(text), "html")
    return Document(name, text, "markdown" if suffix in MARKDOWN_SUFFIXES else "text")


def _read_file(path: Path, name: str, limit: int) -> bytes:
    """A file's bytes; a regular file's size is checked before anything is read, anything
    else (a pipe, /dev/zero) is read up to the limit."""
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return _read_fifo(path, name, limit)
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError
            if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                from ..planning import format_bytes

                raise DocumentError(f"{name} is {format_bytes(info.st_size)}, {_over(limit)}")
            return _read_stream(file, name, limit)
    except FileNotFoundError:
        raise DocumentError(f"no such file: {name}") from None
    except IsADirectoryError:
        raise DocumentError(f"{name} is a directory; name the files inside it") from None
    except PermissionError:
        raise DocumentError(f"cannot read {name}: permission denied") from None
    except OSError as error:
        raise DocumentError(f"cannot read {name}: {error.strerror or error}") from None


def _read_fifo(path: Path, name: str, limit: int) -> bytes:
    """A named pipe, opened without waiting for a writer (a plain open() waits forever when
    none comes): up to FIFO_WAIT_SECONDS for the first bytes, then read as any pipe."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    deadline = time.monotonic() + FIFO_WAIT_SECONDS
    try:
        while True:
            try:
                first = os.read(fd, _CHUNK)
            except BlockingIOError:  # a writer is there: its bytes are coming
                first = b""
                break
            if first or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # no writer yet (or one that left without writing)
        if not first and time.monotonic() > deadline:
            raise DocumentError(f"nothing was written to the named pipe {name} in {FIFO_WAIT_SECONDS:.0f} s")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return _read_stream(io.BufferedReader(_Prefixed(first, stream)), name, limit)
    finally:
        os.close(fd)


class _Prefixed(io.RawIOBase):
    """A stream of `first`, then the rest of `stream`."""

    def __init__(self, first: bytes, stream):
        self.first, self.stream = first, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.first[: len(buffer)] if self.first else self.stream.read(len(buffer))
        self.first = self.first[len(data) :] if self.first else b""
        buffer[: len(data)] = data
        return len(data)


def _read_stream(stream: BinaryIO, name: str, limit: int) -> bytes:
    """At most `limit` bytes, refusing more; binary data is refused from its first bytes, so
    an endless device (/dev/zero, /dev/urandom) is turned away at once."""
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        if size == 0:
            _refuse_binary(name, chunk[:_SNIFF])
        chunks.append(chunk)
        size += len(chunk)
    raise DocumentError(f"{name} is {_over(limit)}")


def _refuse_binary(name: str, head: bytes) -> None:
    """NUL bytes mean binary data, except in UTF-16/32 text (a BOM says so) and in PDFs."""
    if head.startswith(b"%PDF-") or any(head.startswith(bom) for bom, _ in _BOMS):
        return
    if b"\x00" in head:
        raise DocumentError(f"{name} looks like a binary file, not text (it contains NUL bytes)")


def decode_text(name: str, data: bytes) -> str:
    """UTF-8 (or a BOM's encoding) when it fits; else Windows-1252 (a superset of Latin-1's
    text) when the result reads as a Western European language; else the encoding
    charset_normalizer detects. Binary data is refused."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _checked_text(name, data.decode(encoding))
            except UnicodeDecodeError:
                raise DocumentError(
                    f"{name} starts with a {encoding} byte-order mark but is not valid {encoding}"
                ) from None
    if b"\x00" in data:
        raise DocumentError(f"{name} looks like a binary file, not text (it contains NUL bytes)")
    try:
        return _checked_text(name, data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    try:
        western = data.decode("cp1252")
    except UnicodeDecodeError:  # bytes cp1252 leaves undefined: another code page
        western = None
    # Detectors guess wildly on short texts (a Latin-1 "café était" came out as mac_latin2),
    # so the common case is tried first and the detector decides only against it.
    if western is not None and reads_as_western(western):
        return _checked_text(name, western)
    from charset_normalizer import from_bytes

    guess = from_bytes(data).best()
    if guess is None and western is None:
        raise DocumentError(
            f"cannot tell the text encoding of {name}: it is not UTF-8 and no other encoding fits; "
            "convert it to UTF-8 (for example with iconv)"
        )
    return _checked_text(name, str(guess) if guess is not None else western)


def reads_as_western(text: str) -> bool:
    """Whether text decoded as Windows-1252 reads like a Western European language: accented
    letters inside mostly ASCII words, no symbols in the middle of a word. Another code page
    read as cp1252 gives words made only of accented letters (Cyrillic, Greek: "Ïðèâåò") or
    symbols inside words (Polish "ł" and "ą" as "³" and "¹": "Za¿ó³æ")."""
    words = foreign = inside = 0
    for token in text.split():
        core = token.strip(_EDGE_PUNCTUATION)
        letters = [ch for ch in core if ch.isalpha()]
        if len(letters) >= 3:
            words += 1
            foreign += all(not ch.isascii() for ch in letters)
        for left, ch, right in zip(core, core[1:], core[2:]):
            if not ch.isascii() and not ch.isalpha() and ch not in _IN_WORD and left.isalpha() and right.isalpha():
                inside += 1
    return foreign <= words // 20 and inside <= words // 50


_EDGE_PUNCTUATION = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum()) + "«»„“”‘’‚¡¿…–—•·"
_IN_WORD = "’‘·\u00ad–—"  # apostrophes, the Catalan middle dot, soft hyphen and dashes join words


def _checked_text(name: str, text: str) -> str:
    if _control_ratio(text) > 0.05:
        raise DocumentError(f"{name} looks like a binary file, not text")
    return _normalize_newlines(text)


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _control_ratio(text: str) -> float:
    sample = text[:_SNIFF]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\n\r\t\f\v\x1b")
    return controls / max(len(sample), 1)


# What starts an HTML page, possibly after an XML declaration and comments.
_HTML_START = re.compile(
    r"(?:\s|<\?xml[^>]*>|<!--.*?-->)*<(?:!doctype\s+html|html|head|body|meta|title)\b", re.I | re.S
)


def _looks_like_html(text: str) -> bool:
    return _HTML_START.match(text[:_SNIFF]) is not None


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


class _TextExtractor:
    """The parser's target: gathers the text, a line break at each block's start and end."""

    def __init__(self):
        self.parts: list[str] = []
        self.skipping = 0

    def start(self, tag, attrib):
        if tag in _SKIPPED:
            self.skipping += 1
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def end(self, tag):
        if tag in _SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n")

    def data(self, data):
        if not self.skipping:
            self.parts.append(data)

    def close(self) -> str:
        return "".join(self.parts)


def _parse_html(html: str) -> str:
    """The text of an HTML page, by libxml2's HTML parser (through lxml, events only, no tree):
    linear in its input however broken (the standard library's parser takes quadratic time on
    unclosed tags: 54 s for 60 KB of '<a '), and as forgiving as a browser."""
    from lxml import etree

    parser = etree.HTMLParser(target=_TextExtractor(), recover=True, no_network=True, huge_tree=True)
    parser.feed(html.encode("utf-8", "replace").decode("utf-8"))  # a lone surrogate becomes '?'
    return parser.close()


def html_to_text(html: str) -> str:
    lines = (" ".join(line.split()) for line in _parse_html(html).split("\n"))
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


def _pdf_text(name: str, data: bytes, max_chars: Optional[int] = None) -> str:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf warns about harmless quirks on stderr
    pages, total = [], 0
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _decrypts_without_password(reader):
            raise DocumentError(f"{name} is an encrypted PDF; decrypt it first")
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            total += len(text)
            if max_chars is not None and total > max_chars:
                raise DocumentError(f"the text of {name} is {_over(max_chars)}")
            if text:
                pages.append(text)
    except DocumentError:
        raise
    except RecursionError:
        raise DocumentError(f"cannot read PDF {name}: its objects refer to each other in a loop") from None
    except Exception as error:  # hostile files make pypdf raise nearly anything (LimitReachedError for bombs)
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        raise DocumentError(
            f"cannot read PDF {name}: {type(error).__name__}{': ' + detail if detail else ''}"
        ) from None
    return "\n\n".join(pages)


def _decrypts_without_password(reader) -> bool:
    try:
        return bool(reader.decrypt(""))
    except Exception:  # pypdf raises its own types, or needs `cryptography` for AES
        return False


def format_documents(documents: list[Document]) -> str:
    """The documents as they go into the prompt, each marked with its name."""
    return "\n\n".join(f'<document name="{doc.name}">\n{doc.text.strip()}\n</document>' for doc in documents)
