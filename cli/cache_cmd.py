"""`selfextend cache list|clear`: the saved document prompt caches."""

import time

import typer

from .common import CacheDirOpt, JsonOpt, print_json

cache_app = typer.Typer(
    help="List or clear the document cache: documents already read into a model's KV cache, "
    "kept so the next chat, ask or summarize about them starts at once.\n\n"
    "Examples:\n\n\b\n    selfextend cache list\n    selfextend cache clear",
    no_args_is_help=True,
)


def _store(cache_dir):
    from selfextend_mlx.app.doccache import DocumentCache

    return DocumentCache(cache_dir)


@cache_app.command("list")
def list_caches(cache_dir: CacheDirOpt = None, json_output: JsonOpt = False):
    """List the cached documents, newest first.

    Example:

    \b
        selfextend cache list
    """
    from selfextend_mlx.planning import format_bytes

    store = _store(cache_dir)
    entries = store.entries()
    if json_output:
        print_json(
            {
                "directory": str(store.directory),
                "entries": [
                    {"path": str(e.path), "bytes": e.size, "modified": e.modified, **e.metadata} for e in entries
                ],
            }
        )
        return
    if not entries:
        print(f"no cached documents in {store.directory}")
        return
    print(f"{len(entries)} cached document(s) in {store.directory}:")
    for entry in entries:
        meta = entry.metadata
        age = _age(time.time() - entry.modified)
        tokens = f"{int(meta['tokens']):,} tokens" if meta.get("tokens", "").isdigit() else "? tokens"
        print(
            f"  {entry.path.name[:12]}  {format_bytes(entry.size):>9}  {tokens:>14}  "
            f"G={meta.get('group_size', '?')} W={meta.get('window', '?')}  {age:>8} ago  "
            f"{meta.get('model_id', '?')}: {meta.get('documents', '?')}"
        )


@cache_app.command("clear")
def clear_caches(cache_dir: CacheDirOpt = None):
    """Delete every cached document (they are rebuilt when next needed).

    Example:

    \b
        selfextend cache clear
    """
    from selfextend_mlx.planning import format_bytes

    store = _store(cache_dir)
    count, size = store.clear()
    print(f"removed {count} cached document(s) ({format_bytes(size)}) from {store.directory}")


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f}{unit}"
    return f"{seconds:.0f}s"


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
