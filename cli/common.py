"""Pieces every command shares besides its options (cli/options.py), what it prints
(cli/output.py) and its progress bar (cli/progress.py): the help layout, the usage error,
standard input (a document command given no file reads the text piped into it), loading the
model and the document cache.
"""

import sys
from pathlib import Path
from typing import Optional

from typer.core import TyperCommand

from selfextend_mlx.errors import SelfExtendError

from .output import status, terminal_text


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
        sys.stderr.write(f"loading {terminal_text(model_ref or 'the default model')}...")
        sys.stderr.flush()
    try:
        # a plain load() in a single process
        return distributed.load_sharded(model_ref, trust_remote_code=trust_remote_code)
    finally:
        if interactive:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def document_cache(cache_dir: Optional[Path], no_cache: bool, cache_max: Optional[int] = None, quiet: bool = False):
    """The run's document cache (None with --no-cache). Its warnings always reach stderr; the
    line that says what a write stored and evicted does unless --quiet."""
    from selfextend_mlx.loading.distributed import ranks

    if no_cache or ranks() > 1:  # a sharded run's cache holds one rank's heads: never shared
        return None
    from selfextend_mlx.app.doccache import DocumentCache

    return DocumentCache(cache_dir, notice=status, max_bytes=cache_max, report=None if quiet else status)


def open_documents(files, *, model, max_input=None, trust_remote_code=False):
    """Read the documents (bad files fail before the model loads; none: a chat without one),
    then load the model."""
    from selfextend_mlx.app.documents import read_documents

    documents = read_documents(files, max_bytes=max_input) if files else []
    loaded_model, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    return documents, loaded_model, tokenizer


def session_options(*, group_size, window, max_tokens, kv_bits, prefill_step_size):
    from selfextend_mlx.app.session import SessionOptions

    return SessionOptions(
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
    )
