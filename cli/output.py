"""What the commands print: status lines on stderr, answers on stdout, the header line, the
stats line and the --json record of an answer."""

import json
import sys
from pathlib import Path

# -- output ---------------------------------------------------------------------------------


def status(message: str) -> None:
    """A status line on stderr: stdout stays clean for answers and JSON. What it names (a file,
    a model's metadata, a folder) is untrusted: control characters, newlines included, are
    shown escaped (documents.for_terminal), as in every error line."""
    print(terminal_text(message), file=sys.stderr, flush=True)


def log_lines(message: str) -> None:
    """The server's log: a record of several lines (a traceback) keeps its lines, each one
    escaped as status() escapes a line."""
    print("\n".join(terminal_text(line) for line in str(message).split("\n")), file=sys.stderr, flush=True)


def terminal_text(text) -> str:
    from selfextend_mlx.app.documents import for_terminal

    return for_terminal(str(text))


def write_out(text: str) -> None:
    """Answer text to stdout, flushed so it streams."""
    sys.stdout.write(text)
    sys.stdout.flush()


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
    effective = plan.limits.effective_context
    context = f"trained context {plan.trained_context:,}"
    if effective and effective < plan.trained_context:
        context += f" (effective {effective:,}, from the registry)"
    parts += [
        context,
        plan.settings.describe() if plan.settings.plain else f"{plan.settings.method} {plan.settings.describe()}",
        f"N_max {plan.settings.formula()}",
        f"answer up to {plan.max_tokens:,}",
        memory,
    ]
    return " | ".join(parts)


FINISHED = {
    "stop": "",
    "length": ", stopped at the answer limit (-n {tokens})",
    "repetition": ", stopped: it was repeating itself",
    "interrupted": ", interrupted",
}


def stats_line(answer) -> str:
    """The one stats line every command prints after an answer (a chat: after each turn)."""
    from selfextend_mlx.planning import format_bytes

    finished = FINISHED.get(answer.finish_reason, f", {answer.finish_reason}").format(tokens=answer.generation_tokens)
    return (
        f"prompt {answer.prompt_tokens:,} tokens ({answer.prefilled_tokens:,} computed, "
        f"{answer.prompt_tps:,.1f} tok/s) | answer {answer.generation_tokens:,} tokens "
        f"({answer.generation_tps:,.1f} tok/s{finished}) | peak memory {format_bytes(answer.peak_memory_bytes)}"
    )


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
        "method": plan.settings.method,
        "group_size": plan.settings.group_size,
        "requested_group_size": plan.requested_group_size,
        "window": plan.settings.window,
        "settings": plan.settings.reason,
        "trained_context": plan.trained_context,
        "effective_context": plan.limits.effective_context,
        "reach_context": plan.settings.context,  # the context max_length is (C - W) * G + W over
        "max_length": plan.max_length,
        "prompt_tps": round(answer.prompt_tps, 2),
        "generation_tps": round(answer.generation_tps, 2),
        "peak_memory_bytes": answer.peak_memory_bytes,
        "estimated_memory_bytes": plan.memory.total,
        "ranks": ranks_of(session.model),
    }
