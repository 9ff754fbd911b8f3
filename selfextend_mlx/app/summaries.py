"""Part summaries kept on disk, so that a re-run of a long summary is quick."""

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from ..core.files import atomic_write


class SummaryMemo:
    """Part summaries by a key of everything that makes them (model and weights, part, request,
    sampling), as small JSON files in `folder`; unreadable or unwritable entries are simply
    recomputed (a notice says why)."""

    def __init__(self, folder: Optional[Path], notice: Callable[[str], None] = lambda message: None):
        self.folder, self.notice = folder, notice

    @staticmethod
    def key(*parts) -> str:
        digest = hashlib.sha256()
        for part in parts:
            digest.update(str(part).encode("utf-8", "surrogatepass") + b"\0")
        return digest.hexdigest()

    def get(self, key: str) -> Optional[str]:
        if self.folder is None:
            return None
        try:
            data = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        summary = data.get("summary") if isinstance(data, dict) and data.get("key") == key else None
        return summary or None  # an empty one (kept by an earlier version) is no summary

    def put(self, key: str, summary: str) -> None:
        if self.folder is None:
            return
        record = {"key": key, "summary": summary, "saved": time.time()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / f"{key}.json") as tmp:
                Path(tmp).write_text(json.dumps(record), encoding="utf-8")
        except OSError as error:
            self.notice(f"could not keep a part summary: {error.strerror or error}")
