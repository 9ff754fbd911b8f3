"""`selfextend generate`: mlx_lm.generate's flags, with SelfExtend.

Taken as mlx_lm.generate takes them: --prompt/-p (`-` reads stdin), --max-tokens, --temp,
--top-p, --min-p, --top-k, --min-tokens-to-keep, --xtc-probability, --xtc-threshold,
--seed, --system-prompt, --ignore-chat-template, --extra-eos-token, --adapter-path,
--prefill-step-size, --kv-bits, --trust-remote-code and --verbose True/False. Spelled differently: -m is --model
here (as in llm) and -n is --max-tokens. The others are left out on purpose (docs/cli.md
says why for each).
"""

from dataclasses import replace
from typing import Annotated, Optional

import typer

from selfextend_mlx.defaults import PREFILL_STEP

from .common import Command, UsageProblem, load_model, read_stdin_text, stdin_is_piped
from .options import (
    AllowRepeatsOpt,
    GroupSizeOpt,
    JsonOpt,
    KvBitsOpt,
    MaxInputOpt,
    MaxTokensOpt,
    MinPOpt,
    ModelOpt,
    PrefillStepOpt,
    ProgressOpt,
    QuietOpt,
    SeedOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrustRemoteCodeOpt,
    WindowOpt,
    finite_number,
    make_sampling,
    text_argument,
)
from .output import answer_record, header, print_json, stats_line, status, write_out
from .progress import progress_bar

TRUE, FALSE = ("true", "t", "yes", "y", "1"), ("false", "f", "no", "n", "0")


def _flag_value(value) -> bool:
    """mlx_lm.generate's `--verbose True|False`."""
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise typer.BadParameter(f"{value!r}: give True or False", param_hint="--verbose")


def generate(
    text: Annotated[
        Optional[str],
        typer.Argument(
            metavar="PROMPT",
            parser=text_argument,
            help="The prompt (or give it with -p, as mlx_lm.generate takes it).",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(
            "--prompt",
            "-p",
            parser=text_argument,
            metavar="TEXT",
            help="The prompt; - (or none, with text piped in) reads it from standard input.",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temp: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    min_p: MinPOpt = 0.0,
    min_tokens_to_keep: Annotated[
        int, typer.Option("--min-tokens-to-keep", min=1, metavar="N", help="Tokens --min-p always keeps.")
    ] = 1,
    xtc_probability: Annotated[
        float,
        typer.Option(
            "--xtc-probability",
            parser=finite_number(0.0, 1.0),
            metavar="P",
            help="XTC sampling: how often to drop the likeliest tokens.",
        ),
    ] = 0.0,
    xtc_threshold: Annotated[
        float,
        typer.Option(
            "--xtc-threshold",
            parser=finite_number(0.0, 0.5),
            metavar="P",
            help="XTC sampling: tokens above this probability may be dropped.",
        ),
    ] = 0.1,
    seed: SeedOpt = None,
    prefill_step_size: PrefillStepOpt = PREFILL_STEP,
    kv_bits: KvBitsOpt = None,
    group_size: GroupSizeOpt = None,
    window: WindowOpt = None,
    system: Annotated[
        Optional[str],
        typer.Option(
            "--system",
            "-s",
            "--system-prompt",
            parser=text_argument,
            metavar="TEXT",
            help="System prompt (chat models).",
            show_default=False,
        ),
    ] = None,
    ignore_chat_template: Annotated[
        bool, typer.Option("--ignore-chat-template", help="Feed the prompt as it is, without the chat template.")
    ] = False,
    extra_eos_token: Annotated[
        Optional[list[str]],
        typer.Option(
            "--extra-eos-token",
            metavar="TOKEN",
            help="Also stop at this token (a token string or id; repeat the option for more).",
            show_default=False,
        ),
    ] = None,
    adapter_path: Annotated[
        Optional[str],
        typer.Option(
            "--adapter-path",
            metavar="DIR",
            help="LoRA/DoRA adapters trained with mlx_lm.lora (adapter_config.json, adapters.safetensors).",
            show_default=False,
        ),
    ] = None,
    allow_repeats: AllowRepeatsOpt = False,
    max_input: MaxInputOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_output: JsonOpt = False,
    progress: ProgressOpt = True,
    quiet: QuietOpt = False,
    verbose: Annotated[
        Optional[str],
        typer.Option(
            "--verbose",
            metavar="BOOL",
            help="mlx_lm.generate's switch: False is --quiet.",
            show_default=False,
        ),
    ] = None,
):
    """Generate text from a prompt, like mlx_lm.generate, with SelfExtend for long prompts.

    Takes mlx_lm.generate's flags (the module docstring and docs/cli.md list them), with one
    difference to watch: -m is --model here, as in llm, while mlx_lm.generate uses -m for
    --max-tokens (-n here). --system and -s work as well as --system-prompt.

    Examples:

    \b
        selfextend generate "Write a haiku about bread."
        selfextend generate -p "Write a haiku about bread." --temp 0.7 --top-k 40 --seed 1 -n 60
        cat docs/examples/bakery.md | selfextend generate --max-tokens 40 --verbose False
    """
    from selfextend_mlx.app.session import Session, SessionOptions

    quiet = quiet or (verbose is not None and not _flag_value(verbose))
    if text is not None and prompt is not None:
        raise UsageProblem("give the prompt once: as the argument or with -p (see selfextend generate --help)")
    prompt = text if text is not None else prompt
    if prompt is None:
        if not stdin_is_piped():
            raise UsageProblem(
                'give a prompt: selfextend generate "..." (or -p "...", or pipe it in) (see selfextend generate --help)'
            )
        prompt = "-"
    if prompt == "-":
        prompt = read_stdin_text(max_input)
    if not prompt.strip():
        raise UsageProblem("the prompt is empty (see selfextend generate --help)")
    loaded_model, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    if adapter_path:
        _load_adapters(loaded_model, adapter_path)
    for token in extra_eos_token or ():
        _add_eos_token(tokenizer, token)
    options = SessionOptions(
        group_size=group_size,
        window=window,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step_size=prefill_step_size,
        use_chat_template=not ignore_chat_template,
    )
    session = Session(loaded_model, tokenizer, system=system, options=options, first_question=prompt, notice=status)
    if not quiet:
        status(header(session))
    sampling = make_sampling(
        temp=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
        min_tokens_to_keep=min_tokens_to_keep,
        xtc_probability=xtc_probability,
        xtc_threshold=xtc_threshold,
        allow_repeats=allow_repeats,
    )
    answer = session.ask(
        prompt,
        sampling,
        on_text=(lambda text: None) if json_output else write_out,
        on_progress=progress_bar("prompt", quiet, progress),
    )
    if json_output:
        record = answer_record(session, answer)
        record["text"] = record.pop("answer")
        for key in ("document_tokens", "document_cache"):
            record.pop(key)
        print_json(record)
    else:
        write_out("\n")
    if not quiet:
        status(stats_line(answer))


def _load_adapters(model, adapter_path: str) -> None:
    """mlx-lm's own adapter loading; the model's id names the adapters, so nothing made without
    them (a document cache entry) is taken for what they make."""
    from pathlib import Path

    from mlx_lm.tuner.utils import load_adapters

    from selfextend_mlx.errors import ModelNotFoundError

    folder = Path(adapter_path)
    missing = [name for name in ("adapter_config.json", "adapters.safetensors") if not (folder / name).is_file()]
    if missing:
        raise ModelNotFoundError(f"--adapter-path {adapter_path}: no {' or '.join(missing)} there")
    try:
        load_adapters(model, str(folder))
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ModelNotFoundError(f"--adapter-path {adapter_path}: not adapters for this model ({error})") from None
    info = model.model_info
    model.model_info = replace(info, model_id=f"{info.model_id}+adapters:{folder.resolve()}")


def _add_eos_token(tokenizer, token: str) -> None:
    from selfextend_mlx.errors import SettingsError

    refused = SettingsError(f"--extra-eos-token {token!r} is not a token of this model's tokenizer")
    if not token.isdigit():  # an unknown token string comes back as the unknown-token id
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == getattr(tokenizer, "unk_token_id", None) and token != tokenizer.unk_token):
            raise refused
    try:
        tokenizer.add_eos_token(token)
    except (ValueError, KeyError):
        raise refused from None


def register(app: typer.Typer) -> None:
    app.command(cls=Command)(generate)
