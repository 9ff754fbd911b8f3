"""`selfextend serve` as a real process on stories260K: it prints its URL, refuses a port in use
before loading anything, warns when it listens beyond this machine, stays right and flat in
memory under a bounded load (8 clients x 5 requests), lets no idle connections lock clients
out, and stops within seconds with exit 0 on SIGTERM in the middle of a stream or of a long
prefill (where /health stops saying ok at once)."""

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import shared_path
from test_server_support import reference_answer

from selfextend_mlx.loading.load import load
from selfextend_mlx.planning import choose_settings
from selfextend_mlx.server.prompting import completion_prompt

SELFEXTEND = Path(sys.executable).with_name("selfextend")
URL = re.compile(r"serving \S+ at (http://\S+/v1)")


class ServeProcess:
    """`selfextend serve ... --port 0`, its URL, and its stderr collected as it comes."""

    def __init__(self, *args: str, start_seconds: float = 120):
        self.process = subprocess.Popen(
            [str(SELFEXTEND), "serve", "--port", "0", "--no-cache", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        self.url = self._await_url(start_seconds)

    def _await_url(self, seconds: float) -> str:
        found = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(seconds)
        match = URL.search(found[0]) if found else None
        if not match:
            self.process.kill()
            raise AssertionError(f"no URL printed: {found} {''.join(self.stderr)}")
        return match.group(1)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture(scope="module")
def stories_path():
    return str(shared_path("models", "stories260K"))


@pytest.fixture(scope="module")
def stories(stories_path):
    return load(stories_path, selfextend=False)


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [str(SELFEXTEND), "serve", "-m", str(tmp_path / "no-such-model"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use: pick another with --port"
    )
    assert time.monotonic() - started < 30


def test_listening_beyond_localhost_warns(stories_path):
    server = ServeProcess("-m", stories_path, "--host", "0.0.0.0")
    try:
        assert server.url.startswith("http://0.0.0.0:")
    finally:
        assert server.stop() == 0
    warning = [line for line in server.stderr if line.startswith("warning:")]
    assert warning and "other machines can reach this server" in warning[0] and "--api-key" in warning[0]


def test_idle_connections_past_the_request_limit_lock_no_client_out(stories_path):
    """--queue-size 0: 64 requests may be under way; 80 connections that send nothing must
    not count (uvicorn's own limit counted them and answered a plain-text 503)."""
    server = ServeProcess("-m", stories_path, "--queue-size", "0")
    host, port = server.url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    idle = []
    try:
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(80)]
        time.sleep(0.5)
        health = httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        reply = httpx.post(server.url + "/completions", json={"prompt": "Once", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        for connection in idle:
            connection.close()
        assert server.stop() == 0


# -- a bounded load --------------------------------------------------------------------------------

CLIENTS, REQUESTS = 8, 5
ANSWER = 16


def load_prompts(story: str) -> list[list[str]]:
    """Client i asks REQUESTS questions about its own document (so later ones reuse its cache)."""
    questions = ["Who is in it?", "Where are they?", "What happens?", "How does it end?", "Is it happy?"]
    return [
        [f"{story[300 * i : 300 * i + 900]}\n\nQuestion: {q}\nAnswer:" for q in questions[:REQUESTS]]
        for i in range(CLIENTS)
    ]


def test_eight_clients_get_right_answers_and_memory_stays_flat(stories_path, stories):
    model, tokenizer = stories
    prompts = load_prompts(shared_path("text", "tinystories_sample.txt").read_text())
    expected = {}
    for text in {p for client in prompts for p in client}:
        tokens, _ = completion_prompt(text).tokens(tokenizer)
        config = choose_settings(model.model_info.limits, len(tokens) + ANSWER).config()
        expected[text] = reference_answer(model, tokenizer, tokens, config, ANSWER)

    def client(texts):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            return [(text, http.post("/completions", json={"prompt": text, "max_tokens": ANSWER})) for text in texts]

    def round_of_load():
        with ThreadPoolExecutor(CLIENTS) as pool:
            return [answer for answers in pool.map(client, prompts) for answer in answers]

    server = ServeProcess("-m", stories_path, "--cache-size", "8MB")  # full after one round: then flat
    try:
        rounds, memory = [], []
        for _ in range(2):
            rounds.append(round_of_load())
            memory.append(server.rss_bytes())
    finally:
        assert server.stop() == 0
    for answers in rounds:
        assert len(answers) == CLIENTS * REQUESTS
        for text, reply in answers:
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["text"] == expected[text]
    cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for _, r in rounds[0]]
    assert sum(1 for n in cached if n > 0) >= CLIENTS * (REQUESTS - 1)  # later questions reuse the document
    assert memory[1] <= memory[0] * 1.05 + 10e6, [f"{m / 1e6:.0f} MB" for m in memory]
    assert not any("Traceback" in line or "error" in line for line in server.stderr)


# -- stopping -----------------------------------------------------------------------------------------


def assert_shut_down_soon(server, stopped: float, rest: list) -> None:
    """After SIGTERM at `stopped`: exit 0 within seconds, the open stream's last error says the
    server is shutting down (`rest`: its lines after the signal)."""
    code = server.process.wait(20)
    took = time.monotonic() - stopped
    assert code == 0
    assert took < 10, f"{took:.1f}s"
    errors = [line for line in rest if '"error"' in line]
    assert errors and "server_shutting_down" in errors[-1]


def test_sigterm_during_a_stream_ends_it_and_exits_0_within_seconds(stories_path):
    server = ServeProcess("-m", stories_path)
    story = shared_path("text", "tinystories_sample.txt").read_text()[:3000]
    body = {"prompt": story, "max_tokens": 4000, "temperature": 1.0, "seed": 3, "stream": True}
    queued = {}

    def second_request():
        queued["reply"] = httpx.post(server.url + "/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=60)

    with httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        waiting = threading.Thread(target=second_request)
        waiting.start()
        time.sleep(0.5)  # the second request is queued behind the stream
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    waiting.join(30)
    assert_shut_down_soon(server, stopped, rest)
    assert queued["reply"].status_code == 503
    assert queued["reply"].json()["error"]["code"] == "server_shutting_down"
    assert "stopped" in "".join(server.stderr)
    assert not any("Traceback" in line for line in server.stderr)


def test_sigterm_during_a_long_prefill_exits_within_seconds_and_health_stops_saying_ok(stories_path, stories):
    _, tokenizer = stories
    story = shared_path("text", "tinystories_sample.txt").read_text()
    prompt = tokenizer.encode(story)[:6000]  # about 15 s of prefill on a 2-core CPU
    server = ServeProcess("-m", stories_path)
    base = server.url.removesuffix("/v1")
    body = {"prompt": prompt, "max_tokens": 8, "stream": True}
    with (
        httpx.Client(base_url=base, timeout=30) as health,
        httpx.stream("POST", server.url + "/completions", json=body, timeout=60) as reply,
    ):
        assert health.get("/health").json()["status"] == "ok"
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith(": reading the prompt"):
                break
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:  # the same keep-alive connection: a 503 "shutting down", or closed already
            after = health.get("/health")
            assert after.status_code == 503 and after.json()["status"] == "shutting down", after.text
        except httpx.TransportError:
            pass
        rest = list(lines)
    assert_shut_down_soon(server, stopped, rest)
    assert not any("Traceback" in line for line in server.stderr)


def test_ctrl_c_stops_an_idle_server_with_exit_0(stories_path):
    server = ServeProcess("-m", stories_path)
    assert httpx.get(server.url + "/models").status_code == 200
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(20) == 0
    assert not any("Traceback" in line or "interrupted" in line for line in server.stderr)
