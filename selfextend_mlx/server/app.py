"""The HTTP side (a Starlette app): OpenAI's routes, each request checked in order (the host
name, the web page origin and the body's type: guard.py; API key, body size, JSON and fields,
model name, plan), then queued to the engine and answered whole or
streamed as server-sent events.

Every error is OpenAI's JSON error body with a 4xx status (a 500 only for a bug, without a
traceback), and the server keeps serving. A client that disconnects cancels its request.
Nothing in a request names a file: the model is the one loaded at start, and document-cache
entries are named by hashes.
"""

import asyncio
import hmac
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..app.turns import Answer
from .engine import Engine, Failed, Finished, Job, Progress, Text, Work
from .guard import RequestGuard
from .prompting import chat_prompt, completion_prompt, longest_token
from .protocol import (
    SERVER_ERROR,
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    parse_request,
    usage,
)

DEFAULT_MAX_REQUEST_BYTES = 16_000_000  # a whole book is about 1 MB of text
KEEPALIVE_SECONDS = 10  # a comment line on a stream that waits, so that proxies keep it open
BODY_SECONDS = 60.0  # a request's body must have arrived within this once its headers have
CLIENT_CLOSED = 499  # no one reads this status: the client has gone (nginx's convention)
# Prompts longer than this (in characters) are rendered and tokenized in a lane of their own, so
# that a short request never waits behind a book being tokenized (a second or more a megabyte).
LARGE_PROMPT_CHARS = 100_000


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    name: Optional[str] = None  # the model id the API reports (default: the model's own name)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    allow_origins: tuple[str, ...] = ()  # browsers allowed to call the API from other origins (CORS)
    allow_hosts: tuple[str, ...] = ()  # Host names answered besides addresses, localhost and `host`
    max_open_requests: Optional[int] = None  # requests under way at once (default: the queue size + 64)


OPEN_REQUESTS_BEYOND_QUEUE = 64  # requests being read, tokenized or answered besides the queue's


def model_names(engine: Engine, name: Optional[str]) -> tuple[str, list[str]]:
    """The id /v1/models lists and every name a request may use for the model."""
    info = engine.info
    own = info.registry_name or info.model_id.rstrip("/").rsplit("/", 1)[-1]
    listed = name or own
    return listed, [listed, own, info.model_id, *([info.registry_name] if info.registry_name else [])]


class API:
    def __init__(self, engine: Engine, options: ServerOptions, log: Callable[[str], None]):
        self.engine, self.options, self.log = engine, options, log
        self.name, names = model_names(engine, options.name)
        self.names = {n.lower() for n in names}
        self.started = int(time.time())
        self.guard = RequestGuard(options.host, options.allow_hosts, options.allow_origins)
        # Prompts are rendered and tokenized off the event loop (the tokenizer lets go of the
        # GIL), large ones one at a time in their own lane, beside the short ones.
        self.tokenizing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        self.tokenizing_large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-large")
        self.longest_token = longest_token(engine.tokenizer)  # characters: bounds a prompt's tokens from below

    # -- routes -------------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def models(self, request: Request) -> Response:
        return await self._guarded(request, lambda: JSONResponse({"object": "list", "data": [self._card()]}))

    async def model(self, request: Request) -> Response:
        def one():
            self._check_model(request.path_params["model"])
            return JSONResponse(self._card())

        return await self._guarded(request, one)

    async def health(self, request: Request) -> Response:
        engine = self.engine
        body = {
            "status": "shutting down" if engine.stopping else "ok",
            "model": self.name,
            "running": engine.running is not None,
            "waiting": engine.waiting,
            "prompt_cache": {"entries": len(engine.store), "bytes": engine.store.nbytes},
        }
        return JSONResponse(body, status_code=503 if engine.stopping else 200)

    def _card(self) -> dict:
        return {
            "id": self.name,
            "object": "model",
            "created": self.started,
            "owned_by": "selfextend-mlx",
            "context_length": self.engine.reach(),
            "trained_context": self.engine.info.trained_context,
        }

    # -- checks ---------------------------------------------------------------------------------------
    async def _guarded(self, request: Request, respond) -> Response:
        try:
            self._authorize(request)
            return respond()
        except APIError as error:
            return self._error(request, error)

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "incorrect or missing API key: send it as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> bytes:
        """The whole body: a 413 past the size cap, a 408 when it is not all sent in time."""
        limit = self.options.max_request_bytes
        too_large = APIError(
            413,
            f"the request body is larger than this server's limit of {limit:,} bytes (see --max-request-size)",
            code="request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        try:
            async with asyncio.timeout(BODY_SECONDS):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {BODY_SECONDS:.0f} s", code="request_timeout"
            ) from None
        return bytes(body)

    def _check_model(self, requested: Optional[str]) -> None:
        if requested is None or requested.lower() in self.names:
            return
        raise APIError(
            404,
            f"the model {requested!r} does not exist: this server serves {self.name!r} (see /v1/models)",
            param="model",
            code="model_not_found",
        )

    def _lane(self, length: int) -> ThreadPoolExecutor:
        """Where a body or prompt of `length` bytes or characters is parsed and tokenized."""
        return self.tokenizing_large if length > LARGE_PROMPT_CHARS else self.tokenizing

    def _check_length(self, chat: bool, parsed) -> int:
        """The prompt's length in characters (token ids: in tokens); a 400
        context_length_exceeded, before anything is rendered or tokenized, when a prompt that
        long is more tokens than the reach holds whatever they are (each token is at most
        `longest_token` characters)."""
        prompt = None if chat else parsed.prompt
        if isinstance(prompt, list):
            chars = at_least = len(prompt)
        else:
            chars = sum(len(m.text) for m in parsed.messages) if chat else len(prompt)
            at_least = -(-chars // self.longest_token) if self.longest_token else 0
        reach = self.engine.reach()
        if at_least < reach:  # one token at least is left for the answer
            return chars
        raise APIError(
            400,
            f"This model's maximum context length is {reach:,} tokens with SelfExtend, and the prompt "
            f"({chars:,} characters) is at least {at_least:,} tokens. Please shorten the prompt.",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
            prompt_characters=chars,
            min_prompt_tokens=at_least,
            max_context_length=reach,
            trained_context=self.engine.info.trained_context,
        )

    def _prepare(self, chat: bool, parsed) -> Work:
        """Runs in the tokenizing thread."""
        engine = self.engine
        if chat:
            messages = [{"role": m.role, "content": m.text} for m in parsed.messages]
            prompt = chat_prompt(engine.tokenizer, messages)
        else:
            prompt = parsed.prompt if isinstance(parsed.prompt, list) else completion_prompt(parsed.prompt)
        work = engine.prepare(
            prompt,
            max_tokens=parsed.answer_budget,
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            seed=parsed.seed,
            stop=parsed.stop,
        )
        extra = parsed.sampling_fields()  # top_k, min_p, repetition_penalty: mlx_lm.server's fields
        return replace(work, sampling=replace(work.sampling, **extra)) if extra else work

    # -- completions ----------------------------------------------------------------------------------
    async def _complete(self, request: Request, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            self._authorize(request)
            body, loop = await self._body(request), asyncio.get_running_loop()
            kind = ChatRequest if chat else CompletionRequest  # a large body is parsed in the large lane too
            parsed = await loop.run_in_executor(self._lane(len(body)), parse_request, body, kind)
            self._check_model(parsed.model)
            chars = self._check_length(chat, parsed)
            work = await loop.run_in_executor(self._lane(chars), self._prepare, chat, parsed)
            job = Job(work, loop)
            self.engine.submit(job)
        except APIError as error:
            return self._error(request, error)
        except Exception as error:  # a bug: answered as JSON, logged in full here
            return self._internal_error(request, error)
        reply = Reply(chat, self.name, parsed.stream and parsed.include_usage)
        echo = self._echo(chat, parsed, work)
        if parsed.stream:
            events = self._stream(request, job, reply, echo, parsed.include_usage, started)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        event = await self._until_done(request, job)
        if event is None:
            self._log_line(request, CLIENT_CLOSED, started, "client closed the connection")
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(event, Failed):
            return self._error(request, event.error)
        outcome = event.outcome
        self._log_line(request, 200, started, _summary(work, outcome))
        body = reply.response(
            echo + outcome.text, outcome.api_finish_reason, _usage(outcome), _extension(work, outcome)
        )
        return JSONResponse(body)

    def _echo(self, chat: bool, parsed, work: Work) -> str:
        if chat or not parsed.echo:
            return ""
        return parsed.prompt if isinstance(parsed.prompt, str) else self.engine.tokenizer.decode(work.tokens)

    async def _until_done(self, request: Request, job: Job):
        """The job's Finished or Failed event, or None once the client has gone (the job is
        then cancelled)."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                event = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                if event not in done:
                    event.cancel()
                    job.cancel()
                    return None
                if isinstance(event.result(), (Finished, Failed)):
                    return event.result()
        finally:
            gone.cancel()

    async def _stream(self, request: Request, job: Job, reply: Reply, echo: str, include_usage: bool, started):
        """The server-sent events of one request; closing it (the client left) cancels the job."""
        try:
            if reply.chat:
                yield _sse(reply.chunk())
            if echo:
                yield _sse(reply.chunk(echo))
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": waiting for the model\n\n"
                    continue
                if isinstance(event, Progress):
                    yield f": reading the prompt, {event.done}/{event.total} tokens\n\n"
                elif isinstance(event, Text):
                    yield _sse(reply.chunk(event.text))
                elif isinstance(event, Finished):
                    outcome = event.outcome
                    yield _sse(
                        reply.chunk(finish_reason=outcome.api_finish_reason, selfextend=_extension(job.work, outcome))
                    )
                    if include_usage:
                        yield _sse(reply.usage_chunk(_usage(outcome)))
                    yield "data: [DONE]\n\n"
                    self._log_line(request, 200, started, _summary(job.work, outcome) + ", streamed")
                    return
                elif isinstance(event, Failed):
                    yield _sse(event.error.body())
                    self._log_line(request, event.error.status, started, f"{event.error.message} (in the stream)")
                    return
        finally:
            job.cancel()

    # -- answers ------------------------------------------------------------------------------------
    def _error(self, request: Request, error: APIError) -> Response:
        self._log_line(request, error.status, None, error.message)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def _internal_error(self, request: Request, error: Exception) -> Response:
        import traceback

        self.log(f"error: {type(error).__name__}: {error}\n{traceback.format_exc()}".rstrip())
        failure = APIError(500, f"internal error: {type(error).__name__}: {error}", type=SERVER_ERROR)
        return self._error(request, failure)

    def _log_line(self, request: Request, status: int, started: Optional[float], what: str) -> None:
        took = f" {time.perf_counter() - started:.1f}s" if started is not None else ""
        self.log(f"{request.method} {request.url.path} {status}{took} | {what}")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(outcome: Answer) -> dict:
    return usage(outcome.prompt_tokens, outcome.generation_tokens, outcome.cached_tokens)


def _extension(work: Work, outcome: Answer) -> dict:
    """What the response adds to OpenAI's shape: how SelfExtend ran this request."""
    plan, settings = work.plan, work.plan.settings
    return {
        "attention": settings.method,
        "group_size": settings.group_size,
        "window": None if settings.plain else settings.window,
        "settings": settings.reason,
        "max_length": plan.max_length,
        "trained_context": plan.trained_context,
        "cached_tokens": outcome.cached_tokens,
        "cache": outcome.cache_source,
        "prefilled_tokens": outcome.prompt_tokens - outcome.cached_tokens,
        "prompt_seconds": round(outcome.prompt_seconds, 3),
        "generation_seconds": round(outcome.generation_seconds, 3),
        "stop_reason": outcome.stop_reason,
    }


def _summary(work: Work, outcome: Answer) -> str:
    cached = f", {outcome.cached_tokens:,} cached ({outcome.cache_source})" if outcome.cached_tokens else ""
    return (
        f"prompt {outcome.prompt_tokens:,} tokens{cached} | {work.plan.settings.describe()} | "
        f"answer {outcome.generation_tokens:,} tokens ({outcome.stop_reason})"
    )


# -- the app --------------------------------------------------------------------------------------

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health"]


class GuardMiddleware:
    """Runs guard.py's checks before any route (and before CORS): a refused request is answered
    with its JSON error and goes no further."""

    def __init__(self, app, api: API):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            try:
                self.api.guard.check(request.method, request.headers)
            except APIError as error:
                await self.api._error(request, error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestLimit:
    """At most `limit` HTTP requests under way at once (/health aside, so that it answers under
    any load); beyond it a 503 `server_busy` JSON error with Retry-After. Only requests count:
    a connection that has sent nothing holds no place (runner.RequestDeadline closes it)."""

    def __init__(self, app, api: API, limit: int):
        self.app, self.api, self.limit = app, api, limit
        self.open = 0  # touched on the event loop only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self.open >= self.limit:
            seconds = self.api.engine.retry_after()
            busy = APIError(
                503,
                f"the server is busy: {self.open} requests are under way; retry in about {seconds} s",
                type=SERVER_ERROR,
                code="server_busy",
                headers={"Retry-After": str(seconds)},
            )
            await self.api._error(Request(scope), busy)(scope, receive, send)
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


def create_app(engine: Engine, options: ServerOptions = ServerOptions(), log: Callable[[str], None] = print):
    api = API(engine, options, log)

    async def not_routed(request: Request, error: HTTPException) -> Response:
        if error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = f"no route {request.method} {request.url.path}: this server offers {', '.join(ROUTES)}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return api._error(request, APIError(error.status_code, message, code=code, headers=error.headers))

    routes = []
    for prefix in ("/v1", ""):  # some clients leave /v1 out of their base URL
        routes += [
            Route(f"{prefix}/chat/completions", api.chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", api.completions, methods=["POST"]),
            Route(f"{prefix}/models", api.models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", api.model, methods=["GET"]),
        ]
    routes.append(Route("/health", api.health, methods=["GET"]))
    middleware = [Middleware(GuardMiddleware, api=api)]
    if options.allow_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(options.allow_origins),
                allow_methods=["GET", "POST"],
                # whatever headers the page asks for (the openai JS SDK sends x-stainless-*,
                # OpenAI-Organization, OpenAI-Project...): these origins may call the API anyway
                allow_headers=["*"],
                expose_headers=["Retry-After"],  # so that a page can read when to retry a 503
                max_age=600,
            )
        )
    limit = options.max_open_requests or engine.options.queue_size + OPEN_REQUESTS_BEYOND_QUEUE
    middleware.append(Middleware(RequestLimit, api=api, limit=limit))  # inside CORS: its 503s carry CORS headers

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            for lane in (api.tokenizing, api.tokenizing_large):
                lane.shutdown(wait=False, cancel_futures=True)

    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: not_routed}, lifespan=lifespan
    )
    app.state.api = api
    return app
