"""The `selfextend` command: chat with, ask and summarize long documents with a local model.

Errors a user can cause end in one line on stderr and a non-zero exit; --debug (anywhere on
the command line) shows the traceback instead.
"""

import errno
import os
import sys
import traceback

# Set before transformers loads: its "sequence longer than the model's maximum" warning is
# exactly what SelfExtend is for.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from . import bench_cmd, cache_cmd, chat_cmd, eval_cmd, generate_cmd, models_cmd  # noqa: E402
from . import serve_cmd  # noqa: E402

DEBUG_FLAG = "--debug"
EXIT_INTERRUPTED = 130


class _OneLineErrors(TyperGroup):
    """Runs the command and turns every failure into one `error: ...` line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = DEBUG_FLAG in args or bool(os.environ.get("SELFEXTEND_DEBUG"))
        args = [arg for arg in args if arg != DEBUG_FLAG]
        try:
            result = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
            code = result if isinstance(result, int) else 0
            if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code
                _error("interrupted", prefix="")
        except KeyboardInterrupt:
            _error("interrupted", prefix="")
            code = EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, without a second error at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 1
        except Exception as error:
            from selfextend_mlx.errors import SelfExtendError

            if _is_click(error, "Abort"):  # Ctrl-C or end of input at a prompt
                _error("interrupted", prefix="")
                return _finish(EXIT_INTERRUPTED, standalone_mode)
            if _is_click(error, "ClickException"):  # bad flags and arguments: click's message
                command = f" {error.ctx.command_path}" if getattr(error, "ctx", None) else " selfextend"
                hint = f" (see{command} --help)" if _is_click(error, "UsageError") else ""
                _error(error.format_message().replace("\n", " ") + hint)
                return _finish(error.exit_code, standalone_mode)
            if debug:
                traceback.print_exc()
            if isinstance(error, SelfExtendError):
                _error(str(error))
            elif isinstance(error, OSError) and error.errno == errno.ENOSPC:
                _error(f"no space left on the device: {error.filename or ''}".rstrip(": "))
            else:
                _error(
                    f"{type(error).__name__}: {error}"
                    + ("" if debug else f" (run with {DEBUG_FLAG} for the traceback)")
                )
            code = 1
        return _finish(code, standalone_mode)


def _finish(code: int, standalone_mode: bool):
    if standalone_mode:
        sys.exit(code)
    return code


def _is_click(error: Exception, name: str) -> bool:
    """Whether `error` is click's `name` exception, from click itself or the copy Typer vendors."""
    return any(cls.__name__ == name and cls.__module__.endswith("exceptions") for cls in type(error).__mro__)


def _error(message: str, prefix: str = "error: ") -> None:
    sys.stdout.flush()
    print(f"{prefix}{message}", file=sys.stderr, flush=True)


app = typer.Typer(
    cls=_OneLineErrors,
    name="selfextend",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, DEBUG_FLAG, help="Show the full traceback when something fails."),
):
    """Chat with, ask and summarize long documents with a local model, beyond its trained context (SelfExtend).

    Examples:

    \b
        selfextend chat report.pdf
        selfextend ask book.txt -q "Who is the narrator?" --json
        cat notes.md | selfextend summarize -
    """


chat_cmd.register(app)
generate_cmd.register(app)
cache_cmd.register(app)
models_cmd.register(app)
eval_cmd.register(app)
bench_cmd.register(app)
serve_cmd.register(app)


def run() -> None:
    from selfextend_mlx.loading.blas import reexec_with_openblas

    reexec_with_openblas()
    app(prog_name="selfextend")
