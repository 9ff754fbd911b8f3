"""`selfextend bench`: plain vs SelfExtend vs the reference-style baseline, in one run."""

import json
import sys
from typing import Annotated, Optional

import typer

from .common import GroupSizeOpt, ModelOpt, WindowOpt, status


def _lengths(text: str) -> list:
    """'1k,2k,8k' or '1024,2048': k means 1024 tokens."""
    lengths = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        number, scale = (part[:-1], 1024) if part.endswith("k") else (part, 1)
        try:
            lengths.append(int(float(number) * scale))
        except ValueError:
            lengths = []
            break
    if not lengths or min(lengths) < 2:
        raise typer.BadParameter(f"{text!r}: give token counts like 1k,2k,4k or 1024,2048", param_hint="--lengths")
    return lengths


def bench(
    model: ModelOpt = None,
    lengths: Annotated[
        str, typer.Option("--lengths", "-l", help="Context lengths to measure, e.g. 1k,2k,4k,8k.")
    ] = "1k,2k,4k",
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    modes: Annotated[
        str, typer.Option(help="Which of plain, selfextend, reference to run.")
    ] = "plain,selfextend,reference",
    decode_steps: Annotated[int, typer.Option(min=1, help="Decode steps timed at each length.")] = 16,
    prefill_step_size: Annotated[int, typer.Option(min=1, help="Tokens per prefill step.")] = 512,
    repeats: Annotated[
        int, typer.Option(min=1, help="Alternate the modes this many times and keep each one's best.")
    ] = 1,
    dtype: Annotated[
        Optional[str], typer.Option(help="float32, float16, bfloat16 or native (default: float32 on CPU).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list of rows instead of a table.")] = False,
):
    """Measure prefill and decode speed, peak memory and KV-cache size at each length.

    Plain attention, SelfExtend and a reference-style SelfExtend (dense two-matrix attention
    that re-rotates the whole key cache at every step, as the authors' code does) run in the
    same process on the same random tokens, so the ratios between them are fair.

    Example:

        selfextend bench --model stories260K -l 2k,4k,8k -G 8 -W 128
    """
    import mlx.core as mx

    from selfextend_mlx.errors import SettingsError
    from selfextend_mlx.evaluation.bench import MODES, run_bench
    from selfextend_mlx.loading.device import describe_runtime
    from selfextend_mlx.loading.load import load
    from selfextend_mlx.planning import choose_settings

    sizes = _lengths(lengths)
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown mode {', '.join(unknown) or modes!r}; choose from {', '.join(MODES)}", param_hint="--modes"
        )
    loaded, tokenizer = load(model, selfextend=False, dtype=dtype)
    info = loaded.model_info
    settings = choose_settings(info.limits, max(sizes), group_size=group_size, window=window)
    if settings.plain:  # the lengths fit the model: measure SelfExtend at the registry's G all the same
        settings = choose_settings(info.limits, None, group_size=group_size, window=window)
    config = settings.config()
    if config is None:
        raise SettingsError("group size G=1 is the plain model; give -G 2 or more")
    if config.window >= min(sizes):
        raise SettingsError(
            f"window W={config.window} is not below the shortest length {min(sizes)}: SelfExtend would be the "
            "plain model there; give a smaller -W or longer --lengths"
        )
    vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 256
    tokens = mx.random.randint(0, vocab, (max(sizes),), key=mx.random.key(0))
    if not json_output:
        status(
            f"{info.model_id} | {describe_runtime(dtype)} | G={config.group_size} W={config.window} "
            f"| trained context {info.trained_context}"
        )
        print(
            f"{'length':>8} {'mode':>10} {'prefill tok/s':>14} {'decode tok/s':>13} "
            f"{'peak memory':>12} {'KV cache':>10}"
        )

    def show(row):
        if not json_output:
            print(
                f"{row.length:>8} {row.mode:>10} {row.prefill_tps:>14.1f} {row.decode_tps:>13.2f} "
                f"{row.peak_memory_bytes / 2**20:>10.1f}Mi {row.kv_cache_bytes / 2**20:>8.1f}Mi",
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
    )
    if json_output:
        print(json.dumps([row.as_dict() for row in rows]))
        return
    by = {(r.length, r.mode): r for r in rows}
    if "plain" in chosen and "selfextend" in chosen:
        print("\nratios (SelfExtend / plain: time, peak memory, KV bytes; reference / SelfExtend decode time)")
        for length in sizes:
            p, s = by[(length, "plain")], by[(length, "selfextend")]
            line = (
                f"{length:>8}  decode {p.decode_tps / s.decode_tps:5.2f}x  "
                f"prefill {p.prefill_tps / s.prefill_tps:5.2f}x  "
                f"peak {s.peak_memory_bytes / p.peak_memory_bytes:5.2f}x  "
                f"KV {s.kv_cache_bytes / p.kv_cache_bytes:5.2f}x"
            )
            if (length, "reference") in by:
                r = by[(length, "reference")]
                line += f"  | reference decode {s.decode_tps / r.decode_tps:5.2f}x slower than SelfExtend"
            print(line)
    sys.stdout.flush()


def selftest(
    keys: Annotated[int, typer.Option(min=2, help="Context length of the check.")] = 4096,
    json_output: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
):
    """Check the fast attention paths of this machine against the plain-MLX reference.

    On a Mac this runs the Metal kernel (decode and prefill); everywhere it runs the fused
    prefill path.
    Each check prints the largest difference from the reference and both timings.

    Example:

        selfextend selftest --keys 8192
    """
    from dataclasses import asdict

    from selfextend_mlx.evaluation.selftest import run_selftest
    from selfextend_mlx.loading.device import describe_runtime

    checks = run_selftest(n_keys=keys)
    if json_output:
        print(json.dumps([{**asdict(c), "ok": c.ok} for c in checks]))
    else:
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
    app.command(name="bench")(bench)
    app.command(name="selftest")(selftest)
