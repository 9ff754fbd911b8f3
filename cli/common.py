"""Pieces the document commands share: options, model loading, progress, header, output."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# -- options ---------------------------------------------------------------------------------


def _kv_bits(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in (4, 8):
        raise typer.BadParameter(f"{value} is not supported: use 4 or 8")
    return value


ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Model: a registry name, a local mlx-lm folder, a GGUF file or a Hugging Face repo. "
        "Default: the bundled SmolLM2-135M-Instruct.",
        show_default=False,
    ),
]
GroupSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--group-size",
        "-G",
        min=1,
        help="SelfExtend group size G (default: the model's; raised when the input needs it).",
        show_default=False,
    ),
]
WindowOpt = Annotated[
    Optional[int],
    typer.Option(
        "--window", "-W", min=1, help="SelfExtend neighbor window W (default: the model's).", show_default=False
    ),
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Longest answer, in tokens.")]
TempOpt = Annotated[
    float, typer.Option("--temp", "-t", min=0.0, help="Sampling temperature (0: always the likeliest token).")
]
TopPOpt = Annotated[
    float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling: keep tokens within this probability mass.")
]
SeedOpt = Annotated[
    Optional[int], typer.Option("--seed", help="Random seed, for repeatable sampling.", show_default=False)
]
KvBitsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--kv-bits", callback=_kv_bits, help="Quantize the KV cache to 4 or 8 bits (less memory).", show_default=False
    ),
]
PrefillStepOpt = Annotated[
    int, typer.Option("--prefill-step-size", min=1, help="Tokens fed to the model per prefill step.")
]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.", show_default=False)]
CacheDirOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--cache-dir",
        help="Document cache folder (default: $SELFEXTEND_CACHE_DIR or the platform's cache folder).",
        show_default=False,
        file_okay=False,
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
    Optional[bool],
    typer.Option(
        "--progress/--no-progress",
        help="Show the header and a prefill progress bar on stderr (default: when stderr is a terminal).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of the streamed text.")]


# -- output ---------------------------------------------------------------------------------


def status(message: str) -> None:
    """A status line on stderr: stdout stays clean for answers and JSON."""
    print(message, file=sys.stderr, flush=True)


def write_out(text: str) -> None:
    """Answer text to stdout, flushed so it streams."""
    sys.stdout.write(text)
    sys.stdout.flush()


def make_sampling(max_tokens, temp, top_p, seed):
    from selfextend_mlx.app.generation import Sampling

    return Sampling(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)


def show_status(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else progress


class ProgressBar:
    """Prefill progress on stderr: tokens done, tokens per second, time left."""

    def __init__(self, label: str = "prefill", width: int = 24, min_tokens: int = 256):
        self.label, self.width, self.min_tokens = label, width, min_tokens
        self.interactive = sys.stderr.isatty()

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if total < self.min_tokens:  # a question's few tokens take no visible time
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (total - done) / rate if rate > 0 else None
        filled = int(self.width * done / total)
        bar = "#" * filled + "." * (self.width - filled)
        eta = f"{_duration(left)} left" if left is not None and done < total else f"{_duration(elapsed)}"
        line = f"{self.label} [{bar}] {done:,}/{total:,} tokens  {rate:,.0f} tok/s  {eta}"
        if self.interactive:
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r\x1b[2K{line}{end}")
        elif done == total or done == 0:
            sys.stderr.write(line + "\n")  # a log gets the start and the end, not every step
        sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def header(session) -> str:
    """One line: model, document tokens, trained context, settings, reach, answer budget, memory."""
    from selfextend_mlx.planning import format_bytes

    plan = session.plan
    parts = [f"model {display_name(plan.model_id)}"]
    if session.documents:
        parts.append(f"document {len(session.prefix_tokens):,} tokens")
    else:
        parts.append(f"prompt {plan.prompt_tokens:,} tokens")
    memory = f"memory ~{format_bytes(plan.memory.total)}"
    if plan.memory.machine:
        memory += f" of {format_bytes(plan.memory.machine)}"
    parts += [
        f"trained context {plan.trained_context:,}",
        plan.settings.describe(),
        f"N_max {plan.max_length:,}",
        f"answer up to {plan.max_tokens:,}",
        memory,
    ]
    return " | ".join(parts)


def display_name(model_id: str) -> str:
    return Path(model_id).name if "/" in model_id and Path(model_id).exists() else model_id


def print_json(data: dict) -> None:
    print(json.dumps(data, ensure_ascii=False))


def answer_record(session, answer) -> dict:
    """What --json prints for one answer."""
    from selfextend_mlx.loading.distributed import ranks_of

    plan = session.plan
    return {
        "answer": answer.text,
        "model": plan.model_id,
        "prompt_tokens": answer.prompt_tokens,
        "prefilled_tokens": answer.prefilled_tokens,
        "document_tokens": len(session.prefix_tokens),
        "document_cache": {"cache": "hit", "prefill": "miss"}.get(session.document_source, "off")
        if session.doc_cache is not None
        else "off",
        "generation_tokens": answer.generation_tokens,
        "finish_reason": answer.finish_reason,
        "group_size": plan.settings.group_size,
        "requested_group_size": plan.requested_group_size,
        "window": plan.settings.window,
        "settings": plan.settings.reason,
        "trained_context": plan.trained_context,
        "max_length": plan.max_length,
        "prompt_tps": round(answer.prompt_tps, 2),
        "generation_tps": round(answer.generation_tps, 2),
        "peak_memory_bytes": answer.peak_memory_bytes,
        "estimated_memory_bytes": plan.memory.total,
        "ranks": ranks_of(session.model),
    }


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
        sys.stderr.write(f"loading {model_ref or 'the default model'}...")
        sys.stderr.flush()
    try:
        # a plain load() in a single process
        return distributed.load_sharded(model_ref, trust_remote_code=trust_remote_code)
    finally:
        if interactive:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def document_cache(cache_dir: Optional[Path], no_cache: bool):
    from selfextend_mlx.loading.distributed import ranks

    if no_cache or ranks() > 1:  # a sharded run's cache holds one rank's heads: never shared
        return None
    from selfextend_mlx.app.doccache import DocumentCache

    return DocumentCache(cache_dir, notice=status)


def read_stdin_text(max_input: Optional[str] = None) -> str:
    from selfextend_mlx.app.documents import read_text

    return read_text(sys.stdin.buffer, "stdin", max_input)
