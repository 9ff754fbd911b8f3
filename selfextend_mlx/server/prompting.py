"""A request's prompt: the text the model reads, and the leading part of it worth keeping.

Chat messages go through the model's chat template (models without one get plain
Question:/Answer: turns, every turn laid out alike); a text completion's prompt is used as it is.

The reusable part, the *document prefix*, is what later requests about the same document
start with: the system messages and the first user message up to its last paragraph break
(people put the document first and the question after it). It is tokenized on its own, so its
tokens are the same whatever question follows, and the engine keeps its KV cache on disk.
"""

from dataclasses import dataclass
from typing import Optional

from ..app.prompts import TemplateBoundError, encode, render_chat_template
from .protocol import bad_request

_SENTINEL = "\ue000END-OF-DOCUMENT\ue000"  # private-use characters no message contains
PARAGRAPH = "\n\n"


@dataclass(frozen=True)
class Prompt:
    text: str
    prefix: str = ""  # a leading part of `text` that later requests may share ("" when none)
    label: str = ""  # what `selfextend cache list` calls the document in the prefix

    def tokens(self, tokenizer) -> tuple[list[int], int]:
        """The prompt's token ids and how many of them are the prefix's."""
        if not self.prefix:
            return encode(tokenizer, self.text, first=True), 0
        head = encode(tokenizer, self.prefix, first=True)
        return head + encode(tokenizer, self.text[len(self.prefix) :], first=False), len(head)


def longest_token(tokenizer) -> Optional[int]:
    """The most characters one token of `tokenizer` stands for, at least (the longest entry of
    its vocabulary as spelled there: a byte-level entry has one character per byte, so never
    fewer than it decodes to). A text of n characters is then at least n / this many tokens.
    None when the vocabulary cannot be read."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        pieces = inner.convert_ids_to_tokens(list(range(len(inner))))
    except Exception:
        return None
    lengths = [len(piece) for piece in pieces if piece]
    return max(lengths) if lengths else None


def completion_prompt(text: str) -> Prompt:
    head = _head(text)
    return Prompt(text, head, _label(head))


def chat_prompt(tokenizer, messages: list[dict]) -> Prompt:
    """`messages`: [{"role", "content"}] with text content; developer counts as system."""
    messages = _merged([{"role": _role(m["role"]), "content": m["content"]} for m in messages])
    text = _render(tokenizer, messages)
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        return Prompt(text)
    probe = [dict(m) for m in messages[: first_user + 1]]
    probe[-1]["content"] = _head(probe[-1]["content"]) + _SENTINEL
    try:
        rendered = _render(tokenizer, probe)
    except Exception:  # a template that refuses the shortened conversation: no reusable part
        return Prompt(text)
    cut = rendered.find(_SENTINEL)
    prefix = rendered[:cut] if cut >= 0 else ""
    if not prefix or not text.startswith(prefix):
        return Prompt(text)
    parts = [m["content"] for m in messages[:first_user] if m["role"] == "system"] + [
        _head(messages[first_user]["content"])
    ]
    return Prompt(text, prefix, _label(max(parts, key=len)))


def _label(text: str, length: int = 60) -> str:
    """The start of a document on one line, for `selfextend cache list`."""
    words = " ".join(text.split())
    return "served: " + (words if len(words) <= length else words[: length - 1] + "\u2026")


def _head(text: str) -> str:
    """`text` up to and including its last paragraph break ("" when it has none)."""
    cut = text.rfind(PARAGRAPH)
    return text[: cut + len(PARAGRAPH)] if cut > 0 else ""


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _merged(messages: list[dict]) -> list[dict]:
    """Consecutive messages of one role joined (templates expect roles to alternate)."""
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] += PARAGRAPH + message["content"]
        else:
            merged.append(dict(message))
    return merged


def _render(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "has_chat_template", False):
        return _apply_template(tokenizer, messages)
    return _plain(messages)


def _apply_template(tokenizer, messages: list[dict]) -> str:
    continuing = messages[-1]["role"] == "assistant"  # the client wants that answer continued
    options = {"continue_final_message": True} if continuing else {"add_generation_prompt": True}
    try:
        return render_chat_template(tokenizer, messages, **options)
    except TemplateBoundError as error:
        raise bad_request(str(error), "messages", code="template_bound_exceeded") from None
    except Exception as error:
        folded = _system_folded(messages)
        if folded is not None and "system" in str(error).lower():
            return _apply_template(tokenizer, folded)
        raise bad_request(f"the model's chat template refused these messages: {error}", "messages") from None


def _system_folded(messages: list[dict]) -> Optional[list[dict]]:
    """For templates without a system role: the system text leads the first user message."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system or not rest or rest[0]["role"] != "user":
        return None
    rest[0]["content"] = PARAGRAPH.join(system) + PARAGRAPH + rest[0]["content"]
    return rest


def _plain(messages: list[dict]) -> str:
    """The plain layout: system text, then Question:/Answer: turns ending with a question.
    Every turn is laid out alike, the first too (no bare prompt), so that the prompt of one
    turn is where the next turn's prompt begins and its KV cache is reused; an answer's
    leading spaces are dropped, as the model wrote them after "Answer:"."""
    system = PARAGRAPH.join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages if m["role"] != "system"]
    roles = [m["role"] for m in turns]
    if not turns or roles != ["user", "assistant"] * (len(turns) // 2) + ["user"]:
        raise bad_request(
            "this model has no chat template: send user and assistant messages in turn, ending with a user "
            "message, or use /v1/completions",
            "messages",
        )
    parts = [system] if system else []
    for i in range(0, len(turns) - 1, 2):
        parts.append(f"Question: {turns[i]['content']}\nAnswer: {turns[i + 1]['content'].lstrip()}")
    parts.append(f"Question: {turns[-1]['content']}\nAnswer:")
    return PARAGRAPH.join(parts)
