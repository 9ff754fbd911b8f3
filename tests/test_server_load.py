"""The server under many clients (issue 26), loopback only, every loop bounded: clients that
left hold no queue place, idle connections are closed, Retry-After follows the running job,
prefill steps stay short enough for a cancellation to be heard, and a huge prompt is refused
before it is tokenized while a long one never holds up a short one."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
from conftest import shared_path
from test_server_support import LiveServer

from selfextend_mlx.app.generation import Sampling
from selfextend_mlx.app.turns import MIN_STEP, TurnCancelled, TurnRunner
from selfextend_mlx.loading.load import model_info
from selfextend_mlx.planning import plan_run
from selfextend_mlx.server import app as server_app
from selfextend_mlx.server import runner as server_runner
from selfextend_mlx.server.app import ServerOptions
from selfextend_mlx.server.engine import Engine, EngineOptions, Job
from selfextend_mlx.server.prompting import longest_token
from selfextend_mlx.server.protocol import APIError


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_clients_that_left_hold_no_place_in_the_queue(stories, loop):
    model, tokenizer = stories
    engine = Engine(model, tokenizer, EngineOptions(queue_size=3))
    work = engine.prepare(tokenizer.encode("Once upon a time"), max_tokens=4)
    left = [Job(work, loop) for _ in range(4)]
    for job in left:
        engine.submit(job)
    with pytest.raises(APIError) as busy:
        engine.submit(Job(work, loop))
    assert busy.value.status == 503
    for job in left:
        job.cancel()  # their clients timed out while the queue waited
    assert engine.waiting == 0
    assert engine.submit(Job(work, loop)) == 0  # a new client is taken at once


def held(model, monkeypatch) -> threading.Event:
    """Every forward pass of `model` waits (30 s at most) until the returned event is set: a
    request the engine takes up stays running until then."""
    release, original = threading.Event(), type(model).__call__

    def waiting(self, *args, **kwargs):
        release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", waiting)
    return release


def health(live) -> dict:
    return httpx.get(live.base + "/health", timeout=10).json()


def test_queued_clients_that_leave_over_http_leave_the_queue_at_once(stories, monkeypatch):
    model, tokenizer = stories
    release = held(model, monkeypatch)
    gave_up = []

    def impatient(stream: bool) -> None:  # gives up after 3 s in the queue
        body = {"prompt": "Once", "max_tokens": 2, "stream": stream}
        try:
            with httpx.stream("POST", live.url + "/completions", json=body, timeout=httpx.Timeout(10, read=3)) as r:
                list(r.iter_lines())
        except httpx.ReadTimeout:
            gave_up.append(stream)

    with LiveServer(model, tokenizer, EngineOptions(queue_size=4)) as live:
        running = {"prompt": "Once upon a time", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", live.url + "/completions", json=running, timeout=60):
            try:
                deadline = time.monotonic() + 10
                while not health(live)["running"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                clients = [threading.Thread(target=impatient, args=(i % 2 == 0,)) for i in range(4)]
                for client in clients:
                    client.start()
                while health(live)["waiting"] < 4 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert health(live)["waiting"] == 4
                for client in clients:
                    client.join(30)
                left = time.monotonic()
                while health(live)["waiting"] and time.monotonic() < left + 5:
                    time.sleep(0.02)
                assert health(live)["waiting"] == 0 and health(live)["running"]  # the first still runs
                assert time.monotonic() - left < 2  # they left at once, not when it ends
            finally:
                release.set()
    assert sorted(gave_up) == [False, False, True, True]


def test_retry_after_follows_the_running_job(stories, loop):
    model, tokenizer = stories
    engine = Engine(model, tokenizer)
    work = engine.prepare(tokenizer.encode("Once upon a time") * 20, max_tokens=100)
    running = Job(work, loop)
    engine._seconds.extend([14.0, 14.0])  # recent jobs were quick
    running.started = time.perf_counter() - 120  # this one has run for 2 minutes
    running.prompt_done = len(work.tokens)  # and read its prompt: 100 answer tokens are left
    engine.running = running
    expected = 120 * 100 / len(work.tokens)
    assert engine.retry_after() == pytest.approx(expected, abs=1.5) and engine.retry_after() > 14
    running.prompt_done = 0  # no progress yet: at least as long again as it has run
    assert engine.retry_after() >= 120


def test_a_busy_503_over_http_counts_the_time_the_running_request_has_taken(stories, monkeypatch):
    model, tokenizer = stories
    release = held(model, monkeypatch)
    with LiveServer(model, tokenizer, EngineOptions(queue_size=0)) as live:
        live.engine._seconds.extend([1.0, 1.0])  # past requests took a second
        body = {"prompt": "Once upon a time", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", live.url + "/completions", json=body, timeout=60):
            try:
                deadline = time.monotonic() + 10
                while not health(live)["running"] and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(3)  # this one has run 3 s and not read its prompt yet
                busy = httpx.post(live.url + "/completions", json={"prompt": "Once", "max_tokens": 2}, timeout=10)
            finally:
                release.set()
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
    assert int(busy.headers["Retry-After"]) >= 3  # not the 1 s of the past requests


def test_idle_connections_are_closed_and_every_client_still_gets_in(stories, monkeypatch):
    monkeypatch.setattr(server_runner, "REQUEST_SECONDS", 0.5)
    model, tokenizer = stories
    with LiveServer(model, tokenizer, EngineOptions(queue_size=2)) as live:
        host, port = live.sock.getsockname()[:2]
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(20)]
        try:
            time.sleep(1.5)
            for connection in idle:
                assert connection.recv(1) == b""  # closed by the server
        finally:
            for connection in idle:
                connection.close()
        assert httpx.get(live.base + "/health", timeout=10).status_code == 200


def test_a_body_that_stops_coming_is_a_408_and_the_connection_is_freed(stories, monkeypatch):
    monkeypatch.setattr(server_app, "BODY_SECONDS", 0.5, raising=False)
    model, tokenizer = stories
    with LiveServer(model, tokenizer) as live:
        with socket.create_connection(live.sock.getsockname()[:2], timeout=10) as raw:
            raw.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"pro')
            answer = ""
            for _ in range(20):  # the status line and headers, then the body
                piece = raw.recv(65536).decode()
                answer += piece
                if not piece or "request_timeout" in answer:
                    break
        assert answer.startswith("HTTP/1.1 408"), answer
        assert '"code":"request_timeout"' in answer.replace(" ", "")
        assert httpx.get(live.base + "/health", timeout=10).status_code == 200


def test_slow_prefill_steps_shrink_so_a_cancellation_is_heard_soon(stories):
    model, tokenizer = stories
    info = model_info(model)
    tokens = tokenizer.encode(shared_path("text", "tinystories_sample.txt").read_text()[:2000])[:300]
    plan = plan_run(info, len(tokens) + 4, prompt_tokens=len(tokens), max_tokens=4, prefill_step=128)

    def runner(step_seconds):
        made = TurnRunner(model, tokenizer, model_info=info, step_seconds=step_seconds)
        made.use(plan)
        return made

    fed, original = [], type(model).__call__

    def counting(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[1])
        return original(self, inputs, *args, **kwargs)

    type(model).__call__ = counting
    try:
        timed = runner(1e-9)  # every step is "too slow"
        answer = timed.answer(tokens, Sampling(stop_loops=False))
    finally:
        type(model).__call__ = original
    prompt_steps = [n for n in fed if n > 1]  # decoding feeds one token at a time
    assert prompt_steps[:4] == [128, 64, 32, MIN_STEP] and max(prompt_steps[3:]) <= MIN_STEP
    assert answer.text == runner(None).answer(tokens, Sampling(stop_loops=False)).text
    calls = []
    with pytest.raises(TurnCancelled):
        runner(1e-9).feed(tokens, cancel=lambda: calls.append(1) or len(calls) > 5)


# -- huge prompts ---------------------------------------------------------------------------------


def counting_encode(tokenizer, monkeypatch, before=lambda text: None) -> list[int]:
    """The lengths of the texts the tokenizer is asked to encode from now on (before(text)
    runs first)."""
    seen, original = [], tokenizer._tokenizer.encode

    def encode(text, **kwargs):
        seen.append(len(text))
        before(text)
        return original(text, **kwargs)

    monkeypatch.setattr(tokenizer._tokenizer, "encode", encode)
    return seen


def test_a_prompt_too_long_for_the_reach_is_refused_before_it_is_tokenized(stories, monkeypatch):
    model, tokenizer = stories
    longest = longest_token(tokenizer)
    text = shared_path("text", "tinystories_sample.txt").read_text()
    assert len(tokenizer.encode(text)) >= len(text) / longest  # the bound holds for real text
    seen = counting_encode(tokenizer, monkeypatch)
    with LiveServer(model, tokenizer) as live:
        reach = live.engine.reach()
        huge = (text * (reach * longest // len(text) + 1))[: reach * longest]
        started = time.perf_counter()
        for path, body in (
            ("/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
            ("/completions", {"prompt": huge}),
        ):
            reply = httpx.post(live.url + path, json=body, timeout=60)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["min_prompt_tokens"] >= reach
            assert error["max_context_length"] == reach and error["prompt_characters"] == len(huge)
        assert time.perf_counter() - started < 10
        assert not any(n >= len(huge) // 2 for n in seen)  # nothing that long was tokenized
        tokens = httpx.post(live.url + "/completions", json={"prompt": [1] * reach}, timeout=60)
        assert tokens.json()["error"]["code"] == "context_length_exceeded"
        assert httpx.post(live.url + "/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_short_request_is_answered_while_a_long_prompt_is_tokenized(stories, monkeypatch):
    monkeypatch.setattr(server_app, "LARGE_PROMPT_CHARS", 1000, raising=False)
    model, tokenizer = stories
    entered, release = threading.Event(), threading.Event()

    def stall(text):
        if len(text) > 1000:  # a long prompt tokenizes until released (30 s at most)
            entered.set()
            release.wait(30)

    counting_encode(tokenizer, monkeypatch, stall)
    results = {}
    with LiveServer(model, tokenizer) as live:
        long = {"prompt": "Once upon a time " * 100, "max_tokens": 2}
        sender = threading.Thread(
            target=lambda: results.update(long=httpx.post(live.url + "/completions", json=long, timeout=60))
        )
        sender.start()
        try:
            assert entered.wait(30)
            for _ in range(3):
                short = httpx.post(live.url + "/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
                assert short.status_code == 200, short.text
            assert sender.is_alive() and not release.is_set()  # all while the long one was tokenized
        finally:
            release.set()
            sender.join(60)
    assert results["long"].status_code == 200, results["long"].text


def test_past_the_open_request_limit_a_503_is_json_and_health_still_answers(stories, monkeypatch):
    model, tokenizer = stories
    release, stalled = threading.Event(), []

    def stall(text):
        if "STALL" in text:  # both requests stay under way (tokenizing) until released
            stalled.append(text)
            release.wait(30)

    counting_encode(tokenizer, monkeypatch, stall)
    replies = []
    with LiveServer(model, tokenizer, server_options=ServerOptions(max_open_requests=2)) as live:
        idle = [socket.create_connection(live.sock.getsockname()[:2], timeout=5) for _ in range(5)]
        body = {"prompt": "STALL once", "max_tokens": 2}
        senders = [
            threading.Thread(target=lambda: replies.append(httpx.post(live.url + "/completions", json=body)))
            for _ in range(2)
        ]
        try:
            for sender in senders:
                sender.start()
            deadline = time.monotonic() + 30
            while len(stalled) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = httpx.post(live.url + "/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
            assert busy.status_code == 503, busy.text
            assert busy.headers["content-type"].startswith("application/json")
            assert busy.json()["error"]["code"] == "server_busy" and int(busy.headers["Retry-After"]) >= 1
            assert httpx.get(live.base + "/health", timeout=10).json()["status"] == "ok"
        finally:
            release.set()
            for sender in senders:
                sender.join(60)
            for connection in idle:
                connection.close()
        assert [reply.status_code for reply in replies] == [200, 200]
        assert httpx.post(live.url + "/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
