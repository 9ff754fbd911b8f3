"""What a path is when it is not a regular file or a folder: said before anything opens it
(a FIFO no one writes to would block a reader forever)."""

import stat
from pathlib import Path
from typing import Optional


def special_kind(path: Path) -> Optional[str]:
    """What a path that is neither a regular file nor a folder is ('a FIFO', ...), else None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling link" if path.is_symlink() else None
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    for test, kind in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return None
