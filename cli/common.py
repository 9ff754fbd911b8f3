"""Pieces the commands share: options, model loading, the header, progress and stats on
stderr, answers on stdout.

The conventions every command follows (docs/cli.md): -m/--model; -n/--max-tokens is the
answer's length and --tokens an input's; token counts are written 4096 or 4k; -s/--system;
--json prints one object on stdout; --quiet leaves stderr to errors; a document command
given no file reads the text piped into it.
"""

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from selfextend_mlx.errors import SelfExtendError


class UsageProblem(SelfExtendError):
    """A command used the wrong way (no document, an empty question): exit 2, like a bad flag."""


# -- help pages --------------------------------------------------------------------------------


class Command(TyperCommand):
    """Help pages laid out as click lays them out: `FILE...` in the usage line, arguments listed
    by name (Typer would print `{FILE}...` and `FILE <list[str]>`)."""

    def collect_usage_pieces(self, ctx) -> list:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name, more = param.metavar or param.name.upper(), "..." if param.nargs != 1 else ""
                pieces.append(f"{name}{more}" if param.required else f"[{name}]{more}")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        arguments = [(_argument_name(p), p.help or "") for p in self.get_params(ctx) if _is_shown_argument(p)]
        options = [p.get_help_record(ctx) for p in self.get_params(ctx) if p.param_type_name == "option"]
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        options = [record for record in options if record]
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


def _argument_name(param) -> str:
    return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")


def _is_shown_argument(param) -> bool:
    return param.param_type_name == "argument" and not param.hidden


# -- values as people type them -------------------------------------------------------------------


def token_count(value) -> int:
    """4096, 4k (4,096) or 1.5k: a token count, for every option that asks for one."""
    from selfextend_mlx.planning import parse_token_count

    if isinstance(value, int):
        value = str(value)
    try:
        return parse_token_count(value)
    except SelfExtendError as error:
        raise typer.BadParameter(str(error)) from None


def token_counts(value) -> list:
    """'1k,2k,4k' or '1024,2048'."""
    from selfextend_mlx.planning import parse_token_counts

    try:
        return parse_token_counts(value)
    except SelfExtendError as error:
        raise typer.BadParameter(str(error)) from None


def finite_number(low: float, high: float = math.inf):
    """A float parser that refuses inf and nan as well as values outside [low, high]."""

    def parse(value) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a number") from None
        if not math.isfinite(number) or not low <= number <= high:
            bounds = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
            raise typer.BadParameter(f"{value} is not a finite number {bounds}")
        return number

    return parse


def decode_line(raw: bytes) -> str:
    """Text typed or piped in: UTF-8, else Windows-1252 (the usual other terminal encoding; it
    decodes every Latin-1 letter), with any byte it cannot place shown as U+FFFD."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def text_argument(value):
    """Command-line text as the user meant it. Bytes that are not UTF-8 (`-q $'caf\\xe9?'` from a
    Latin-1 terminal) reach Python as surrogate escapes, which no tokenizer takes."""
    if value is None:
        return None
    value = str(value)
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return decode_line(value.encode("utf-8", errors="surrogateescape"))


def required_text(what: str):
    def parse(value):
        text = text_argument(value)
        if text is not None and not text.strip():
            raise typer.BadParameter(f"the {what} is empty")
        return text

    return parse


# -- options: one name per concept -------------------------------------------------------------------


def _kv_bits(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in (4, 8):
        raise typer.BadParameter(f"{value} is not supported: use 4 or 8")
    return value


def _positive_count(value) -> int:
    count = token_count(value)
    if count < 1:
        raise typer.BadParameter(f"{value} must be at least 1")
    return count


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help="A registry name (selfextend models), a local mlx-lm folder, a .gguf file or a Hugging Face repo. "
        "Default: $SELFEXTEND_MODEL, else the bundled SmolLM2-135M-Instruct.",
        show_default=False,
    ),
]
GroupSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--group-size",
        "-G",
        min=1,
        metavar="G",
        help="SelfExtend group size G (default: plain attention when the input fits the model, else the "
        "smallest G that reaches).",
        show_default=False,
    ),
]
WindowOpt = Annotated[
    Optional[int],
    typer.Option(
        "--window",
        "-W",
        min=1,
        metavar="W",
        help="SelfExtend neighbor window W (default: the model's).",
        show_default=False,
    ),
]
MaxTokensOpt = Annotated[
    int,
    typer.Option(
        "--max-tokens", "-n", parser=_positive_count, metavar="N", help="Longest answer, in tokens (e.g. 200 or 1k)."
    ),
]
TempOpt = Annotated[
    float,
    typer.Option(
        "--temp",
        "-t",
        parser=finite_number(0.0),
        metavar="T",
        help="Sampling temperature (0: always the likeliest token).",
    ),
]
TopPOpt = Annotated[
    float,
    typer.Option(
        "--top-p",
        parser=finite_number(0.0, 1.0),
        metavar="P",
        help="Nucleus sampling: keep the likeliest tokens within this probability mass (1: all).",
    ),
]
TopKOpt = Annotated[
    int,
    typer.Option("--top-k", min=0, metavar="K", help="Sample among the K likeliest tokens only (0: no limit)."),
]
MinPOpt = Annotated[
    float,
    typer.Option(
        "--min-p",
        parser=finite_number(0.0, 1.0),
        metavar="P",
        help="Drop tokens less likely than P times the likeliest one (0: keep all).",
    ),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option("--seed", metavar="SEED", help="Random seed, for repeatable sampling.", show_default=False),
]
KvBitsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--kv-bits",
        callback=_kv_bits,
        metavar="BITS",
        help="Quantize the KV cache to 4 or 8 bits (less memory).",
        show_default=False,
    ),
]


def prefill_step_option(*aliases: str):
    """The one prefill-step option (eval also spells it --chunk-size)."""
    return typer.Option(
        "--prefill-step-size",
        *aliases,
        parser=_positive_count,
        metavar="N",
        help="Tokens fed to the model per prefill step (bounds memory).",
    )


PrefillStepOpt = Annotated[int, prefill_step_option()]
SystemOpt = Annotated[
    Optional[str],
    typer.Option("--system", "-s", parser=text_argument, metavar="TEXT", help="System prompt.", show_default=False),
]
QuestionOpt = Annotated[
    Optional[str],
    typer.Option(
        "--question", "-q", parser=required_text("question"), metavar="TEXT", help="The question.", show_default=False
    ),
]
CacheDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--cache-dir",
        metavar="DIR",
        help="Document cache folder (default: $SELFEXTEND_CACHE_DIR or the platform's cache folder).",
        show_default=False,
        file_okay=False,
    ),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the document cache.")]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run Python code that comes with the model (its own tokenizer or architecture). Off: such a model "
        "is refused; turn it on only for models whose authors you trust.",
    ),
]
MaxInputOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-input",
        metavar="SIZE",
        help="Refuse documents larger than this in all, e.g. 50MB (default: $SELFEXTEND_MAX_INPUT or 10MB).",
        show_default=False,
    ),
]
ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        help="Show reading progress on stderr: a live bar on a terminal, a line every 10% in a log.",
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", help="Nothing on stderr but errors and warnings: no header, progress or stats."),
]
AllowRepeatsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-repeats",
        help="Let an answer repeat itself: do not stop it once it loops on the same words.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the streamed text.")]


# -- output ---------------------------------------------------------------------------------


def status(message: str) -> None:
    """A status line on stderr: stdout stays clean for answers and JSON."""
    print(message, file=sys.stderr, flush=True)


def write_out(text: str) -> None:
    """Answer text to stdout, flushed so it streams."""
    sys.stdout.write(text)
    sys.stdout.flush()


def make_sampling(*, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, allow_repeats=False, **extra):
    """The sampling options of a run (the answer's length is its plan's: --max-tokens)."""
    from selfextend_mlx.app.generation import Sampling

    return Sampling(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        stop_loops=not allow_repeats,
        **extra,
    )


def progress_bar(label: str, quiet: bool, progress: bool = True):
    """The prefill progress callback for a run, or None when stderr should stay quiet."""
    return ProgressBar(label) if progress and not quiet else None


class ProgressBar:
    """Reading progress on stderr: tokens done, tokens per second, time left.

    A terminal gets a bar redrawn in place; a log gets the start, a line every 10% and the end.
    Time left is estimated from the steps so far with a cost per token that grows with its
    position (attention over every earlier token), fitted to the measured step times: a rate
    averaged over the short first steps promises far too early an end for a long document.
    """

    def __init__(self, label: str = "reading", width: int = 24, min_tokens: int = 256, growing: bool = True):
        self.label, self.width, self.min_tokens, self.growing = label, width, min_tokens, growing
        self.interactive = sys.stderr.isatty()
        self.steps: list[tuple[int, float]] = []  # (tokens done, seconds) after each step
        self.logged = -1  # the last tenth written to a log

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if total < self.min_tokens or total <= 0:  # a question's few tokens take no visible time
            return
        if done == 0:
            self.steps, self.logged = [], -1
        elif not self.steps or done > self.steps[-1][0]:
            self.steps.append((done, elapsed))
        finished = done >= total
        if self.interactive:
            sys.stderr.write(f"\r\x1b[2K{self.line(done, total, elapsed)}" + ("\n" if finished else ""))
        else:
            tenth = 10 * done // total
            if tenth > self.logged or finished:
                self.logged = tenth
                sys.stderr.write(self.line(done, total, elapsed) + "\n")
        sys.stderr.flush()

    def line(self, done: int, total: int, elapsed: float) -> str:
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "." * (self.width - filled)
        finished = done >= total
        rate = self.rate(elapsed, finished)
        left = None if finished else self.seconds_left(total)
        if finished:
            timing = f"done in {duration(elapsed)}"
        elif left is None:
            timing = "estimating time left"
        else:
            timing = f"about {duration(left)} left"
        speed = f"  {rate:,.0f} tok/s" if rate else ""
        return f"{self.label} [{bar}] {done:,}/{total:,} tokens{speed}  {timing}"

    def rate(self, elapsed: float, finished: bool) -> float:
        """Tokens per second: of the whole read once it is done, else of the latest step."""
        if not self.steps:
            return 0.0
        if finished or len(self.steps) == 1:
            done, seconds = self.steps[-1]
            return done / seconds if seconds > 0 else 0.0
        (d0, t0), (d1, t1) = self.steps[-2], self.steps[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def seconds_left(self, total: int) -> Optional[float]:
        """The time the remaining tokens should take, or None before the first step is timed."""
        if not self.steps:
            return None
        done = self.steps[-1][0]
        per_token, per_position = fit_step_costs(self.steps, self.growing)
        return per_token * (total - done) + per_position * (total * total - done * done) / 2


def fit_step_costs(steps: list, growing: bool = True) -> tuple[float, float]:
    """(a, b) such that the token at position p costs about a + b * p seconds, fitted by least
    squares to the steps' times [(tokens done, seconds so far), ...]. The first step carries
    the start-up (lazy weights, first graphs): it is left out once there are three or more."""
    spans, previous = [], (0, 0.0)
    for done, seconds in steps:
        spans.append((done - previous[0], (done * done - previous[0] ** 2) / 2, seconds - previous[1]))
        previous = (done, seconds)
    if len(spans) >= 3:
        spans = spans[1:]
    tokens = sum(n for n, _, _ in spans)
    seconds = sum(t for _, _, t in spans)
    flat = (max(seconds, 0.0) / tokens if tokens else 0.0), 0.0
    if not growing or len(spans) < 2:
        return flat
    # normal equations of  t = a * n + b * x  over the spans
    snn = sum(n * n for n, _, _ in spans)
    sxx = sum(x * x for _, x, _ in spans)
    snx = sum(n * x for n, x, _ in spans)
    snt = sum(n * t for n, _, t in spans)
    sxt = sum(x * t for _, x, t in spans)
    det = snn * sxx - snx * snx
    if det <= 0:
        return flat
    a, b = (snt * sxx - sxt * snx) / det, (snn * sxt - snx * snt) / det
    if b < 0:  # noise: no visible growth
        return flat
    if a < 0:  # all of it grows with the position
        return 0.0, max(sxt / sxx, 0.0)
    return a, b


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def header(session) -> str:
    """One line: model, document tokens, trained context, settings, reach, answer budget, memory."""
    from selfextend_mlx.planning import format_bytes

    plan = session.plan
    parts = [f"model {display_name(plan.model_id)}"]
    if session.documents:
        parts.append(f"document {len(session.prefix_tokens):,} tokens")
    else:
        parts.append(f"prompt {plan.prompt_tokens:,} tokens")
    memory = f"memory ~{format_bytes(plan.memory.total)}"
    if plan.memory.machine:
        memory += f" of {format_bytes(plan.memory.machine)}"
    parts += [
        f"trained context {plan.trained_context:,}",
        plan.settings.describe(),
        f"N_max {plan.max_length:,}",
        f"answer up to {plan.max_tokens:,}",
        memory,
    ]
    return " | ".join(parts)


FINISHED = {
    "stop": "",
    "length": ", stopped at --max-tokens",
    "repetition": ", stopped: it was repeating itself",
    "interrupted": ", interrupted",
}


def stats_line(answer) -> str:
    """The one stats line every command prints after an answer."""
    from selfextend_mlx.planning import format_bytes

    finished = FINISHED.get(answer.finish_reason, f", {answer.finish_reason}")
    return (
        f"prompt {answer.prompt_tokens:,} tokens ({answer.prefilled_tokens:,} computed, "
        f"{answer.prompt_tps:,.1f} tok/s) | answer {answer.generation_tokens:,} tokens "
        f"({answer.generation_tps:,.1f} tok/s{finished}) | peak memory {format_bytes(answer.peak_memory_bytes)}"
    )


def display_name(model_id: str) -> str:
    return Path(model_id).name if "/" in model_id and Path(model_id).exists() else model_id


def print_json(data: dict) -> None:
    print(json.dumps(data, ensure_ascii=False))


def answer_record(session, answer) -> dict:
    """What --json prints for one answer."""
    from selfextend_mlx.loading.distributed import ranks_of

    plan = session.plan
    return {
        "answer": answer.text,
        "model": plan.model_id,
        "prompt_tokens": answer.prompt_tokens,
        "prefilled_tokens": answer.prefilled_tokens,
        "document_tokens": len(session.prefix_tokens),
        "document_cache": {"cache": "hit", "prefill": "miss"}.get(session.document_source, "off")
        if session.doc_cache is not None
        else "off",
        "generation_tokens": answer.generation_tokens,
        "finish_reason": answer.finish_reason,
        "group_size": plan.settings.group_size,
        "requested_group_size": plan.requested_group_size,
        "window": plan.settings.window,
        "settings": plan.settings.reason,
        "trained_context": plan.trained_context,
        "max_length": plan.max_length,
        "prompt_tps": round(answer.prompt_tps, 2),
        "generation_tps": round(answer.generation_tps, 2),
        "peak_memory_bytes": answer.peak_memory_bytes,
        "estimated_memory_bytes": plan.memory.total,
        "ranks": ranks_of(session.model),
    }


# -- input ------------------------------------------------------------------------------------


def stdin_is_piped() -> bool:
    """Whether text is coming in on stdin (a pipe or a file), not a person at a terminal."""
    return sys.stdin is not None and not sys.stdin.isatty()


def files_or_stdin(files: Optional[list], command: str) -> list:
    """The documents to read: the files given, else `-` (stdin) when text is piped in, as `llm`
    does."""
    from selfextend_mlx.loading.distributed import launched

    chosen = list(files) if files else ["-"] if stdin_is_piped() else None
    if chosen and "-" in chosen and launched():
        raise UsageProblem(
            f"under mlx.launch standard input does not reach the ranks: give selfextend {command} the document "
            "as a file"
        )
    if chosen:
        return chosen
    raise UsageProblem(
        f"give a document to read, or pipe one in: selfextend {command} FILE ... or "
        f"cat FILE | selfextend {command} ... (see selfextend {command} --help)"
    )


def read_stdin_text(max_input: Optional[str] = None) -> str:
    from selfextend_mlx.app.documents import read_text

    return read_text(sys.stdin.buffer, "stdin", max_input)


# -- loading ----------------------------------------------------------------------------------


def load_model(model_ref: Optional[str], trust_remote_code: bool = False):
    """Load the model plain: the session applies SelfExtend once it knows the input length.
    A terminal sees a transient "loading" note, erased once the model is in. Under mlx.launch
    with several ranks the model is sharded over them, and only rank 0 writes from here on."""
    from selfextend_mlx.loading import distributed

    if distributed.ranks() > 1:
        distributed.quiet_unless_primary()
    interactive = sys.stderr.isatty()
    if interactive:
        sys.stderr.write(f"loading {model_ref or 'the default model'}...")
        sys.stderr.flush()
    try:
        # a plain load() in a single process
        return distributed.load_sharded(model_ref, trust_remote_code=trust_remote_code)
    finally:
        if interactive:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def document_cache(cache_dir: Optional[Path], no_cache: bool):
    from selfextend_mlx.loading.distributed import ranks

    if no_cache or ranks() > 1:  # a sharded run's cache holds one rank's heads: never shared
        return None
    from selfextend_mlx.app.doccache import DocumentCache

    return DocumentCache(cache_dir, notice=status)
