"""`selfextend models` (the registry and the models on this machine), `selfextend info MODEL`
(settings, reach, memory) and `selfextend pull HUB_ID` (the one command that downloads)."""

import functools
import json
from typing import Optional

import typer

from selfextend_mlx.errors import SelfExtendError

from .common import Command
from .options import token_count


def register(app: typer.Typer) -> None:
    app.command("models", cls=Command)(_one_line_errors(models))
    app.command("info", cls=Command)(_one_line_errors(info))
    app.command("pull", cls=Command)(_one_line_errors(pull))


def _one_line_errors(command):
    """Errors a user can act on end as one line and exit 1, never as a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SelfExtendError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def models(
    as_json: bool = typer.Option(False, "--json", help="Print the registry (with --local: the local models) as JSON."),
    local: bool = typer.Option(False, "--local", help="Only the models found on this machine."),
):
    """List the models the registry knows, with their SelfExtend settings (G, W) and reach,
    then the models found on this machine.

    SOURCE is what loads: a file from an installed package or a local path when the entry
    has one, else the Hugging Face repo. Add your own entries with a registry file named by
    $SELFEXTEND_MODELS; $SELFEXTEND_MODEL picks the default.

    Models on this machine come from the Hugging Face cache, LM Studio's models folders,
    Ollama's store and ./models; NAME is what `-m` takes (ollama:NAME:TAG, lmstudio:NAME, a
    Hub id, a path). Nothing is downloaded; `selfextend pull HUB_ID` does that.

    Examples:

    \b
        selfextend models
        selfextend models --json
        selfextend models --local --json
    """
    if local:
        _local_table(as_json)
        return
    from selfextend_mlx.loading.registry import entries
    from selfextend_mlx.loading.resolve import is_available_locally, reference
    from selfextend_mlx.planning import fill_reach, largest_reach

    default = reference(None).lower()
    rows = []
    for entry in entries():
        rows.append(
            {
                "name": entry.name,
                "default": default in (entry.name.lower(), entry.repo.lower()),
                "family": entry.family,
                "trained_context": entry.trained_context,
                "effective_context": entry.limits.effective_context,
                "group_size": entry.group_size,
                "window": entry.window,
                "max_group_size": entry.max_group_size,
                # planning's two reaches: grouped positions inside the effective context (read
                # as well as an input that fits), and the most any G allows (within L)
                "reach": fill_reach(entry.limits),
                "max_length": largest_reach(entry.limits),
                "local": is_available_locally(entry.name),
                "repo": entry.repo,
                "source": _source(entry),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    header = ("NAME", "FAMILY", "L", "EFFECTIVE", "W", "G_MAX", "REACH", "LARGEST", "LOCAL", "SOURCE")
    table = [
        (
            row["name"] + (" *" if row["default"] else ""),
            row["family"],
            str(row["trained_context"]),
            str(row["effective_context"] or "-"),
            str(row["window"]),
            str(row["max_group_size"]),
            str(row["reach"]),
            str(row["max_length"]),
            "yes" if row["local"] else "no",
            row["source"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *table)) for i in range(len(header))]
    for line in (header, *table):
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    typer.echo(
        "\n* the default model. REACH: the most tokens read with grouped positions inside the effective "
        "context, (EFFECTIVE - W) x G_MAX + W;\nLARGEST: the most any G allows, (L - W) x G_MAX + W. "
        "`selfextend info NAME --tokens N` shows the settings for an input of N tokens."
    )
    typer.echo("")
    _local_table(False)


def _local_table(as_json: bool) -> None:
    """The models found on this machine (selfextend_mlx.loading.discover)."""
    from selfextend_mlx.loading.discover import describe_local, local_models
    from selfextend_mlx.planning import format_bytes

    rows = [describe_local(model) for model in local_models()]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not rows:
        typer.echo("No models found on this machine (Hugging Face cache, LM Studio, Ollama, ./models).")
        return
    header = ("ON THIS MACHINE", "SIZE", "FAMILY", "QUANT", "L", "REACH")
    table = [
        (
            row["name"],
            format_bytes(row["size"]),
            row["family"] or "?",
            row["quantization"] or "?",
            str(row["trained_context"] or "?"),
            str(row["reach"] or "?") if not row["error"] else f"unreadable: {row['error'][:60]}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (header, *table)) for i in range(len(header))]
    for line in (header, *table):
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _source(entry) -> str:
    """What `--model NAME` loads: the package's file or the entry's path before the Hub repo."""
    from selfextend_mlx.loading.resolve import package_file

    if entry.path:
        return entry.path
    if entry.package and package_file(entry.package) is not None:
        return f"package {entry.package}"
    return entry.repo


def info(
    model: Optional[str] = typer.Argument(
        None,
        help="A registry name, a local folder, a .gguf file or a Hugging Face repo id (default: the default model).",
    ),
    tokens: Optional[int] = typer.Option(
        None,
        "--tokens",
        parser=token_count,
        metavar="N",
        help="Input plus answer length to plan for, e.g. 20000 or 16k (picks G; default: the registry's G).",
        show_default=False,
    ),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", "-G", min=1, metavar="G", help="Use this G instead.", show_default=False
    ),
    window: Optional[int] = typer.Option(
        None, "--window", "-W", min=1, metavar="W", help="Use this W instead.", show_default=False
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        metavar="DTYPE",
        help="Compute dtype to size the KV cache for (default: fp32 on CPU).",
        show_default=False,
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Show a model's family, trained context, SelfExtend G and W, reach, and KV-cache memory.

    Reads the registry or the model's config only: no weights are loaded.

    Examples:

    \b
        selfextend info
        selfextend info SmolLM2-135M-Instruct --tokens 16k
        selfextend info Llama-3-8B-Instruct --tokens 32k --dtype native --json
    """
    from selfextend_mlx.loading.device import DTYPES, describe_runtime, resolve_dtype
    from selfextend_mlx.loading.load import describe
    from selfextend_mlx.planning import ModelShape, choose_settings, format_bytes, kv_cache_bytes

    spec = describe(model)
    settings = choose_settings(spec.limits, tokens, group_size=group_size, window=window)
    dtype_name = resolve_dtype(dtype)
    item = 2 if DTYPES[dtype_name] is None else DTYPES[dtype_name].size  # native: fp16/bf16 activations
    shape = ModelShape(
        layers=spec.shape.layers, kv_heads=spec.shape.kv_heads, head_dim=spec.shape.head_dim, item_bytes=item
    )
    at = tokens or settings.reach
    record = {
        "model": spec.name,
        "family": spec.family,
        "trained_context": spec.trained_context,
        "effective_context": spec.limits.effective_context,
        "method": settings.method,
        "group_size": settings.group_size,
        "window": settings.window,
        "settings": settings.reason,
        "max_group_size": spec.limits.max_group_size,
        "max_length": settings.reach,
        "tokens": at,
        "fits": at <= settings.reach,
        "kv_cache_bytes": kv_cache_bytes(shape, at, settings),
        "weights_bytes": _gguf_weights_bytes(spec, dtype_name),
        "dtype": dtype_name,
        "runtime": describe_runtime(dtype_name),
        "local": spec.available,
        "path": spec.location,
        "weights": spec.location if spec.available else (spec.entry.repo if spec.entry else spec.name),
        "repo": spec.entry.repo if spec.entry else None,
        "notes": spec.entry.notes if spec.entry else None,
    }
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    lines = [
        ("model", spec.name),
        ("family", spec.family),
        ("trained context", f"{spec.trained_context} tokens (L)"),
        ("effective", _effective(spec.limits)),
        ("SelfExtend", f"{settings.describe()} (G at most {record['max_group_size']})"),
        ("reach", f"N_max {settings.formula()} tokens"),
        (
            "KV cache",
            f"{format_bytes(record['kv_cache_bytes'])} at {at} tokens ({dtype_name}, "
            f"{shape.layers} layers x {shape.kv_heads} kv heads x {shape.head_dim})",
        ),
        (
            "weights",
            spec.location if spec.available else f"{record['weights']} (not here: selfextend pull {record['weights']})",
        ),
        *(
            [("weights memory", f"{format_bytes(record['weights_bytes'])} held ({dtype_name}, from the GGUF header)")]
            if record["weights_bytes"]
            else []
        ),
        ("runtime", record["runtime"]),
    ]
    if spec.entry and not (spec.available and _loads_from_elsewhere(spec.entry)):
        lines.insert(1, ("repo", spec.entry.repo))
    elif spec.entry:
        lines.insert(len(lines) - 1, ("Hub repo", f"{spec.entry.repo} (used only if the weights above are missing)"))
    if tokens and tokens > settings.reach:
        lines.append(("warning", f"{tokens} tokens are beyond the reach of {settings.describe()}"))
    if spec.entry and spec.entry.notes:
        lines.append(("notes", " ".join(spec.entry.notes.split())))
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        typer.echo(f"{key.ljust(width)}  {value}")


def _gguf_weights_bytes(spec, dtype_name: str) -> Optional[int]:
    """What a local GGUF file's weights take once held in `dtype_name` (None: not a GGUF file)."""
    from pathlib import Path

    from selfextend_mlx.loading.device import DTYPES
    from selfextend_mlx.loading.gguf import memory_needed, read_header

    if not spec.location or not Path(spec.location).is_file():
        return None
    return memory_needed(read_header(spec.location), DTYPES[dtype_name])


def _loads_from_elsewhere(entry) -> bool:
    """Whether a local entry's weights are its package file or path rather than its Hub repo."""
    return bool(entry.path or entry.package)


def pull(
    repo: str = typer.Argument(..., metavar="HUB_ID", help="A Hugging Face repo id (owner/name)."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Also download the repo's Python files (they run only with this flag)."
    ),
):
    """Download a model from the Hugging Face Hub into its cache, with a progress bar.

    The one command that downloads: `-m` and `selfextend models` use what is already here.

    Examples:

    \b
        selfextend pull mlx-community/SmolLM2-135M-Instruct-8bit
    """
    from selfextend_mlx.errors import ModelNotFoundError
    from selfextend_mlx.loading.hub import hub_snapshot
    from selfextend_mlx.loading.resolve import looks_like_repo_id

    if not looks_like_repo_id(repo):
        raise ModelNotFoundError(f"{repo!r} is not a Hugging Face repo id (owner/name)")
    folder = hub_snapshot(repo, download=True, trust_remote_code=trust_remote_code)
    typer.echo(f"{repo}: {folder}")


def _effective(limits) -> str:
    if limits.effective_context and limits.effective_context < limits.trained_context:
        return f"{limits.effective_context} tokens (the registry: where the plain model stops working)"
    return "the trained context (the registry gives no smaller one)"
