"""`selfextend chat`, `ask` and `summarize`: talk with whole documents.

A chat reads its questions from a terminal (line editing and history, several-line questions
between triple quotes or pasted at once) or one per line from a pipe. `ask` and `summarize`
read the text piped into them when no file is given.
"""

import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (
    AllowRepeatsOpt,
    CacheDirOpt,
    Command,
    GroupSizeOpt,
    JsonOpt,
    KvBitsOpt,
    MaxInputOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    NoCacheOpt,
    PrefillStepOpt,
    ProgressOpt,
    QuestionOpt,
    QuietOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    UsageProblem,
    WindowOpt,
    answer_record,
    decode_line,
    document_cache,
    files_or_stdin,
    header,
    load_model,
    make_sampling,
    print_json,
    progress_bar,
    stats_line,
    status,
    stdin_is_piped,
    text_argument,
    write_out,
)

DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP = 512

ChatFilesArg = Annotated[
    list[str], typer.Argument(metavar="FILE", help="Text, Markdown, HTML or PDF files.", show_default=False)
]
FilesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="FILE",
        help="Text, Markdown, HTML or PDF files; - (or none, with text piped in) reads standard input.",
        show_default=False,
    ),
]


def open_documents(files, *, model, max_input=None, trust_remote_code=False):
    """Read the documents (bad files fail before the model loads), then load the model."""
    from selfextend_mlx.app.documents import read_documents

    documents = read_documents(files, max_bytes=max_input)
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


def open_session(
    files,
    *,
    model,
    system,
    cache_dir,
    no_cache,
    verbose,
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
        doc_cache=document_cache(cache_dir, no_cache),
        first_question=first_question,
        notice=status,
    )
    if verbose:
        status(header(session))
    return session


# -- chat ---------------------------------------------------------------------------------------

EXIT_WORDS = ("/bye", "/exit", "/quit", "/q", "exit", "quit")  # ollama's, llm's and the obvious ones
MULTILINE = '"""'
CHAT_HELP = '''\
/reset   forget the conversation, keep the documents
/info    model, settings, tokens used and KV cache size
/help    this list
/bye     leave (also /exit, /quit, exit, quit or Ctrl-D)
"""      start a question of several lines; end it with """ (a pasted block is one question too)
Ctrl-C stops an answer; the up and down arrows bring back earlier questions.'''


def chat(
    files: ChatFilesArg,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    max_input: MaxInputOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_repeats: AllowRepeatsOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Chat about documents: read them once, then ask as many questions as you like.

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
    """
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
    sampling = make_sampling(
        max_tokens=max_tokens, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, allow_repeats=allow_repeats
    )
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
            more = self._next("... ")
            if more is None:
                break
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[: -len(MULTILINE)])
                break
            lines.append(more)
            size += len(more) + 1
            if size > limit:  # the one input cap, for questions of many lines too
                check_text_size("\n".join(lines), "the question")
        return "\n".join(lines).strip()


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
    (kept in memory only when that folder cannot be written)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    path = history_file or history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    session = PromptSession(history=history, input=input, output=output)
    return lambda prompt: session.prompt(prompt)


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
    if answer.finish_reason == "repetition" and not quiet:
        status("(the answer was repeating itself: stopped)")


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
        f"documents: {names} ({source})",
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


# -- ask and summarize -------------------------------------------------------------------------


def ask(
    files: FilesArg = None,
    question: QuestionOpt = None,
    json_output: JsonOpt = False,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    max_input: MaxInputOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_repeats: AllowRepeatsOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Ask one question about documents; the answer streams to stdout.

    With no file, the text piped in is the document. stderr gets a header line (model,
    tokens, settings, memory), reading progress and a stats line; --quiet leaves it to errors.

    Examples:

    \b
        selfextend ask docs/examples/bakery.md -q "What is the secret ingredient in the apple cake?"
        cat docs/examples/bakery.md | selfextend ask -q "When did the bakery open?" --json
        selfextend ask docs/examples/bakery.md docs/examples/bakery-minutes.md -q "What was decided about the oven?"
    """
    files = files_or_stdin(files, "ask")
    if question is None:
        if stdin_is_piped() or "-" in files:
            raise UsageProblem(
                'give the question with -q, for example: selfextend ask FILE -q "What is it about?" '
                "(see selfextend ask --help)"
            )
        question = text_argument(typer.prompt("Question"))
    _run_document_task("ask", files, question, locals())


class Style(StrEnum):
    bullets = "bullets"
    paragraph = "paragraph"


SUMMARY_REQUESTS = {
    Style.bullets: "Summarize the text above as a list of short bullet points, one line per main point, "
    "each starting with '- '. Cover the whole text, not just its beginning.",
    Style.paragraph: "Summarize the text above in one concise paragraph that covers the whole text, "
    "not just its beginning.",
}


def summarize(
    files: FilesArg = None,
    style: Annotated[Style, typer.Option("--style", help="bullets or paragraph.")] = Style.bullets,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    json_output: JsonOpt = False,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    max_input: MaxInputOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_repeats: AllowRepeatsOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
):
    """Summarize documents as bullet points or one paragraph.

    With no file, the text piped in is summarized.

    Examples:

    \b
        selfextend summarize docs/examples/bakery-minutes.md
        selfextend summarize docs/examples/bakery.md --style paragraph --max-tokens 120
        cat docs/examples/bakery.md | selfextend summarize --json
    """
    _run_document_task("summarize", files_or_stdin(files, "summarize"), SUMMARY_REQUESTS[style], locals())


SAMPLING_PARAMETERS = ("max_tokens", "temp", "top_p", "top_k", "min_p", "seed", "allow_repeats")
RUN_PARAMETERS = (
    "json_output",
    "progress",
    "quiet",
    "model",
    "system",
    "group_size",
    "window",
    "max_tokens",
    "kv_bits",
    "prefill_step_size",
    "cache_dir",
    "no_cache",
    "max_input",
    "trust_remote_code",
)


def _run_document_task(task: str, files: list, question: str, parameters: dict) -> None:
    """ask and summarize share every option: each passes its own parameters (`locals()`), so a new
    option is added to both commands' signatures and to the tuples above, nowhere else."""
    sampling = make_sampling(**{name: parameters[name] for name in SAMPLING_PARAMETERS})
    _answer_once(files, question, task=task, sampling=sampling, **{name: parameters[name] for name in RUN_PARAMETERS})


def _answer_once(
    files,
    question,
    *,
    json_output,
    progress,
    task,
    quiet=False,
    sampling,
    model,
    system,
    cache_dir,
    no_cache,
    max_input=None,
    trust_remote_code=False,
    **options,
) -> None:
    """One answer about documents of any length: read whole when they fit the model's reach,
    else by the task's strategy (ask: the most relevant passages; summarize: map-reduce)."""
    documents, loaded_model, tokenizer = open_documents(
        files, model=model, max_input=max_input, trust_remote_code=trust_remote_code
    )
    from selfextend_mlx.app.longdoc import LongDocument, SummaryMemo  # after the documents, as above

    doc_cache = document_cache(cache_dir, no_cache)
    memo = SummaryMemo(doc_cache.directory / "summaries" if doc_cache is not None else None, status)
    notice = (lambda message: None) if quiet else status
    long = LongDocument(
        loaded_model,
        tokenizer,
        documents,
        question,
        task=task,
        options=session_options(**options),
        system=system,
        doc_cache=doc_cache,
        memo=memo,
        notice=notice,
    )
    if not quiet and long.describe():
        status(long.describe())
    result = long.answer(
        sampling,
        on_text=(lambda text: None) if json_output else write_out,
        on_progress=progress_bar("reading", quiet, progress),
        on_session=None if quiet else (lambda session: status(header(session))),
    )
    if json_output:
        print_json(document_answer_record(task, result))
    else:
        write_out("\n")
    if not quiet:
        status(stats_line(result.answer))


def document_answer_record(task: str, result) -> dict:
    """--json of ask and summarize: the answer's record, how it was reached, the whole document's size."""
    record = answer_record(result.session, result.answer)
    record.update(strategy=result.strategy, document_tokens=result.document_tokens)
    if result.parts is not None:
        record.update(parts=result.parts, levels=result.levels)
    if result.selected_tokens is not None:
        record.update(
            selected_tokens=result.selected_tokens,
            selected_passages=result.selected_passages,
            total_passages=result.total_passages,
        )
    if task == "summarize":
        record = {"summary": record.pop("answer"), **record}
    return record


def register(app: typer.Typer) -> None:
    app.command(cls=Command)(chat)
    app.command(cls=Command)(ask)
    app.command(cls=Command)(summarize)
