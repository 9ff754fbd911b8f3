"""`selfextend eval`: perplexity, passkey, needle-in-a-haystack and RULER-style tasks, over the
methods of selfextend_mlx.evaluation.methods (plain, SelfExtend, RoPE scalings, STRING, truncation,
retrieval) side by side.

Every argument is checked before the model loads, and the run's memory against the machine
before any scoring (planning's estimate), so a mistyped length or an unwritable --plot fails
in a second, not after an hour.
"""

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import PREFILL_STEP
from selfextend_mlx.errors import EvaluationError

from .common import Command
from .options import (
    GroupSizeOpt,
    KvBitsOpt,
    ModelOpt,
    ProgressOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    prefill_step_option,
    required_text,
    token_count,
)
from .output import print_json, status
from .progress import ProgressBar

eval_app = typer.Typer(
    help="Measure a model on long inputs: perplexity by position, passkey, needle and RULER-style retrieval, "
    "SelfExtend side by side with plain, RoPE scaling (linear, ntk, yarn), STRING, truncation and retrieval "
    "(--methods). Every command has --json (stdout), progress on stderr (--quiet to hide it) "
    "and --plot FILE.png.\n\n"
    "Examples:\n\n\b\n"
    "    selfextend eval passkey --lengths 1k,2k --depths 0.5 --trials 1 --compare\n"
    "    selfextend eval passkey --lengths 1k --depths 0.5 --trials 1 --methods plain,selfextend,yarn,string\n"
    "    selfextend eval ppl -f docs/examples/emma.txt --tokens 2k --compare --plot ppl.png",
    no_args_is_help=True,
)

MAX_TRIALS = 1000  # keys per length and depth
MAX_GRID = 64  # lengths, and depths, per run
MAX_ANSWER = 1024  # tokens of a retrieval answer

CompareOpt = Annotated[bool, typer.Option("--compare", help="Run plain and SelfExtend in one run, on the same inputs.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Run only the plain model (no SelfExtend).")]
MethodsOpt = Annotated[
    Optional[str],
    typer.Option(
        "--methods",
        metavar="M,M,...",
        help="Methods to run side by side on the same inputs: plain, selfextend, linear, ntk, yarn, string, "
        "truncate, retrieval (--compare is plain,selfextend; --plain is plain).",
        show_default=False,
    ),
]
FactorOpt = Annotated[
    Optional[float],
    typer.Option(
        "--factor",
        metavar="F",
        help="The RoPE scaling factor of linear, ntk and yarn (default: the one that covers each length; "
        "for ntk, mlx-lm's dynamic factor, 1).",
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        help="Compute dtype: float32, float16, bfloat16 or native (keep quantized weights). "
        "Default: float32 on CPU, native on a GPU.",
        show_default=False,
    ),
]
ChunkOpt = Annotated[int, prefill_step_option("--chunk-size")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
PlotOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--plot",
        metavar="FILE.png",
        help="Write a PNG plot of the result to this file (checked before the run starts).",
        show_default=False,
        dir_okay=False,
    ),
]
LengthsOpt = Annotated[
    str, typer.Option("--lengths", metavar="N,N,...", help="Prompt lengths in tokens, e.g. 2k,4k,8k,16k (k = 1024).")
]
DepthsOpt = Annotated[
    str,
    typer.Option("--depths", metavar="D,D,...", help="Where the needle sits: 0 (start) to 1 (end), comma-separated."),
]
AnswerOpt = Annotated[
    int,
    typer.Option("--max-tokens", "-n", min=1, max=MAX_ANSWER, metavar="N", help="Greedy answer length, in tokens."),
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
def _progress(label: str, total: int, progress: bool, quiet: bool):
    """Yield `advance(n, computed=True)` driving the project's stderr progress bar (counts are tokens): a live
    bar on a terminal, a line every 10% in a log. The run is many prompts of their own, so the
    time left is from the average rate, without a cost growing over the whole count."""
    if quiet or not progress:
        yield lambda n, computed=True: None
        return
    bar, started, done, skipped = ProgressBar(label, min_tokens=0, growing=False), time.perf_counter(), 0, 0
    bar(0, total, 0.0)

    def advance(n: int, computed: bool = True):
        nonlocal done, skipped
        done = min(done + n, total)
        if not computed:  # reused or left out: done, but no measure of the rate
            skipped = min(skipped + n, done)
        bar(done, total, time.perf_counter() - started, skipped)

    yield advance


def _method_names(plain: bool, compare: bool, methods: Optional[str], factor: Optional[float], task: str) -> list:
    """The methods a run measures: --methods, or what --plain / --compare / neither mean."""
    from selfextend_mlx.evaluation.methods import PLAIN, PROMPT_METHODS, SELFEXTEND, check_factor, parse_methods

    if plain and compare:
        raise EvaluationError("--plain and --compare cannot be used together (--compare runs both)")
    if methods is not None and (plain or compare):
        raise EvaluationError("--methods names every method to run: drop --plain/--compare")
    if methods is None:
        names = [PLAIN] if plain else [PLAIN, SELFEXTEND] if compare else [SELFEXTEND]
    else:
        names = parse_methods(methods)
    check_factor(factor, names)
    if task == "ppl" and set(names) & set(PROMPT_METHODS):
        raise EvaluationError(f"perplexity scores one text as it is: {', '.join(PROMPT_METHODS)} change the prompt")
    return names


def _load(
    model_ref,
    group_size,
    window,
    plain,
    compare,
    dtype,
    longest: int,
    kv_bits=None,
    chunk_size=PREFILL_STEP,
    trust=False,
    methods: Optional[str] = None,
    factor: Optional[float] = None,
    task: str = "",
):
    """Load once; the modes to run. Without -G/-W, SelfExtend's settings are planned for each
    length as the product plans them (plain attention where the input fits the model). The
    longest input's memory is checked against the machine before anything is scored."""
    from selfextend_mlx.evaluation.methods import SELFEXTEND
    from selfextend_mlx.loading.load import load, model_info
    from selfextend_mlx.planning import check_memory, modes_memory

    names = _method_names(plain, compare, methods, factor, task)
    if kv_bits is not None and "string" in names:
        raise EvaluationError("STRING needs a full-precision KV cache: drop --kv-bits or string")
    if SELFEXTEND not in names and (group_size is not None or window is not None):
        raise EvaluationError("-G/-W set SelfExtend, which this run does not measure: drop them or add selfextend")
    model, tokenizer = load(model_ref, selfextend=False, dtype=dtype, trust_remote_code=trust)
    info = model_info(model)
    modes, settings = zip(*(_mode(name, info, longest, group_size, window, factor) for name in names))
    check_memory(modes_memory(info, longest, list(settings), kv_bits, chunk_size))  # the hungriest mode
    return model, tokenizer, info, list(modes)


def _mode(name: str, info, longest: int, group_size, window, factor):
    """One method's Mode and the Settings of its longest pass (for the memory check)."""
    from selfextend_mlx.evaluation.common import Mode
    from selfextend_mlx.evaluation.methods import PLAIN, SELFEXTEND
    from selfextend_mlx.planning import choose_settings, plain_settings

    if name == SELFEXTEND:
        if group_size is None and window is None:
            return Mode(SELFEXTEND, limits=info.limits), choose_settings(info.limits, longest)  # or one error line
        planned = choose_settings(info.limits, longest, group_size=group_size, window=window)
        _warn_beyond_reach(planned, longest)
        return Mode(SELFEXTEND, planned.config()), planned
    if name == PLAIN:
        return Mode(PLAIN), plain_settings(longest)
    return Mode(name, method=name, bounds=info.limits, factor=factor), plain_settings(longest)


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
    """Fail before minutes of scoring, not after: a PNG name, in a folder that can be written."""
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise EvaluationError(f"--plot writes a PNG: give a file ending in .png, not {plot.name!r}")
    folder = plot.absolute().parent
    while not folder.exists() and folder != folder.parent:  # the plot creates missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise EvaluationError(f"--plot {plot}: {folder} is not a folder")
    if plot.exists() and (plot.is_dir() or not os.access(plot, os.W_OK)):
        raise EvaluationError(f"--plot {plot}: the file cannot be written")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvaluationError(f"--plot {plot}: cannot write in {folder}")


def _wrote_plot(plot: Path, quiet: bool) -> None:
    if not quiet:
        status(f"plot written to {plot}")


def _check_buckets(edges: list, total: int) -> None:
    past = [edge for edge in edges if edge > total]
    if past:
        raise EvaluationError(
            f"--buckets {','.join(map(str, past))} past the {total} tokens scored: raise --tokens or drop them"
        )


@eval_app.command("ppl", cls=Command)
def ppl(
    file: Annotated[
        Path, typer.Option("--file", "-f", metavar="FILE", help="The long text to score (txt, md, html, pdf).")
    ],
    tokens: Annotated[
        int,
        typer.Option("--tokens", parser=token_count, metavar="N", help="Score the first N tokens, e.g. 4096 or 16k."),
    ] = "4k",
    buckets: Annotated[
        Optional[str],
        typer.Option(
            "--buckets",
            metavar="N,N,...",
            help="Bucket boundaries in tokens, e.g. 512,1k,2k (default: doubling from 512); none past --tokens.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    methods: MethodsOpt = None,
    factor: FactorOpt = None,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chunk_size: ChunkOpt = PREFILL_STEP,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Perplexity of one long text by position bucket, scored in chunks through the cache.

    Examples:

    \b
        selfextend eval ppl -f docs/examples/emma.txt --tokens 2k --compare
        selfextend eval ppl -f docs/examples/emma.txt --tokens 8k --buckets 2k,4k,6k --json > emma_ppl.json
    """
    from selfextend_mlx.evaluation.methods import applied
    from selfextend_mlx.evaluation.perplexity import bucket_edges, perplexity_buckets
    from selfextend_mlx.evaluation.plots import plot_perplexity
    from selfextend_mlx.evaluation.results import ppl_result, ppl_series, series_labels
    from selfextend_mlx.planning import parse_token_counts

    total = tokens
    edges = parse_token_counts(buckets) if buckets else None
    if edges:
        _check_buckets(edges, total)
    ranges = bucket_edges(total, edges)
    _check_plot_path(plot)
    text = _read_text(file)
    _method_names(plain, compare, methods, factor, "ppl")  # a wrong --methods fails before the model loads
    loaded, tokenizer, info, modes = _load(
        model, group_size, window, plain, compare, dtype, total, kv_bits, chunk_size, trust_remote_code, methods, factor
    )
    ids = _first_tokens(tokenizer, text, total)
    if len(ids) < total:
        raise EvaluationError(f"{file} has only {len(ids)} tokens for this model; ask for fewer with --tokens")

    per_mode = {}
    with _progress("perplexity", len(modes) * (total - 1), progress, quiet) as advance:
        for mode in modes:
            with applied(loaded, mode.setup_for(total), info.trained_context):
                per_mode[mode.name] = perplexity_buckets(loaded, ids, ranges, kv_bits, chunk_size, on_chunk=advance)
    result = ppl_result(_header("ppl", info, modes, kv_bits, total), total, per_mode)
    result["file"] = str(file)
    result["setups"] = {mode.name: mode.setup_for(total).describe() for mode in modes}
    if plot:
        plot_perplexity(
            series_labels(result, ppl_series(result)),
            plot,
            info.trained_context,
            title=f"Perplexity of {file.name} ({Path(info.model_id).name})",
        )
        _wrote_plot(plot, quiet)
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

    from selfextend_mlx.app.prompts import render_chat_template

    def encode(text: str):
        # The template is the model folder's code: rendered under the bound every render has.
        # Its text holds the special tokens it wants (as apply_chat_template tokenizes it).
        rendered = render_chat_template(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
        return list(tokenizer.encode(rendered, add_special_tokens=False))

    return encode


def _retrieval_grid(lengths: str, depths: str, plot: Optional[Path]):
    from selfextend_mlx.evaluation.common import parse_depths
    from selfextend_mlx.planning import parse_token_counts

    _check_plot_path(plot)
    length_list, depth_list = parse_token_counts(lengths), parse_depths(depths)
    for name, values in (("--lengths", length_list), ("--depths", depth_list)):
        if len(values) > MAX_GRID:
            raise EvaluationError(f"{name}: {len(values)} values, more than the {MAX_GRID} one run takes")
    return length_list, depth_list


def _run_retrieval(task: str, options: dict, length_list, depth_list, trials: int, prompt_maker, **settings):
    """passkey and needle once their own inputs are read: load the model, build the grid's
    prompts (`prompt_maker(encode)` gives `make_prompt(length, depth, trial)`), run, report.
    `options` are the command's parameters (its `locals()`): both take the same ones."""
    from selfextend_mlx.evaluation.plots import plot_accuracy_grid
    from selfextend_mlx.evaluation.results import grid_panel, retrieval_result, retrieval_series, series_labels
    from selfextend_mlx.evaluation.retrieval import build_cells

    kv_bits, plot, quiet = options["kv_bits"], options["plot"], options["quiet"]
    loaded, tokenizer, info, modes = _load_for(task, options, length_list)
    encode = _encoder(tokenizer, options["chat_template"])
    cells = build_cells(length_list, depth_list, trials, prompt_maker(encode))
    _run_grid(task, options, loaded, tokenizer, cells, modes, encode)
    result = retrieval_result(_header(task, info, modes, kv_bits), cells, [m.name for m in modes], **settings)
    if plot:
        panels = {label: grid_panel(grid) for label, grid in series_labels(result, retrieval_series(result)).items()}
        plot_accuracy_grid(panels, plot, title=f"{task} retrieval ({Path(info.model_id).name})")
        _wrote_plot(plot, quiet)
    _emit(result, options["as_json"])


def _load_for(task: str, options: dict, length_list):
    """_load with a retrieval command's options, for its longest prompt and answer."""
    return _load(
        options["model"],
        options["group_size"],
        options["window"],
        options["plain"],
        options["compare"],
        options["dtype"],
        max(length_list) + options["max_tokens"],
        options["kv_bits"],
        options["chunk_size"],
        options["trust_remote_code"],
        options["methods"],
        options["factor"],
        task,
    )


def _run_grid(task: str, options: dict, loaded, tokenizer, cells, modes, encode) -> None:
    """Every mode over every cell (progress on stderr), through the turn runner."""
    from selfextend_mlx.evaluation.retrieval import run_cells

    work = len(modes) * sum(len(p.tokens) for c in cells for p in c.prompts)
    with _progress(task, work, options["progress"], options["quiet"]) as advance:
        run_cells(
            loaded,
            tokenizer,
            cells,
            modes,
            options["max_tokens"],
            options["kv_bits"],
            options["chunk_size"],
            on_tokens=advance,
            encode=encode,
        )


@eval_app.command("passkey", cls=Command)
def passkey(
    lengths: LengthsOpt = "2k,4k,8k",
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: Annotated[
        int,
        typer.Option("--trials", "-k", min=1, max=MAX_TRIALS, metavar="K", help="Random keys per length and depth."),
    ] = 3,
    seed: Annotated[
        int, typer.Option("--seed", metavar="SEED", help="Seed of the random keys (same seed, same keys).")
    ] = 0,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    methods: MethodsOpt = None,
    factor: FactorOpt = None,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chat_template: ChatTemplateOpt = False,
    max_tokens: AnswerOpt = 10,
    chunk_size: ChunkOpt = PREFILL_STEP,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Passkey retrieval in the paper's format: random 5-digit keys, greedy decoding.

    Examples:

    \b
        selfextend eval passkey --lengths 1k,2k --depths 0,0.5,1 --trials 1 --compare
        selfextend eval passkey --lengths 6k --depths 0.5 --plain --json > plain.json
        selfextend eval passkey --lengths 6k --depths 0.5 --json > selfextend.json
    """
    from selfextend_mlx.evaluation.prompts import passkey_prompt
    from selfextend_mlx.evaluation.retrieval import passkey_keys

    length_list, depth_list = _retrieval_grid(lengths, depths, plot)
    keys = passkey_keys(seed, length_list, depth_list, trials)
    prompt_maker = lambda encode: lambda n, d, t: passkey_prompt(encode, n, d, keys[(n, d)][t])
    _run_retrieval(
        "passkey", locals(), length_list, depth_list, trials, prompt_maker, seed=seed, chat_template=chat_template
    )


@eval_app.command("needle", cls=Command)
def needle(
    haystack: Annotated[
        Path, typer.Option("--haystack", metavar="FILE", help="Your own long text (repeated when too short).")
    ],
    needle_text: Annotated[
        str,
        typer.Option("--needle", parser=required_text("needle"), metavar="TEXT", help="The sentence to hide in it."),
    ],
    question: Annotated[
        str,
        typer.Option(
            "--question", parser=required_text("question"), metavar="TEXT", help="The question the needle answers."
        ),
    ],
    answer: Annotated[
        str,
        typer.Option(
            "--answer",
            parser=required_text("answer"),
            metavar="TEXT",
            help="Correct when this appears in the output (any case).",
        ),
    ],
    lengths: LengthsOpt = "2k,4k,8k",
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    methods: MethodsOpt = None,
    factor: FactorOpt = None,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chat_template: ChatTemplateOpt = False,
    max_tokens: AnswerOpt = 32,
    chunk_size: ChunkOpt = PREFILL_STEP,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Needle in a haystack over your own text: the needle at each depth, the answer checked.

    Examples:

    \b
        selfextend eval needle --haystack docs/examples/emma.txt --needle "The code of the east tower is 48213." \\
            --question "What is the code of the east tower?" --answer 48213 --lengths 2k,4k --depths 0.5 --compare
    """
    from selfextend_mlx.evaluation.prompts import needle_prompt

    length_list, depth_list = _retrieval_grid(lengths, depths, plot)
    text = _read_text(haystack)
    prompt_maker = lambda encode: lambda n, d, t: needle_prompt(encode, text, needle_text, question, answer, n, d)
    _run_retrieval(
        "needle",
        locals(),
        length_list,
        depth_list,
        1,
        prompt_maker,
        haystack=str(haystack),
        needle=needle_text,
        question=question,
        answer=answer,
        chat_template=chat_template,
    )


@eval_app.command("ruler", cls=Command)
def ruler(
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            metavar="T,T,...",
            help="RULER-style tasks: single, multikey, multivalue, multiquery, vartrack (default: all).",
        ),
    ] = "single,multikey,multivalue,multiquery,vartrack",
    lengths: LengthsOpt = "2k,4k,8k",
    depths: DepthsOpt = "0,0.5,1",
    trials: Annotated[
        int,
        typer.Option("--trials", "-k", min=1, max=MAX_TRIALS, metavar="K", help="Questions per task, length, depth."),
    ] = 2,
    seed: Annotated[int, typer.Option("--seed", metavar="SEED", help="Same seed, same questions.")] = 0,
    haystack: Annotated[
        Optional[Path],
        typer.Option(
            "--haystack",
            metavar="FILE",
            help="Hide the needles in this text (default: a repeated filler line).",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    compare: CompareOpt = False,
    plain: PlainOpt = False,
    methods: MethodsOpt = None,
    factor: FactorOpt = None,
    kv_bits: KvBitsOpt = None,
    dtype: DtypeOpt = None,
    chat_template: ChatTemplateOpt = False,
    max_tokens: AnswerOpt = 48,
    chunk_size: ChunkOpt = PREFILL_STEP,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """RULER-style tasks (Hsieh et al. 2024), generated here: needles among distractors, exact match per task.

    Examples:

    \b
        selfextend eval ruler --tasks single,multikey --lengths 300 --depths 0.5 --trials 1 -n 8 --compare
        selfextend eval ruler --tasks vartrack --lengths 512 --depths 0 -k 1 -n 8 --methods plain,string,yarn --json
        selfextend eval ruler --tasks single --lengths 300 --depths 0.5 -k 1 -n 8 --compare --plot ruler.png

    --plot draws accuracy against length, one line per method, every task and depth pooled.
    """
    from selfextend_mlx.evaluation.results import ruler_result
    from selfextend_mlx.evaluation.retrieval import build_cells
    from selfextend_mlx.evaluation.ruler import haystack_units, parse_tasks, ruler_prompt

    _check_plot_path(plot)
    task_list = parse_tasks(tasks)
    length_list, depth_list = _retrieval_grid(lengths, depths, None)
    units = haystack_units(_read_text(haystack) if haystack is not None else "")
    options = locals()
    loaded, tokenizer, info, modes = _load_for("ruler", options, length_list)
    encode = _encoder(tokenizer, chat_template)
    by_task = {
        name: build_cells(
            length_list, depth_list, trials, lambda n, d, t, name=name: ruler_prompt(encode, name, n, d, seed, t, units)
        )
        for name in task_list
    }
    _run_grid("ruler", options, loaded, tokenizer, [c for cells in by_task.values() for c in cells], modes, encode)
    header = _header("ruler", info, modes, kv_bits)
    result = ruler_result(header, by_task, [m.name for m in modes], seed=seed, haystack=str(haystack or ""))
    if plot:
        from selfextend_mlx.evaluation.results import compare_results

        _plot_comparison(compare_results([result]), [result], plot, by_length=True)
        _wrote_plot(plot, quiet)
    if as_json:
        print_json(result)
    else:
        _print_ruler_tables(result)


def _print_ruler_tables(result: dict) -> None:
    from selfextend_mlx.evaluation.results import compare_results, comparison_table

    typer.echo(comparison_table(compare_results([result])))


@eval_app.command("compare", cls=Command)
def compare_cmd(
    results: Annotated[
        list[Path],
        typer.Argument(
            metavar="RESULT.json", help="JSON files written by `selfextend eval ppl/passkey/needle/ruler --json`."
        ),
    ],
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    by_length: Annotated[
        bool,
        typer.Option(
            "--by-length",
            help="With --plot (passkey, needle): draw accuracy against length, one line per run, depths "
            "pooled, instead of a depth x length grid per run (ruler is always drawn so, its tasks pooled).",
        ),
    ] = False,
    quiet: QuietOpt = False,
):
    """Several runs side by side in one table: e.g. a 4-bit and an 8-bit model, or --kv-bits 4 against none.

    Runs of one setting recorded in parts (one file a length) are joined into one column.

    Examples (after the two --json runs of selfextend eval passkey --help):

    \b
        selfextend eval compare plain.json selfextend.json --plot passkey.png
        selfextend eval compare docs/results/planning/passkey_4k_plain.json \\
            docs/results/planning/passkey_4k_auto.json docs/results/planning/passkey_8k_plain.json \\
            docs/results/planning/passkey_8k_auto.json --by-length --plot by_length.png
    """
    from selfextend_mlx.evaluation.results import compare_results, comparison_table, load_result

    _check_plot_path(plot)
    loaded = [load_result(path) for path in results]
    comparison = compare_results(loaded)
    if by_length and (plot is None or comparison["task"] not in ("passkey", "needle", "ruler")):
        raise EvaluationError("--by-length draws a passkey or needle comparison: give it with --plot FILE.png")
    if plot:
        _plot_comparison(comparison, loaded, plot, by_length)
        _wrote_plot(plot, quiet)
    if as_json:
        print_json({"task": comparison["task"], "runs": loaded})
    else:
        typer.echo(comparison_table(comparison))


def _plot_comparison(comparison: dict, loaded: list, plot: Path, by_length: bool) -> None:
    from selfextend_mlx.evaluation.plots import plot_accuracy_by_length, plot_accuracy_grid, plot_perplexity
    from selfextend_mlx.evaluation.results import accuracy_by_length, grid_panel

    trained = {r.get("trained_context") for r in loaded}
    trained = trained.pop() if len(trained) == 1 else None
    task = comparison["task"]
    haystacks = {Path(str(r.get("haystack"))).stem for r in loaded if r.get("haystack")}
    text = f" in {haystacks.pop()}" if len(haystacks) == 1 else ""
    if task == "ruler":
        title = f"RULER tasks ({', '.join(comparison['tasks'])}){text} by length"
        plot_accuracy_by_length(accuracy_by_length(comparison), plot, trained, title=title)
        return
    columns = comparison["columns"]
    if task == "ppl":
        plot_perplexity(columns, plot, trained)
    elif by_length:
        title = f"{task} retrieval{text} by length"
        plot_accuracy_by_length(accuracy_by_length(comparison), plot, trained, title=title)
    else:
        panels = {label: grid_panel(cells) for label, cells in columns.items()}
        plot_accuracy_grid(panels, plot, title=f"{task} retrieval", size=(max(800, 400 * len(panels)), 500))
