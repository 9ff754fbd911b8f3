"""The OpenAI API's shapes: request bodies (validated strictly, one clear message per mistake),
the error body, and the responses and stream chunks of chat and text completions.

Fields the API defines that this server cannot honour (n > 1, tools, logprobs, penalties...)
are refused with a 400 that names them, never silently ignored; fields it does not know are
ignored, as clients send vendor extensions.
"""

import json
import time
import uuid
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import SelfExtendError

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
SEED_RANGE = (-(2**63), 2**64 - 1)

# -- errors -------------------------------------------------------------------------------------

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(SelfExtendError):
    """An error answered as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: Optional[str] = None,
        param: Optional[str] = None,
        headers: Optional[dict] = None,
        **details,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}
        self.details = details  # extra numbers, e.g. the token counts of context_length_exceeded

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
                **self.details,
            }
        }


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# -- requests -----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Message(_Strict):
    role: str
    content: Optional[str] = None  # text parts are joined into one string

    @field_validator("role")
    @classmethod
    def _known_role(cls, value):
        if value in ("tool", "function"):
            raise ValueError(f"{value!r} is not supported: this server has no tool calling")
        if value not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"unknown role {value!r}: use system, user or assistant")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_of(cls, value):
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of text parts")
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"of type {kind!r}" if isinstance(kind, str) else "not a text part"
                raise ValueError(f"part {i} is {what}: only text parts are supported (this server reads text)")
            texts.append(part["text"])
        return "".join(texts)

    @property
    def text(self) -> str:
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """What chat and text completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    # mlx_lm.server's sampling fields, applied through mlx-lm's sampler and logits processors
    top_k: Optional[int] = Field(None, ge=-1)  # 0 or -1: off
    min_p: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: Optional[float] = Field(None, ge=0, le=10, allow_inf_nan=False)  # 0 or 1: off
    repetition_context_size: Optional[int] = Field(None, ge=1, le=4096)
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Optional[Any] = ()  # a tuple of strings once validated
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(1, ge=1)
    presence_penalty: Optional[float] = Field(None, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, allow_inf_nan=False)
    logit_bias: Optional[dict] = None
    user: Optional[str] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or len(value) > MAX_STOP_SEQUENCES
            or not all(isinstance(item, str) and item for item in value)
        ):
            raise ValueError(f"must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them")
        return tuple(value)

    def check_supported(self) -> None:
        """Refuse, by name, what is valid in the API but not done here."""
        if (self.n or 1) != 1:
            raise bad_request("n must be 1: this server returns one choice per request", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by this server (leave it out or 0)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    def sampling_fields(self) -> dict:
        """The sampling settings beyond temperature and top_p that the request gives, as
        app.generation.Sampling's fields (absent ones are left to the defaults)."""
        fields = {
            "top_k": None if self.top_k is None else max(0, self.top_k),
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "repetition_context_size": self.repetition_context_size,
        }
        return {name: value for name, value in fields.items() if value is not None}

    @property
    def answer_budget(self) -> Optional[int]:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    tools: Optional[list] = None
    functions: Optional[list] = None
    response_format: Optional[dict] = None

    def check_supported(self) -> None:
        super().check_supported()
        for i, message in enumerate(self.messages):
            if message.role == "user" and not message.text.strip():
                raise bad_request(f"messages[{i}].content: a user message must not be empty", f"messages[{i}].content")
        if self.logprobs:
            raise bad_request("logprobs are not supported by this server", "logprobs")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise bad_request(f"{name} are not supported: this server has no tool calling", name)
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only text is supported", "response_format")

    @property
    def answer_budget(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: Any
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value  # token ids
        raise ValueError("must be a string (or a list of token ids): this server takes one prompt per request")

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise bad_request("suffix is not supported by this server", "suffix")
        if self.logprobs:
            raise bad_request("logprobs are not supported by this server", "logprobs")
        if self.best_of not in (None, 1):
            raise bad_request("best_of must be 1: this server returns one choice per request", "best_of")


def parse_request(body: bytes, kind: type[_Generation]) -> _Generation:
    """The validated request in `body`, or an APIError 400 naming the first mistake."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise bad_request("the body is not valid JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, not {type(data).__name__}")
    try:  # JSON escapes can spell half a character (\ud800), which is no text a tokenizer takes
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the body holds a lone surrogate escape (half of a character): send valid Unicode") from None
    try:
        request = kind.model_validate(data)
    except ValidationError as error:
        raise _first_mistake(error) from None
    request.check_supported()
    return request


def _first_mistake(error: ValidationError) -> APIError:
    mistake = error.errors()[0]
    param = _location(mistake["loc"])
    message = mistake["msg"].removeprefix("Value error, ")
    if mistake["type"] == "missing":
        return bad_request(f"missing required field {param!r}", param)
    return bad_request(f"{param}: {message[0].lower()}{message[1:]}", param)


def _location(loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# -- responses ----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class Reply:
    """One request's response or stream, in chat or text-completion shape."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat, self.model = chat, model
        self.include_usage = include_usage  # then every chunk before the usage chunk has "usage": null
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _envelope(self, stream: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if stream else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: FinishReason, usage: dict, extra: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._envelope(False), "choices": [choice], "usage": usage, "selfextend": extra}

    def chunk(self, text: Optional[str] = None, finish_reason: Optional[FinishReason] = None, **extra) -> dict:
        """A stream chunk: text (None for the opening role chunk of a chat) or the finish."""
        if self.chat:
            if text is None and finish_reason is None:
                delta = {"role": "assistant", "content": ""}
            else:
                delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        usage = {"usage": None} if self.include_usage else {}
        return {**self._envelope(True), "choices": [choice], **usage, **extra}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope(True), "choices": [], "usage": usage}
