"""The command line's option types and the parsers behind them: one name per concept, the
same everywhere (docs/cli.md): -m/--model; -n/--max-tokens is the answer's length and
--tokens an input's; token counts are written 4096 or 4k; -s/--system; --json prints one
object on stdout; --quiet leaves stderr to errors.
"""

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.errors import SelfExtendError

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


# -- validation messages in the project's words ----------------------------------------------------

PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")
_BOUNDS = {"ge": "at least", "le": "at most", "gt": "more than", "lt": "less than"}
_WORDS = {
    "int_parsing": "{input!r} is not a whole number",
    "int_from_float": "{input!r} is not a whole number",
    "int_type": "{input!r} is not a whole number",
    "float_parsing": "{input!r} is not a number",
    "float_type": "{input!r} is not a number",
    "bool_parsing": "{input!r} is not true or false",
}


def plain_validation_message(message: str, cause=None) -> str:
    """A bad value's message as this project words it. Typer validates option values with
    pydantic, whose messages read "Value error, ..." or "Input should be greater than or equal
    to 1"; `cause` is the ValidationError behind `message`, when there is one."""
    first = _first_validation_error(cause)
    if first is not None:
        message = _reworded(first) or first.get("msg", message)
    for prefix in PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    if message.startswith("Input should be") and first is not None:
        message = f"{first.get('input')!r} should be" + message.removeprefix("Input should be")
    return message


def _first_validation_error(cause):
    try:
        errors = cause.errors(include_url=False) if cause is not None and hasattr(cause, "errors") else None
    except (TypeError, ValueError):
        return None
    return errors[0] if errors else None


def _reworded(error: dict):
    kind, value, ctx = error.get("type", ""), error.get("input"), error.get("ctx") or {}
    if kind in _WORDS:
        return _WORDS[kind].format(input=value)
    bound = next((key for key in _BOUNDS if key in ctx), None)
    if bound is not None and kind.endswith(("than", "than_equal")):
        return f"{value} must be {_BOUNDS[bound]} {ctx[bound]}"
    return None


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


def byte_size(value) -> int:
    """2G, 500M, 1.5GB or a number of bytes (k, M, G, T are powers of 1000)."""
    from selfextend_mlx.planning import parse_size

    try:
        return parse_size(value)
    except SelfExtendError:
        raise typer.BadParameter(f"{value!r} is not a size: write e.g. 2G, 500M or a number of bytes") from None


CacheMaxOpt = Annotated[
    Optional[int],
    typer.Option(
        "--cache-max",
        parser=byte_size,
        metavar="SIZE",
        help="Keep the document cache within SIZE, e.g. 2G or 500M: past it the least recently used entries "
        "go (default: $SELFEXTEND_CACHE_MAX or 10G).",
        show_default=False,
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
