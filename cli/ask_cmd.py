"""`selfextend ask` and `summarize`: one answer about documents of any length, read whole when
they fit the model's reach, else by the task's strategy (ask: the most relevant passages;
summarize: map-reduce). With no file they read the text piped in.
"""

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import MAX_TOKENS, PREFILL_STEP

from .common import (
    Command,
    UsageProblem,
    document_cache,
    files_or_stdin,
    open_documents,
    session_options,
    stdin_is_piped,
)
from .options import (
    AllowRepeatsOpt,
    CacheDirOpt,
    CacheMaxOpt,
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
    WindowOpt,
    make_sampling,
    text_argument,
)
from .output import answer_record, header, print_json, stats_line, status, write_out
from .progress import progress_bar

FilesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="FILE",
        help="Text, Markdown, HTML or PDF files; - (or none, with text piped in) reads standard input.",
        show_default=False,
    ),
]


def ask(
    files: FilesArg = None,
    question: QuestionOpt = None,
    json_output: JsonOpt = False,
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
    _answer_once(
        DocumentTask(
            "ask",
            files,
            question,
            Output(json_output, progress, quiet),
            Source(model, system, max_input, trust_remote_code, cache_dir, no_cache, cache_max),
            session_options(
                group_size=group_size,
                window=window,
                max_tokens=max_tokens,
                kv_bits=kv_bits,
                prefill_step_size=prefill_step_size,
            ),
            make_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, allow_repeats=allow_repeats),
        )
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
    files: FilesArg = None,
    style: Annotated[Style, typer.Option("--style", help="bullets or paragraph.")] = Style.bullets,
    max_tokens: MaxTokensOpt = MAX_TOKENS,
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
    """Summarize documents as bullet points or one paragraph.

    With no file, the text piped in is summarized.

    Examples:

    \b
        selfextend summarize docs/examples/bakery-minutes.md
        selfextend summarize docs/examples/bakery.md --style paragraph --max-tokens 120
        cat docs/examples/bakery.md | selfextend summarize --json
    """
    _answer_once(
        DocumentTask(
            "summarize",
            files_or_stdin(files, "summarize"),
            SUMMARY_REQUESTS[style],
            Output(json_output, progress, quiet),
            Source(model, system, max_input, trust_remote_code, cache_dir, no_cache, cache_max),
            session_options(
                group_size=group_size,
                window=window,
                max_tokens=max_tokens,
                kv_bits=kv_bits,
                prefill_step_size=prefill_step_size,
            ),
            make_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, allow_repeats=allow_repeats),
        )
    )


@dataclass(frozen=True)
class Output:
    """Where a run's words go: --json, the progress bar, --quiet."""

    json: bool
    progress: bool
    quiet: bool


@dataclass(frozen=True)
class Source:
    """What a run reads: the model, the system text, the input cap and the document cache."""

    model: Optional[str]
    system: Optional[str]
    max_input: Optional[str]
    trust_remote_code: bool
    cache_dir: Optional[Path]
    no_cache: bool
    cache_max: Optional[int] = None


@dataclass(frozen=True)
class DocumentTask:
    """Everything ask and summarize were asked for."""

    task: str  # "ask" or "summarize"
    files: list
    question: str
    output: Output
    source: Source
    options: object  # selfextend_mlx.app.session.SessionOptions (imported late: --help stays light)
    sampling: object  # selfextend_mlx.app.generation.Sampling


def _answer_once(run: DocumentTask) -> None:
    """One answer about documents of any length: read whole when they fit the model's reach,
    else by the task's strategy (ask: the most relevant passages; summarize: map-reduce)."""
    source, output = run.source, run.output
    documents, loaded_model, tokenizer = open_documents(
        run.files, model=source.model, max_input=source.max_input, trust_remote_code=source.trust_remote_code
    )
    from selfextend_mlx.app.longdoc import LongDocument  # after the documents: a bad one fails at once
    from selfextend_mlx.app.summaries import SummaryMemo

    doc_cache = document_cache(source.cache_dir, source.no_cache, source.cache_max, output.quiet)
    memo = SummaryMemo(doc_cache.directory / "summaries" if doc_cache is not None else None, status)
    long = LongDocument(
        loaded_model,
        tokenizer,
        documents,
        run.question,
        task=run.task,
        options=run.options,
        system=source.system,
        doc_cache=doc_cache,
        memo=memo,
        notice=(lambda message: None) if output.quiet else status,
    )
    if not output.quiet and long.describe():
        status(long.describe())
    result = long.answer(
        run.sampling,
        on_text=(lambda text: None) if output.json else write_out,
        on_progress=progress_bar("reading", output.quiet, output.progress),
        on_session=None if output.quiet else (lambda session: status(header(session))),
    )
    if output.json:
        print_json(document_answer_record(run.task, result))
    else:
        write_out("\n")
    if not output.quiet:
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
    app.command(cls=Command)(ask)
    app.command(cls=Command)(summarize)
