"""`selfextend cache list|rm|clear`: the saved document prompt caches."""

import sys
import time
from typing import Annotated

import typer

from .options import CacheDirOpt, JsonOpt
from .output import print_json

cache_app = typer.Typer(
    help="List or remove the document cache: documents already read into a model's KV cache, "
    "kept so the next chat, ask or summarize about them starts at once.\n\n"
    "Examples:\n\n\b\n    selfextend cache list\n    selfextend cache rm 3fa2b1c4\n    selfextend cache clear --yes",
    no_args_is_help=True,
)

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")]


def for_terminal(text) -> str:
    """Document names and folders as the terminal may show them (documents.for_terminal)."""
    from selfextend_mlx.app.documents import for_terminal as escape

    return escape(str(text))


def _store(cache_dir):
    from selfextend_mlx.app.doccache import DocumentCache

    return DocumentCache(cache_dir)


@cache_app.command("list")
def list_caches(cache_dir: CacheDirOpt = None, json_output: JsonOpt = False):
    """List the cached documents, newest first, with their sizes, the total and the limit.

    The limit is $SELFEXTEND_CACHE_MAX (default 10G); ask, chat, summarize and serve take
    --cache-max SIZE for one run, and each write evicts the least recently used entries past it.

    Example:

    \b
        selfextend cache list
        selfextend cache list --json
    """
    from selfextend_mlx.planning import format_bytes

    store = _store(cache_dir)
    entries = store.entries()
    total = sum(entry.size for entry in entries)
    if json_output:
        print_json(
            {
                "directory": str(store.directory),
                "count": len(entries),
                "total_bytes": total,
                "limit_bytes": store.max_bytes,
                "entries": [e.record() for e in entries],
            }
        )
        return
    limit = f"limit {format_bytes(store.max_bytes)}"
    if not entries:
        print(f"no cached documents in {for_terminal(store.directory)} ({limit})")
        return
    count = f"{len(entries)} cached document{'s' if len(entries) != 1 else ''}"
    print(f"{count}, {format_bytes(total)} ({limit}), in {for_terminal(store.directory)}:")
    for entry in entries:
        print("  " + _line(entry))
    print("remove one with `selfextend cache rm ID`, all with `selfextend cache clear`")


def _line(entry) -> str:
    from selfextend_mlx.planning import format_bytes

    meta = entry.metadata
    tokens = f"{meta['tokens']:,} tokens" if isinstance(meta.get("tokens"), int) else "? tokens"
    settings = (
        "plain" if meta.get("group_size") == 1 else f"G={meta.get('group_size', '?')} W={meta.get('window', '?')}"
    )
    if meta.get("kv_bits"):
        settings += f" kv{meta['kv_bits']}"
    old = "" if meta.get("store_format") == "2" else "  (old format: never reused)"
    return (
        f"{entry.id[:12]}  {format_bytes(entry.size):>9}  {tokens:>14}  {settings:<12} "
        f"{_age(time.time() - entry.modified):>4} ago  "
        f"{for_terminal(_model(meta.get('model_id')))}: {for_terminal(meta.get('documents', '?'))}{old}"
    )


@cache_app.command("rm")
def remove_cache(
    ids: Annotated[list[str], typer.Argument(metavar="ID", help="Entry ids as `cache list` shows them (4+ digits).")],
    cache_dir: CacheDirOpt = None,
):
    """Remove cached documents by id.

    Example:

    \b
        selfextend cache rm 3fa2b1c4
    """
    from selfextend_mlx.planning import format_bytes

    store = _store(cache_dir)
    for prefix in ids:
        entry = store.remove(prefix)
        documents = for_terminal(entry.metadata.get("documents", "?"))
        print(f"removed {entry.id[:12]} ({format_bytes(entry.size)}): {documents}")


@cache_app.command("clear")
def clear_caches(cache_dir: CacheDirOpt = None, yes: YesOpt = False):
    """Delete every cached document (they are rebuilt when next needed). Asks first, unless
    --yes; without a terminal to ask on, --yes is required.

    Example:

    \b
        selfextend cache clear --yes
    """
    from selfextend_mlx.app.doccache import DocumentCacheError
    from selfextend_mlx.planning import format_bytes

    store = _store(cache_dir)
    store.refuse_if_foreign()  # before asking anything
    entries = store.entries()
    if not yes and entries:
        size = format_bytes(sum(e.size for e in entries))
        what = f"{len(entries)} cached document(s), {size}, in {for_terminal(store.directory)}"
        if not _can_ask():
            raise DocumentCacheError(f"cache clear would remove {what}: confirm with --yes")
        if not typer.confirm(f"remove {what}?", default=False, err=True):
            print("nothing removed", file=sys.stderr)
            raise typer.Exit(1)
    count, size = store.clear()
    print(f"removed {count} cached document file(s) ({format_bytes(size)}) from {for_terminal(store.directory)}")


def _can_ask() -> bool:
    return sys.stdin.isatty()


def _model(model_id) -> str:
    from pathlib import Path

    text = str(model_id or "?")
    return Path(text).name if text.startswith("/") else text


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
