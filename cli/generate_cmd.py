"""`selfextend generate`: mlx_lm.generate's flags, with SelfExtend."""

from typing import Annotated, Optional

import typer

from .common import (
    GroupSizeOpt,
    JsonOpt,
    KvBitsOpt,
    ModelOpt,
    PrefillStepOpt,
    ProgressBar,
    ProgressOpt,
    SeedOpt,
    TempOpt,
    TopPOpt,
    WindowOpt,
    answer_record,
    header,
    load_model,
    make_sampling,
    print_json,
    read_stdin_text,
    show_status,
    status,
    write_out,
)


def generate(
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt; - reads it from standard input.", show_default=False)
    ],
    model: ModelOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Most tokens to generate.")] = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    prefill_step_size: PrefillStepOpt = 512,
    kv_bits: KvBitsOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system_prompt: Annotated[
        Optional[str], typer.Option("--system-prompt", help="System prompt (chat models).", show_default=False)
    ] = None,
    ignore_chat_template: Annotated[
        bool, typer.Option("--ignore-chat-template", help="Feed the prompt as it is, without the chat template.")
    ] = False,
    json_output: JsonOpt = False,
    progress: ProgressOpt = None,
):
    """Generate text from a prompt, like mlx_lm.generate, with SelfExtend for long prompts.

    Examples:

    \b
        selfextend generate --prompt "Write a haiku about memory."
        cat long_prompt.txt | selfextend generate --prompt - --max-tokens 100 --temp 0.7 --seed 1
    """
    from selfextend_mlx.app.session import Session, SessionOptions
    from selfextend_mlx.errors import SelfExtendError

    if prompt == "-":
        prompt = read_stdin_text()
    if not prompt.strip():
        raise SelfExtendError("the prompt is empty")
    verbose = show_status(progress)
    loaded_model, tokenizer = load_model(model)
    options = SessionOptions(
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        use_chat_template=not ignore_chat_template,
    )
    session = Session(
        loaded_model, tokenizer, system=system_prompt, options=options, first_question=prompt, notice=status
    )
    if verbose:
        status(header(session))
    sampling = make_sampling(max_tokens, temp, top_p, seed)
    answer = session.ask(
        prompt,
        sampling,
        on_text=(lambda text: None) if json_output else write_out,
        on_progress=ProgressBar("prompt") if verbose else None,
    )
    if json_output:
        record = answer_record(session, answer)
        record["text"] = record.pop("answer")
        for key in ("document_tokens", "document_cache"):
            record.pop(key)
        print_json(record)
    else:
        write_out("\n")
    if verbose:
        status(
            f"prompt: {answer.prompt_tokens:,} tokens, {answer.prompt_tps:,.1f} tokens-per-sec | "
            f"generation: {answer.generation_tokens:,} tokens, {answer.generation_tps:,.1f} tokens-per-sec | "
            f"peak memory: {answer.peak_memory_bytes / 1e9:.3f} GB"
        )


def register(app: typer.Typer) -> None:
    app.command()(generate)
