"""`selfextend chat`, `ask` and `summarize`: talk with whole documents."""

import sys
from enum import StrEnum
from typing import Annotated, Optional

import typer

from .common import (
    CacheDirOpt,
    GroupSizeOpt,
    JsonOpt,
    KvBitsOpt,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
    PrefillStepOpt,
    ProgressBar,
    ProgressOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    TopPOpt,
    WindowOpt,
    answer_record,
    document_cache,
    header,
    load_model,
    make_sampling,
    print_json,
    show_status,
    status,
    write_out,
)

DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP = 512

ChatFilesArg = Annotated[
    list[str], typer.Argument(metavar="FILE", help="Text, Markdown, HTML or PDF files.", show_default=False)
]
FilesArg = Annotated[
    list[str],
    typer.Argument(
        metavar="FILE", help="Text, Markdown, HTML or PDF files; - reads standard input.", show_default=False
    ),
]


def open_session(
    files,
    *,
    model,
    system,
    group_size,
    window,
    max_tokens,
    kv_bits,
    prefill_step_size,
    cache_dir,
    no_cache,
    verbose,
    first_question=None,
):
    """Read the documents (bad files fail before the model loads), load the model, plan the run."""
    from selfextend_mlx.app.documents import read_documents
    from selfextend_mlx.app.session import Session, SessionOptions

    documents = read_documents(files)
    loaded_model, tokenizer = load_model(model)
    options = SessionOptions(
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
    )
    session = Session(
        loaded_model,
        tokenizer,
        documents,
        system=system,
        options=options,
        doc_cache=document_cache(cache_dir, no_cache),
        first_question=first_question,
        notice=status,
    )
    if verbose:
        status(header(session))
    return session


# -- chat ---------------------------------------------------------------------------------------

CHAT_HELP = """\
/reset  forget the conversation, keep the documents
/info   model, settings, tokens used and cache size
/quit   leave (or Ctrl-D); Ctrl-C stops an answer"""


def chat(
    files: ChatFilesArg,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
):
    """Chat about documents: read them once, then ask as many questions as you like.

    The documents are read into the model once (and saved in the document cache, so the next
    chat about them starts at once); each question then costs only its own tokens. Questions
    come one per line from the terminal, or from a pipe. In the chat: /reset, /info, /quit.

    Examples:

    \b
        selfextend chat thesis.pdf
        selfextend chat chapter1.md chapter2.md --system "Answer in French."
        printf 'Who is the narrator?\\nWhere does it end?\\n' | selfextend chat book.txt
    """
    if "-" in files:
        from selfextend_mlx.errors import DocumentError

        raise DocumentError("chat reads its questions from standard input: give the documents as files (or use ask -)")
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
        verbose=True,
    )
    source = session.prepare(ProgressBar("reading"))
    if source == "cache":
        status("document read from the cache: no prefill needed")
    interactive = sys.stdin.isatty()
    if interactive:
        status("ask a question (/help for commands)")
    sampling = make_sampling(max_tokens, temp, top_p, seed)
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        question = line.strip()
        if not question:
            continue
        if question.startswith("/"):
            if not _chat_command(session, question):
                break
            continue
        _answer(session, question, sampling, interactive)


def _read_line(interactive: bool) -> Optional[str]:
    """The next question, or None at the end of input."""
    while True:
        try:
            if interactive:
                return input("> " if sys.stdout.isatty() else "")
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            if not interactive:
                raise
            status("\n(/quit or Ctrl-D to leave)")


def _answer(session, question, sampling, interactive) -> None:
    from selfextend_mlx.errors import InputTooLongError

    try:
        session.ask(question, sampling, on_text=write_out, on_progress=ProgressBar("reading") if interactive else None)
    except KeyboardInterrupt:
        write_out("\n")
        status("(answer stopped)")
        return
    except InputTooLongError as error:
        status(f"error: {error}")
        return
    write_out("\n\n" if not interactive else "\n")


def _chat_command(session, command: str) -> bool:
    """Run an in-chat command; False means leave."""
    name = command.split()[0].lower()
    if name in ("/quit", "/exit", "/q"):
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
    from selfextend_mlx.core.cache import cache_nbytes
    from selfextend_mlx.planning import format_bytes

    plan = session.plan
    cache = format_bytes(cache_nbytes(session.cache)) if session.cache is not None else "empty"
    names = ", ".join(doc.name for doc in session.documents)
    source = {"cache": "read from the document cache", "prefill": "prefilled"}.get(
        session.document_source, "not reused"
    )
    lines = [
        header(session),
        f"documents: {names} ({source})",
        f"conversation: {len(session.history)} turn{'' if len(session.history) == 1 else 's'}, "
        f"{session.conversation_tokens:,} tokens in the KV cache "
        f"({cache}), {plan.max_length - session.conversation_tokens:,} left before N_max",
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
    files: FilesArg,
    question: Annotated[
        Optional[str], typer.Option("--question", "-q", help="The question.", show_default=False)
    ] = None,
    json_output: JsonOpt = False,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    progress: ProgressOpt = None,
):
    """Ask one question about documents; the answer streams to stdout.

    Examples:

    \b
        selfextend ask report.pdf -q "What were the three main risks?"
        curl -s https://example.com/page.html | selfextend ask - -q "Summarize the pricing" --json
        selfextend ask a.md b.md -q "Where do these two notes disagree?"
    """
    if question is None:
        if not sys.stdin.isatty() or "-" in files:
            from selfextend_mlx.errors import SelfExtendError

            raise SelfExtendError('give the question with -q, for example: selfextend ask FILE -q "What is it about?"')
        question = typer.prompt("Question")
    _answer_once(
        files,
        question,
        json_output,
        progress,
        model=model,
        system=system,
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        cache_dir=cache_dir,
        no_cache=no_cache,
        sampling=make_sampling(max_tokens, temp, top_p, seed),
    )


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
    files: FilesArg,
    style: Annotated[Style, typer.Option("--style", help="bullets or paragraph.")] = Style.bullets,
    max_tokens: MaxTokensOpt = DEFAULT_MAX_TOKENS,
    json_output: JsonOpt = False,
    model: ModelOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: SystemOpt = None,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    kv_bits: KvBitsOpt = None,
    prefill_step_size: PrefillStepOpt = DEFAULT_PREFILL_STEP,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    progress: ProgressOpt = None,
):
    """Summarize documents as bullet points or one paragraph.

    Examples:

    \b
        selfextend summarize minutes.md
        selfextend summarize paper.pdf --style paragraph --max-tokens 200
        pbpaste | selfextend summarize - --json
    """
    _answer_once(
        files,
        SUMMARY_REQUESTS[style],
        json_output,
        progress,
        model=model,
        system=system,
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        cache_dir=cache_dir,
        no_cache=no_cache,
        sampling=make_sampling(max_tokens, temp, top_p, seed),
    )


def _answer_once(files, question, json_output, progress, *, sampling, **session_args) -> None:
    verbose = show_status(progress)
    session = open_session(files, verbose=verbose, first_question=question, **session_args)
    bar = ProgressBar("reading") if verbose else None
    answer = session.ask(question, sampling, on_text=(lambda text: None) if json_output else write_out, on_progress=bar)
    if json_output:
        print_json(answer_record(session, answer))
    else:
        write_out("\n")
    if verbose:
        status(
            f"prompt {answer.prompt_tokens:,} tokens ({answer.prefilled_tokens:,} computed, "
            f"{answer.prompt_tps:,.1f} tok/s), "
            f"answer {answer.generation_tokens:,} tokens ({answer.generation_tps:,.1f} tok/s), "
            f"peak memory {answer.peak_memory_bytes / 1e9:.2f} GB"
        )


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.command()(ask)
    app.command()(summarize)
