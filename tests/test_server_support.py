"""What the server tests share (no tests here): a live server on 127.0.0.1 in this process, a
reference answer computed with mlx-lm directly, and a reader of server-sent events."""

import json
import threading
import time

import uvicorn
from mlx_lm.generate import generate

from selfextend_mlx.core.patch import make_cache, use_selfextend
from selfextend_mlx.server.app import ServerOptions, create_app
from selfextend_mlx.server.engine import Engine, EngineOptions
from selfextend_mlx.server.runner import RequestDeadline, bind, url_of


class LiveServer:
    """The app served by uvicorn in one thread and the engine running in another, as
    `selfextend serve` runs them (there the engine has the main thread)."""

    def __init__(
        self, model, tokenizer, engine_options=EngineOptions(), server_options=ServerOptions(), doc_cache=None
    ):
        self.lines: list[str] = []
        self.engine = Engine(model, tokenizer, engine_options, doc_cache=doc_cache, log=self.lines.append)
        self.sock = bind("127.0.0.1", 0)
        app = create_app(self.engine, server_options, log=self.lines.append)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=1, http=RequestDeadline
        )
        self.server = uvicorn.Server(config)
        self.http = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.worker = threading.Thread(target=self.engine.run_forever, daemon=True)

    def __enter__(self):
        self.worker.start()
        self.http.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.http.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = url_of(self.sock)  # http://127.0.0.1:PORT/v1
        self.base = self.url.removesuffix("/v1")
        return self

    def __exit__(self, *exc):
        self.engine.stopping = True
        self.server.should_exit = True
        self.worker.join(30)
        self.http.join(30)
        self.sock.close()

    def wait_idle(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while self.engine.running is not None or self.engine.waiting:
            assert time.monotonic() < deadline, "the engine is still busy"
            time.sleep(0.01)


def reference_answer(model, tokenizer, tokens, config, max_tokens, kv_bits=None, kv_group_size=64) -> str:
    """Greedy answer for `tokens` straight from mlx-lm's generate (with this project's caches
    when `config` is SelfExtend's): what the server must say for the same prompt."""
    use_selfextend(model, config)
    cache = make_cache(model, kv_bits, kv_group_size)
    return generate(model, tokenizer, list(tokens), max_tokens=max_tokens, prompt_cache=cache, prefill_step_size=512)


def sse_events(response) -> tuple[list[dict], list[str]]:
    """The data events (JSON, until [DONE]) and the comment lines of a streamed response."""
    events, comments = [], []
    for line in response.iter_lines():
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data: "):
            data = line[len("data: ") :]
            if data == "[DONE]":
                events.append("[DONE]")
                break
            events.append(json.loads(data))
    return events, comments
