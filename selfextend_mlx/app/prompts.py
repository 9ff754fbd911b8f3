"""Prompt layout: system text, documents, past turns and a question, in the model's chat
template (or plain Question:/Answer: lines for models without one), laid out so the system
text and documents form a stable token prefix that can be prefilled once and reused.

Chat templates come from model folders: they are untrusted code. Every render goes through
render_chat_template(), the one place of their bound: TEMPLATE_SECONDS of time and
TEMPLATE_MAX_CHARS of output (counted as the template yields it), past which the render is
stopped with one TemplateBoundError line.
"""

import sys
import time
from collections.abc import Sequence
from typing import Optional

from ..errors import SelfExtendError

TEMPLATE_SECONDS = 10.0  # a real template renders a book-long prompt in milliseconds
TEMPLATE_MAX_CHARS = 64_000_000  # several times the largest input (10 MB) any prompt holds
_SENTINEL = "\ue000QUESTION\ue000"  # a private-use marker no document or template contains


class PromptFormat:
    """Renders (system, documents, past turns, question) to prompt text.

    With a chat template the documents open the first user message and the question follows
    them; without one the layout is plain text with Question:/Answer: lines.
    """

    def __init__(self, tokenizer, system: Optional[str] = None, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        self.system = system
        self.chat = use_chat_template and bool(getattr(tokenizer, "has_chat_template", False))
        self._system_role = True

    def render(self, documents: str, turns: Sequence[tuple[str, str]], question: str) -> str:
        return (
            self._render_chat(documents, turns, question)
            if self.chat
            else self._render_plain(documents, turns, question)
        )

    def _render_plain(self, documents, turns, question):
        parts = [part for part in (self.system, documents) if part]
        text = "\n\n".join(parts)
        for past_question, answer in turns:
            text += f"{_join(text)}Question: {past_question}\nAnswer: {answer}"
        if not parts and not turns:
            return question  # a bare prompt (generate) goes in as it is
        return text + f"{_join(text)}Question: {question}\nAnswer:"

    def _render_chat(self, documents, turns, question):
        messages = []
        first = lambda q: f"{documents}\n\n{q}" if documents else q
        system = self.system
        if system and self._system_role:
            messages.append({"role": "system", "content": system})
            system = None
        for i, (past_question, answer) in enumerate(turns):
            content = first(past_question) if i == 0 else past_question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": first(question) if not turns else question})
        if system:  # the template refused a system role: the text leads the first user message
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        try:
            return render_chat_template(self.tokenizer, messages, add_generation_prompt=True)
        except TemplateBoundError:
            raise
        except Exception as error:
            if self.system and self._system_role and "system" in str(error).lower():
                self._system_role = False
                return self._render_chat(documents, turns, question)
            raise SelfExtendError(f"the model's chat template failed: {error}") from None

    def document_prefix(self, documents: str) -> Optional[str]:
        """The text every prompt about these documents starts with, or None when the template
        puts something that depends on the question before the documents' end."""
        if not documents:
            return None
        probes = [self.render(documents, [], f"{_SENTINEL}{tail}") for tail in ("a", "b c")]
        cuts = [probe.find(_SENTINEL) for probe in probes]
        if min(cuts) < 0 or probes[0][: cuts[0]] != probes[1][: cuts[1]]:
            return None
        return probes[0][: cuts[0]]


class TemplateBoundError(SelfExtendError):
    """A chat template that ran past its bound in time or output."""


def render_chat_template(tokenizer, messages: list[dict], **options) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, **options)`, stopped past
    TEMPLATE_SECONDS or TEMPLATE_MAX_CHARS of output."""
    bound = _Bound(time.monotonic() + TEMPLATE_SECONDS)
    previous = sys.gettrace()
    sys.settrace(bound.call)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    finally:
        sys.settrace(previous)


class _Bound:
    """A trace function (this thread only): every Python call checks the clock; in template
    code (Jinja compiles to '<template>') every line does too and every yielded piece of
    output is counted. Raising from it stops the render."""

    def __init__(self, deadline: float):
        self.deadline, self.chars = deadline, 0

    def call(self, frame, event, arg):
        self._check_time()
        return self.line if frame.f_code.co_filename.startswith("<template") else None

    def line(self, frame, event, arg):
        self._check_time()
        if event == "return" and isinstance(arg, str):
            self.chars += len(arg)
            if self.chars > TEMPLATE_MAX_CHARS:
                raise TemplateBoundError(
                    f"the model's chat template wrote more than {TEMPLATE_MAX_CHARS:,} characters: stopped "
                    "(the template in the model folder's tokenizer_config.json is at fault)"
                )
        return self.line

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBoundError(
                f"the model's chat template ran for more than {TEMPLATE_SECONDS:.0f} s: stopped "
                "(the template in the model folder's tokenizer_config.json is at fault)"
            )


def _join(text: str) -> str:
    return "\n\n" if text else ""


def encode(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of `text`; `first` adds the BOS token unless the text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    special = first and (bos is None or not text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=special))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
