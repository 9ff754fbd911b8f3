"""`selfextend eval`: perplexity, passkey and needle-in-a-haystack, plain vs SelfExtend."""

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.errors import EvaluationError

from .common import (
    GroupSizeOpt,
    KvBitsOpt,
    ModelOpt,
    ProgressBar,
    ProgressOpt,
    WindowOpt,
    print_json,
    show_status,
    status,
)

eval_app = typer.Typer(
    help="Measure a model on long inputs: perplexity by position, passkey and needle retrieval, "
    "plain vs SelfExtend. Every command has --json (stdout), a progress bar (stderr) and --plot FILE.png.",
    no_args_is_help=True,
)

CompareOpt = Annotated[bool, typer.Option("--compare", help="Run plain and SelfExtend in one run, on the same inputs.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Run only the plain model (no SelfExtend).")]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        help="Compute dtype: float32, float16, bfloat16 or native (keep quantized weights). "
        "Default: float32 on CPU, native on a GPU.",
        show_default=False,
    ),
]
ChunkOpt = Annotated[int, typer.Option("--chunk-size", min=1, help="Tokens fed to the model at once (bounds memory).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option("--plot", help="Write a PNG plot of the result to this file.", show_default=False, dir_okay=False),
]
LengthsOpt = Annotated[str, typer.Option("--lengths", help="Prompt lengths in tokens, e.g. 2k,4k,8k,16k (k = 1024).")]
DepthsOpt = Annotated[
    str, typer.Option("--depths", help="Where the needle sits: 0 (start) to 1 (end), comma-separated.")
]
ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template", help="Wrap the prompt in the model's chat template (the paper uses the raw prompt)."
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@contextmanager
def _progress(label: str, total: int, progress: Optional[bool]):
    """Yield `advance(n)` driving the project's stderr progress bar (counts are tokens).

    Runs last minutes to hours, so a log (stderr not a terminal) also gets a line every 10%.
    """
    if not show_status(progress):
        yield lambda n: None
        return
    bar, started, done, logged = ProgressBar(label, min_tokens=0), time.perf_counter(), 0, 0
    bar(0, total, 0.0)

    def advance(n: int):
        nonlocal done, logged
        done = min(done + n, total)
        elapsed = time.perf_counter() - started
        bar(done, total, elapsed)
        tenth = 10 * done // total
        if not bar.interactive and tenth > logged and done < total:
            logged = tenth
            left = elapsed * (total - done) / done
            status(
                f"{label}: {done:,}/{total:,} tokens ({done / total:.0%}), {done / elapsed:,.0f} tok/s, "
                f"about {left / 60:.1f} min left"
            )

    yield advance


def _load(model_ref, group_size, window, plain, compare, dtype, longest: int):
    """Load once; the modes to run. Without -G/-W, SelfExtend's settings are planned for each
    length as the product plans them (plain attention where the input fits the model)."""
    from selfextend_mlx.evaluation.common import PLAIN, SELFEXTEND, Mode
    from selfextend_mlx.loading.load import load, model_info
    from selfextend_mlx.planning import choose_settings

    if plain and compare:
        raise EvaluationError("--plain and --compare cannot be used together (--compare runs both)")
    if plain and (group_size is not None or window is not None):
        raise EvaluationError("-G/-W set SelfExtend, which --plain turns off: drop one of them")
    model, tokenizer = load(model_ref, selfextend=False, dtype=dtype)
    info = model_info(model)
    if plain:
        return model, tokenizer, info, [Mode(PLAIN)]
    if group_size is None and window is None:
        choose_settings(info.limits, longest)  # the longest input must be within reach: one error line if not
        selfextend = Mode(SELFEXTEND, limits=info.limits)
    else:
        settings = choose_settings(info.limits, longest, group_size=group_size, window=window)
        selfextend = Mode(SELFEXTEND, settings.config())
        _warn_beyond_reach(settings, longest)
    modes = [Mode(PLAIN), selfextend] if compare else [selfextend]
    return model, tokenizer, info, modes


def _warn_beyond_reach(settings, longest: int) -> None:
    """Explicit -G/-W may not reach the input: measure anyway (that is informative), but say so."""
    if longest > settings.reach:
        typer.echo(
            f"warning: {longest} tokens is beyond the reach of SelfExtend G={settings.group_size} "
            f"W={settings.window} ({settings.reach} tokens)",
            err=True,
        )


def _header(task, info, modes, kv_bits, tokens=None):
    from selfextend_mlx.evaluation.results import run_header

    return run_header(task, info.model_id, modes, kv_bits, info.trained_context, tokens)


def _emit(result: dict, as_json: bool) -> None:
    from selfextend_mlx.evaluation.results import compare_results, comparison_table

    if as_json:
        print_json(result)
    else:
        typer.echo(comparison_table(compare_results([result])))


def _read_text(path: Path) -> str:
    from selfextend_mlx.app.documents import read_document

    return read_document(str(path)).text


def _check_plot_path(plot: Optional[Path]) -> None:
    # Fail before minutes of scoring, not after.
    if plot is not None and plot.suffix.lower() != ".png":
        raise EvaluationError(f"--plot writes a PNG: give a file ending in .png, not {plot.name!r}")


@eval_app.command("ppl")
def ppl(
    file: Annotated[Path, typer.Option("--file", "-f", help="The long text to score (txt, md, html, pdf).")],
    tokens: Annotated[str, typer.Option("--tokens", "-n", help="Score the first N tokens, e.g. 4096 or 16k.")] = "4k",
    buckets: Annotated[
        Optional[str],
        typer.Option(
            "--buckets",
            help="Bucket boundaries in tokens, e.g. 512,1024,2048 (default: doubling from 512).",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chunk_size: ChunkOpt = 512,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    progress: ProgressOpt = None,
):
    """Perplexity of one long text by position bucket, scored in chunks through the cache."""
    from selfextend_mlx.evaluation.common import parse_token_count, parse_token_counts, use_mode
    from selfextend_mlx.evaluation.perplexity import bucket_edges, perplexity_buckets
    from selfextend_mlx.evaluation.plots import plot_perplexity
    from selfextend_mlx.evaluation.results import ppl_result, ppl_series, series_labels

    total = parse_token_count(tokens)
    ranges = bucket_edges(total, parse_token_counts(buckets) if buckets else None)
    _check_plot_path(plot)
    text = _read_text(file)
    loaded, tokenizer, info, modes = _load(model, group_size, window, plain, compare, dtype, total)
    ids = _first_tokens(tokenizer, text, total)
    if len(ids) < total:
        raise EvaluationError(f"{file} has only {len(ids)} tokens for this model; ask for fewer with --tokens")

    per_mode = {}
    with _progress("perplexity", len(modes) * (total - 1), progress) as advance:
        for mode in modes:
            use_mode(loaded, mode, total)
            per_mode[mode.name] = perplexity_buckets(loaded, ids, ranges, kv_bits, chunk_size, on_chunk=advance)
    result = ppl_result(_header("ppl", info, modes, kv_bits, total), total, per_mode)
    result["file"] = str(file)
    if plot:
        plot_perplexity(
            series_labels(result, ppl_series(result)),
            plot,
            info.trained_context,
            title=f"Perplexity of {file.name} ({Path(info.model_id).name})",
        )
    _emit(result, as_json)


def _first_tokens(tokenizer, text: str, count: int) -> list:
    """The first `count` tokens, tokenizing only as much of a long book as that needs."""
    chars = max(8 * count, 4096)
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > count or chars >= len(text):
            return list(ids[:count])
        chars *= 2


def _encoder(tokenizer, chat_template: bool):
    if not chat_template:
        return tokenizer.encode
    if not getattr(tokenizer, "has_chat_template", False):
        raise EvaluationError("this model's tokenizer has no chat template: drop --chat-template")

    def encode(text: str):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    return encode


def _retrieval_grid(lengths: str, depths: str, plot: Optional[Path]):
    from selfextend_mlx.evaluation.common import parse_depths, parse_token_counts

    _check_plot_path(plot)
    return parse_token_counts(lengths), parse_depths(depths)


def _run_retrieval(
    task, loaded, tokenizer, info, modes, cells, kv_bits, chunk_size, max_tokens, as_json, plot, progress, **settings
):
    from selfextend_mlx.evaluation.plots import plot_accuracy_grid
    from selfextend_mlx.evaluation.results import grid_panel, retrieval_result, retrieval_series, series_labels
    from selfextend_mlx.evaluation.retrieval import run_cells

    work = len(modes) * sum(len(p.tokens) for c in cells for p in c.prompts)
    with _progress(task, work, progress) as advance:
        run_cells(loaded, tokenizer, cells, modes, max_tokens, kv_bits, chunk_size, on_tokens=advance)
    result = retrieval_result(_header(task, info, modes, kv_bits), cells, [m.name for m in modes], **settings)
    if plot:
        panels = {label: grid_panel(grid) for label, grid in series_labels(result, retrieval_series(result)).items()}
        plot_accuracy_grid(panels, plot, title=f"{task} retrieval ({Path(info.model_id).name})")
    _emit(result, as_json)


@eval_app.command("passkey")
def passkey(
    lengths: LengthsOpt = "2k,4k,8k",
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option("--trials", "-k", min=1, help="Random keys per length and depth.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random keys (same seed, same keys).")] = 0,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chat_template: ChatTemplateOpt = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Greedy answer length.")] = 10,
    chunk_size: ChunkOpt = 512,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    progress: ProgressOpt = None,
):
    """Passkey retrieval in the paper's format: random 5-digit keys, greedy decoding."""
    from selfextend_mlx.evaluation.prompts import passkey_prompt
    from selfextend_mlx.evaluation.retrieval import build_cells, passkey_keys

    length_list, depth_list = _retrieval_grid(lengths, depths, plot)
    loaded, tokenizer, info, modes = _load(
        model, group_size, window, plain, compare, dtype, max(length_list) + max_tokens
    )
    encode = _encoder(tokenizer, chat_template)
    keys = passkey_keys(seed, length_list, depth_list, trials)
    cells = build_cells(length_list, depth_list, trials, lambda n, d, t: passkey_prompt(encode, n, d, keys[(n, d)][t]))
    _run_retrieval(
        "passkey",
        loaded,
        tokenizer,
        info,
        modes,
        cells,
        kv_bits,
        chunk_size,
        max_tokens,
        as_json,
        plot,
        progress,
        seed=seed,
        chat_template=chat_template,
    )


@eval_app.command("needle")
def needle(
    haystack: Annotated[Path, typer.Option("--haystack", help="Your own long text (repeated when too short).")],
    needle_text: Annotated[str, typer.Option("--needle", help="The sentence to hide in it.")],
    question: Annotated[str, typer.Option("--question", help="The question the needle answers.")],
    answer: Annotated[str, typer.Option("--answer", help="Correct when this appears in the output (any case).")],
    lengths: LengthsOpt = "2k,4k,8k",
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chat_template: ChatTemplateOpt = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Greedy answer length.")] = 32,
    chunk_size: ChunkOpt = 512,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    progress: ProgressOpt = None,
):
    """Needle in a haystack over your own text: the needle at each depth, the answer checked."""
    from selfextend_mlx.evaluation.prompts import needle_prompt
    from selfextend_mlx.evaluation.retrieval import build_cells

    length_list, depth_list = _retrieval_grid(lengths, depths, plot)
    text = _read_text(haystack)
    loaded, tokenizer, info, modes = _load(
        model, group_size, window, plain, compare, dtype, max(length_list) + max_tokens
    )
    encode = _encoder(tokenizer, chat_template)
    cells = build_cells(
        length_list, depth_list, 1, lambda n, d, t: needle_prompt(encode, text, needle_text, question, answer, n, d)
    )
    _run_retrieval(
        "needle",
        loaded,
        tokenizer,
        info,
        modes,
        cells,
        kv_bits,
        chunk_size,
        max_tokens,
        as_json,
        plot,
        progress,
        haystack=str(haystack),
        needle=needle_text,
        question=question,
        answer=answer,
        chat_template=chat_template,
    )


@eval_app.command("compare")
def compare_cmd(
    results: Annotated[
        list[Path], typer.Argument(help="JSON files written by `selfextend eval ppl/passkey/needle --json`.")
    ],
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
):
    """Several runs side by side in one table: e.g. a 4-bit and an 8-bit model, or --kv-bits 4 against none."""
    from selfextend_mlx.evaluation.plots import plot_accuracy_grid, plot_perplexity
    from selfextend_mlx.evaluation.results import compare_results, comparison_table, grid_panel, load_result

    _check_plot_path(plot)
    loaded = [load_result(path) for path in results]
    comparison = compare_results(loaded)
    if plot:
        if comparison["task"] == "ppl":
            trained = {r.get("trained_context") for r in loaded}
            plot_perplexity(comparison["columns"], plot, trained.pop() if len(trained) == 1 else None)
        else:
            panels = {label: grid_panel(cells) for label, cells in comparison["columns"].items()}
            plot_accuracy_grid(
                panels, plot, title=f"{comparison['task']} retrieval", size=(max(800, 400 * len(panels)), 500)
            )
    if as_json:
        print_json({"task": comparison["task"], "runs": loaded})
    else:
        typer.echo(comparison_table(comparison))
