"""`selfextend chat`: talk with whole documents.

A chat reads its questions from a terminal (line editing and history, several-line questions
between triple quotes or pasted at once) or one per line from a pipe. One question about a
document of any length is `ask` (cli/ask_cmd.py).
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import MAX_TOKENS, PREFILL_STEP

from .common import (
    Command,
    UsageProblem,
    document_cache,
    open_documents,
    session_options,
    stdin_is_piped,
)
from .options import (
    AllowRepeatsOpt,
    CacheDirOpt,
    CacheMaxOpt,
    GroupSizeOpt,
    KvBitsOpt,
    MaxInputOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    NoCacheOpt,
    PrefillStepOpt,
    ProgressOpt,
    QuietOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    decode_line,
    make_sampling,
    text_argument,
)
from .output import header, stats_line, status, write_out
from .progress import progress_bar

ChatFilesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="FILE",
        help="Text, Markdown, HTML or PDF files (none: a chat with the model alone).",
        show_default=False,
    ),
]
FilesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="FILE",
        help="Text, Markdown, HTML or PDF files; - (or none, with text piped in) reads standard input.",
        show_default=False,
    ),
]


def open_session(
    files,
    *,
    model,
    system,
    cache_dir,
    no_cache,
    verbose,
    cache_max=None,
    max_input=None,
    trust_remote_code=False,
    first_question=None,
    **options,
):
    """Read the documents, load the model, plan the run (a chat: the documents must fit whole)."""
    documents, loaded_model, tokenizer = open_documents(
        files, model=model, max_input=max_input, trust_remote_code=trust_remote_code
    )
    from selfextend_mlx.app.session import Session  # after the documents: a bad one fails at once

    session = Session(
        loaded_model,
        tokenizer,
        documents,
        system=system,
        options=session_options(**options),
        doc_cache=document_cache(cache_dir, no_cache, cache_max, quiet=not verbose),
        first_question=first_question,
        notice=status,
    )
    if verbose:
        status(header(session))
    return session


# -- chat ---------------------------------------------------------------------------------------

EXIT_WORDS = ("/bye", "/exit", "/quit", "/q", "exit", "quit")  # ollama's, llm's and the obvious ones
MULTILINE = '"""'
CONTINUED = "... "  # the prompt of a question's further lines
CHAT_HELP = '''\
/reset   forget the conversation, keep the documents
/info    model, settings, tokens used and KV cache size
/help    this list
/bye     leave (also /exit, /quit, exit, quit or Ctrl-D)
"""      start a question of several lines; end it with """ (a pasted block is one question too)
Ctrl-C stops an answer; the up and down arrows bring back earlier questions.'''


def chat(
    files: ChatFilesArg = None,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = MAX_TOKENS,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    cache_max: CacheMaxOpt = None,
    max_input: MaxInputOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_repeats: AllowRepeatsOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Chat about documents (or with the model alone): read them once, then ask away.

    The documents are read into the model once (and saved in the document cache, so the next
    chat about them starts at once); each question then costs only its own tokens. At a
    terminal you get line editing and history; a question of several lines goes between
    triple quotes (or paste it); /bye leaves. Questions may also come one per line from a
    pipe. In the chat: /reset, /info, /help, /bye.

    Examples:

    \b
        selfextend chat docs/examples/bakery.md
        selfextend chat docs/examples/bakery.md docs/examples/bakery-minutes.md -s "Answer in one sentence."
        printf 'Who founded the bakery?\\nWhat is in the apple cake?\\n' | selfextend chat docs/examples/bakery.md
        printf 'Write a haiku about bread.\\n' | selfextend chat -n 40
    """
    files = files or []
    if "-" in files:
        raise UsageProblem(
            "chat reads its questions from standard input: give the documents as files (or use ask -) "
            "(see selfextend chat --help)"
        )
    session = open_session(
        files,
        model=model,
        system=system,
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        cache_dir=cache_dir,
        no_cache=no_cache,
        cache_max=cache_max,
        max_input=max_input,
        trust_remote_code=trust_remote_code,
        verbose=not quiet,
    )
    source = session.prepare(progress_bar("reading", quiet, progress))
    if source == "cache" and not quiet:
        status("document read from the cache: no prefill needed")
    questions = Questions.for_this_terminal()
    if questions.interactive:
        status("ask a question (/help for commands, /bye to leave)")
    sampling = make_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, allow_repeats=allow_repeats)
    for question in questions:
        if question.startswith("/") or question.lower() in EXIT_WORDS:
            if not _chat_command(session, question):
                break
            continue
        _answer(session, question, sampling, questions.interactive, quiet)


class Questions:
    """A chat's questions, one at a time: from a terminal through prompt_toolkit (line editing,
    history kept across chats, a pasted block read as one question), or lines from a pipe.
    Either way a question between lines of triple quotes may span several lines, and text that
    is not UTF-8 is decoded (as Windows-1252) rather than ending the chat."""

    def __init__(self, read_line: Callable[[str], Optional[str]], interactive: bool):
        self.read_line, self.interactive = read_line, interactive

    @classmethod
    def for_this_terminal(cls) -> "Questions":
        if stdin_is_piped():
            return cls(lambda prompt: _read_piped_line(), interactive=False)
        if sys.stdout.isatty():
            return cls(_line_editor(), interactive=True)
        return cls(_plain_input, interactive=True)  # a terminal, answers going to a file

    def __iter__(self):
        while True:
            line = self._next("> ")
            if line is None:
                return
            question = self._gather(line.strip())
            if question:
                yield question

    def _next(self, prompt: str) -> Optional[str]:
        while True:
            try:
                line = self.read_line(prompt if self.interactive else "")
                return None if line is None else text_argument(line)
            except EOFError:
                return None
            except MemoryError:  # a line typed or pasted without end
                from selfextend_mlx.errors import DocumentError

                raise DocumentError("the line typed is too long for this machine's memory") from None
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                status("(/bye or Ctrl-D to leave)")

    def _gather(self, line: str) -> str:
        """One question: the line, or from a line that opens with triple quotes to the line that
        closes them (the end of input closes them too)."""
        from selfextend_mlx.app.documents import check_text_size, max_input_bytes

        if not line.startswith(MULTILINE):
            return check_text_size(line, "the question")
        body = line[len(MULTILINE) :]
        if body.rstrip().endswith(MULTILINE):  # """on one line"""
            return body.rstrip()[: -len(MULTILINE)].strip()
        lines, size, limit = [body], len(body), max_input_bytes()
        while True:
            more = self._next(CONTINUED)
            if more is None:
                break
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[: -len(MULTILINE)])
                break
            lines.append(more)
            size += len(more) + 1
            if size > limit:  # the one input cap, for questions of many lines too
                check_text_size("\n".join(lines), "the question")
        question = "\n".join(lines).strip()
        if question and hasattr(self.read_line, "remember"):
            self.read_line.remember(question)  # one history entry for the whole question
        return question


def _read_piped_line() -> Optional[str]:
    from selfextend_mlx.app.documents import read_line

    raw = read_line(sys.stdin.buffer, "the chat's input")
    return decode_line(raw).rstrip("\r\n") if raw else None


def _plain_input(prompt: str) -> str:
    return input("")


def history_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("selfextend-mlx")) / "chat_history"


def _line_editor(input=None, output=None, history_file: Optional[Path] = None):
    """prompt_toolkit's line reader: arrows, Ctrl-R search and history saved in history_path()
    (kept in memory only when that folder cannot be written). A question's first line is read
    with the history; the lines of a triple-quoted question after it are not kept, and the
    whole question becomes one history entry instead (remember()), so the up arrow brings it
    back whole."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    class QuestionHistory(FileHistory):
        def append_string(self, string: str) -> None:
            if not string.lstrip().startswith(MULTILINE):  # the opening of a longer question
                super().append_string(string)

    path = history_file or history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = QuestionHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    first = PromptSession(history=history, input=input, output=output)
    more = PromptSession(history=InMemoryHistory(), input=input, output=output)

    def read(prompt: str) -> str:
        return (more if prompt == CONTINUED else first).prompt(prompt)

    read.remember = history.append_string
    return read


def _answer(session, question, sampling, interactive, quiet) -> None:
    from selfextend_mlx.errors import InputTooLongError

    try:
        answer = session.ask(
            question,
            sampling,
            on_text=write_out,
            on_progress=progress_bar("reading", quiet) if interactive else None,
        )
    except KeyboardInterrupt:
        write_out("\n")
        status("(answer stopped)")
        return
    except InputTooLongError as error:
        status(f"error: {error}")
        return
    write_out("\n\n" if not interactive else "\n")
    if not quiet:
        status(stats_line(answer))  # as after ask and generate: what it cost and why it ended


def _chat_command(session, command: str) -> bool:
    """Run an in-chat command; False means leave."""
    name = command.split()[0].lower()
    if name in EXIT_WORDS:
        return False
    if name == "/reset":
        session.reset()
        status("conversation cleared; the documents are still loaded")
    elif name == "/info":
        print(_info(session), flush=True)
    elif name in ("/help", "/?"):
        print(CHAT_HELP, flush=True)
    else:
        status(f"unknown command {name}: try /help")
    return True


def _info(session) -> str:
    from selfextend_mlx.planning import format_bytes, kv_cache_bytes

    plan = session.plan
    held = session.conversation_tokens
    # planning's size of a cache holding these tokens: the same tokens always give the same
    # figure, whatever the buffers grew to on the way
    cache = (
        f"~{format_bytes(kv_cache_bytes(session.info.shape, held, plan.settings, session.options.kv_bits))}"
        if session.cache is not None
        else "empty"
    )
    names = ", ".join(doc.name for doc in session.documents)
    source = {"cache": "read from the document cache", "prefill": "prefilled"}.get(
        session.document_source, "not reused"
    )
    lines = [
        header(session),
        f"documents: {names} ({source})" if names else "documents: none (a chat with the model alone)",
        f"conversation: {len(session.history)} turn{'' if len(session.history) == 1 else 's'}, "
        f"{held:,} tokens in the KV cache ({cache}), {plan.max_length - held:,} left before N_max",
    ]
    last = getattr(session, "last_answer", None)
    if last is not None:
        lines.append(
            f"last turn: prompt {last.prompt_tokens:,} tokens, {last.prefilled_tokens:,} computed and "
            f"{last.prompt_tokens - last.prefilled_tokens:,} reused from the cache; answer {last.generation_tokens:,} "
            f"tokens at {last.generation_tps:,.1f} tok/s"
        )
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command(cls=Command)(chat)
