"""`selfextend bench` (plain vs SelfExtend vs the reference-style baseline, in one run) and
`selfextend selftest` (this machine's fast attention paths against the reference).

Both check their arguments and the memory the run needs (planning's estimate, as chat does)
before allocating anything: a mistyped length is one error line, not a crash.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import PREFILL_STEP

from .common import Command
from .options import (
    GroupSizeOpt,
    ModelOpt,
    PrefillStepOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    token_count,
    token_counts,
)
from .output import status

MAX_DECODE_STEPS = 10_000
MAX_REPEATS = 100
SELFTEST_PREFILL = 128  # the selftest's query block (run_selftest's default)


def _lengths(value: str) -> list:
    try:
        lengths = token_counts(value)
    except typer.BadParameter as error:
        raise typer.BadParameter(error.message, param_hint="--lengths") from None
    if min(lengths) < 2:
        raise typer.BadParameter(f"{value!r}: every length must be at least 2 tokens", param_hint="--lengths")
    return lengths


def bench(
    model: ModelOpt = None,
    lengths: Annotated[
        str,
        typer.Option("--lengths", "-l", metavar="N,N,...", help="Context lengths to measure, e.g. 1k,2k,4k,8k."),
    ] = "1k,2k,4k",
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    modes: Annotated[
        str,
        typer.Option(
            metavar="MODE,...",
            help="Which of plain, selfextend, reference and the eval methods linear, ntk, yarn, string to run.",
        ),
    ] = "plain,selfextend,reference",
    decode_steps: Annotated[
        int, typer.Option(min=1, max=MAX_DECODE_STEPS, metavar="N", help="Decode steps timed at each length.")
    ] = 16,
    prefill_step_size: PrefillStepOpt = PREFILL_STEP,
    repeats: Annotated[
        int,
        typer.Option(
            min=1, max=MAX_REPEATS, metavar="N", help="Alternate the modes this many times and keep each one's best."
        ),
    ] = 1,
    dtype: Annotated[
        Optional[str],
        typer.Option(metavar="DTYPE", help="float32, float16, bfloat16 or native (default: float32 on CPU)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list of rows instead of a table.")] = False,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Draw prefill time and decode step time against length, one line per mode.",
            show_default=False,
        ),
    ] = None,
    recorded: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            metavar="ROWS.json",
            help="Measure nothing: read the rows of an earlier `bench --json` run (with --plot: draw them).",
            show_default=False,
        ),
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    quiet: QuietOpt = False,
):
    """Measure prefill and decode speed, peak memory and KV-cache size at each length.

    Plain attention, SelfExtend and a reference-style SelfExtend (dense two-matrix attention
    that re-rotates the whole key cache at every step, as the authors' code does) run in the
    same process on the same random tokens, so the ratios between them are fair. Without
    -G/-W, SelfExtend runs at the G planning picks for the longest length (the registry's G
    where the lengths fit the model). The eval methods (linear, ntk, yarn, string) run as
    `selfextend eval --methods` sets them up for each length: the plain model where they fit.

    Examples:

    \b
        selfextend bench -l 1k,2k --decode-steps 8
        selfextend bench -l 2k --modes plain,selfextend -G 4 -W 512 --json
        selfextend bench -l 16k --modes plain,selfextend,yarn,string --decode-steps 4
        selfextend bench --from docs/results/bench_2026-12-04_stories260k.json --plot bench.png
    """
    from selfextend_mlx.errors import EvaluationError

    from .eval_cmd import _check_plot_path

    _check_plot_path(plot)
    if recorded is not None:
        if not (plot or json_output):
            raise EvaluationError("--from reads recorded rows to draw or print: add --plot FILE.png or --json")
        rows = read_bench_rows(recorded)
        if json_output:
            print(json.dumps(rows))
        if plot:
            _plot_rows(rows, plot, quiet, recorded.stem)
        return
    import mlx.core as mx

    from selfextend_mlx.evaluation.bench import MODES, run_bench
    from selfextend_mlx.loading.device import describe_runtime
    from selfextend_mlx.loading.load import load
    from selfextend_mlx.planning import bench_settings, check_memory, format_bytes, modes_memory, plain_settings

    sizes = _lengths(lengths)
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown mode {', '.join(unknown) or modes!r}; choose from {', '.join(MODES)}", param_hint="--modes"
        )
    if prefill_step_size > max(sizes):
        prefill_step_size = max(sizes)
    loaded, tokenizer = load(model, selfextend=False, dtype=dtype, trust_remote_code=trust_remote_code)
    info = loaded.model_info
    settings = bench_settings(info.limits, sizes, group_size, window) if set(chosen) - {"plain"} else None
    config = settings.config() if settings else None
    per_mode = [settings if mode == "selfextend" else plain_settings(max(sizes)) for mode in chosen]
    # every mode's cache stays alive through the interleaved decode: their KV caches add up
    check_memory(modes_memory(info, max(sizes), per_mode, None, prefill_step_size, together=True))
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 256
    tokens = mx.random.randint(0, vocab, (max(sizes),), key=mx.random.key(0))
    described = f"G={config.group_size} W={config.window}" if config else "plain attention only"
    if not quiet:
        status(f"{info.model_id} | {describe_runtime(dtype)} | {described} | trained context {info.trained_context}")
    if not json_output:
        print(
            f"{'length':>8} {'mode':>10} {'prefill tok/s':>14} {'decode tok/s':>13} "
            f"{'peak memory':>12} {'KV cache':>10}"
        )

    def show(row):
        if not json_output:
            print(
                f"{row.length:>8} {row.mode:>10} {row.prefill_tps:>14.1f} {row.decode_tps:>13.2f} "
                f"{format_bytes(row.peak_memory_bytes):>12} {format_bytes(row.kv_cache_bytes):>10}",
                flush=True,
            )

    rows = run_bench(
        loaded,
        tokens,
        sizes,
        config,
        modes=chosen,
        decode_steps=decode_steps,
        prefill_step=prefill_step_size,
        repeats=repeats,
        on_row=show,
        trained_context=info.trained_context,
    )
    if plot:
        _plot_rows([row.as_dict() for row in rows], plot, quiet, f"{Path(info.model_id).name}, {described}")
    if json_output:
        print(json.dumps([row.as_dict() for row in rows]))
        return
    _print_ratios({(r.length, r.mode): r for r in rows}, sizes, chosen)
    sys.stdout.flush()


def _print_ratios(by: dict, sizes: list, modes: list) -> None:
    """Each mode against plain in the same run (time, peak memory, KV bytes), and the
    reference baseline against SelfExtend."""
    others = [mode for mode in modes if mode not in ("plain", "reference")]
    if "plain" not in modes or not others:
        return
    print("\nratios against plain (time, peak memory, KV bytes; reference / SelfExtend decode time)")
    for length in sizes:
        p = by[(length, "plain")]
        for mode in others:
            m = by[(length, mode)]
            line = (
                f"{length:>8} {mode:>10}  decode {p.decode_tps / m.decode_tps:5.2f}x  "
                f"prefill {p.prefill_tps / m.prefill_tps:5.2f}x  "
                f"peak {m.peak_memory_bytes / p.peak_memory_bytes:5.2f}x  "
                f"KV {m.kv_cache_bytes / p.kv_cache_bytes:5.2f}x"
            )
            if mode == "selfextend" and (length, "reference") in by:
                r = by[(length, "reference")]
                line += f"  | reference decode {m.decode_tps / r.decode_tps:5.2f}x slower than SelfExtend"
            print(line)


ROW_FIELDS = {"length": int, "mode": str, "prefill_tps": (int, float), "decode_tps": (int, float)}


def read_bench_rows(path: Path) -> list:
    """The rows of a `selfextend bench --json` run, checked: a list of objects, each with a
    length, a mode and positive prefill and decode speeds."""
    from selfextend_mlx.errors import EvaluationError

    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvaluationError(f"--from {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvaluationError(f"--from {path}: not the JSON of `selfextend bench --json` ({error})") from None
    if not isinstance(rows, list) or not rows or not all(_is_row(row) for row in rows):
        raise EvaluationError(
            f"--from {path}: not the rows of `selfextend bench --json` (a list of objects with a length, a mode "
            "and positive prefill_tps and decode_tps)"
        )
    return rows


def _is_row(row) -> bool:
    if not isinstance(row, dict):
        return False
    typed = all(
        isinstance(row.get(name), kind) and not isinstance(row.get(name), bool) for name, kind in ROW_FIELDS.items()
    )
    return typed and row["length"] > 0 and row["prefill_tps"] > 0 and row["decode_tps"] > 0


def _plot_rows(rows: list, plot: Path, quiet: bool, what: str = "") -> None:
    from selfextend_mlx.evaluation.plots import plot_bench

    from .eval_cmd import _wrote_plot

    title = "Prefill and decode time" + (f" ({what})" if what else "")
    plot_bench(rows, plot, title=title)
    _wrote_plot(plot, quiet)


def selftest(
    keys: Annotated[
        int,
        typer.Option(
            parser=token_count,
            metavar="N",
            help=f"Context length of the check (e.g. 8k): {2 * SELFTEST_PREFILL} or more, as memory allows.",
        ),
    ] = 4096,
    json_output: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
    quiet: QuietOpt = False,
):
    """Check the fast attention paths of this machine against the plain-MLX reference.

    On a Mac this runs the Metal kernel (decode and prefill); everywhere it runs the fused
    prefill path. Each check prints the largest difference from the reference and both
    timings; a mismatch exits 1.

    Example:

    \b
        selfextend selftest --keys 8k
    """
    from dataclasses import asdict

    from selfextend_mlx.errors import SettingsError
    from selfextend_mlx.evaluation.selftest import run_selftest
    from selfextend_mlx.loading.device import describe_runtime

    if keys < 2 * SELFTEST_PREFILL:
        raise SettingsError(f"--keys {keys}: give at least {2 * SELFTEST_PREFILL} keys")
    checks = run_selftest(n_keys=keys)
    if json_output:
        print(json.dumps([{**asdict(c), "ok": c.ok} for c in checks]))
    else:
        if not quiet:
            status(describe_runtime())
        for c in checks:
            if c.max_error is None:
                print(f"{c.name:28s} skipped: {c.note} (reference {c.reference_ms:.2f} ms)")
            elif c.fast_ms is None:
                print(f"{c.name:28s} FAILED  {c.note}")
            else:
                verdict = "OK" if c.ok else "MISMATCH"
                print(
                    f"{c.name:28s} {verdict}  max |diff| {c.max_error:.2e}  reference {c.reference_ms:.2f} ms  "
                    f"fast {c.fast_ms:.2f} ms  ({c.reference_ms / c.fast_ms:.2f}x)"
                )
    if any(c.max_error is not None and not c.ok for c in checks):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(name="bench", cls=Command)(bench)
    app.command(name="selftest", cls=Command)(selftest)
