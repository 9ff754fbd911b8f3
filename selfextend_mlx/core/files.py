"""Writing a file so that a reader sees the old one or the whole new one, never a part of it."""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: Path, suffix: str = "") -> Iterator[str]:
    """Yield the name of a temporary file in `path`'s folder for the caller to write; when the
    block ends it replaces `path` in one rename. Whatever stops the block (an error, Ctrl-C, the
    SystemExit of a signal handler) removes the temporary file. Temporary names start with
    `.{path.name}.`, so a store can sweep the ones a SIGKILL left behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
