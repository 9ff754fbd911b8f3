"""Every bad request, as raw HTTP: OpenAI's JSON error body with the right status and code,
never a traceback, and the server answers the next good request."""

import json
import socket

import httpx
import pytest
from conftest import shared_path
from test_server_support import LiveServer

from selfextend_mlx.planning import ENV_MAX_MEMORY
from selfextend_mlx.server.app import ServerOptions

LIMIT = 64_000  # bytes: the request-size cap of the server under test
USER = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def server(stories):
    model, tokenizer = stories
    with LiveServer(model, tokenizer, server_options=ServerOptions(max_request_bytes=LIMIT)) as live:
        yield live


def chat(**fields):
    return json.dumps({"messages": USER, "max_tokens": 2, **fields})


def still_serves(server) -> None:
    good = httpx.post(server.url + "/chat/completions", content=chat(), timeout=60)
    assert good.status_code == 200, good.text


def check_error(reply, status, code=None, param=None) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


BAD_BODIES = [
    ("not json", b'{"messages": [', None),
    ("not an object", b"[1, 2]", None),
    ("not utf-8", b"\xff\xfe{}", None),
    ("nested too deeply", b"[" * 20_000, None),
    ("a lone surrogate", b'{"messages": [{"role": "user", "content": "caf\\ud800"}]}', None),
    ("missing messages", b'{"model": "stories260K"}', "messages"),
    ("empty messages", b'{"messages": []}', "messages"),
    ("messages not a list", b'{"messages": "hi"}', "messages"),
    ("message without a role", b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
    ("unknown role", b'{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role"),
    ("tool role", b'{"messages": [{"role": "tool", "content": "hi"}]}', "messages[0].role"),
    ("content a number", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (
        "an image part",
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
        "messages[0].content",
    ),
    ("max_tokens a string", chat(max_tokens="5").encode(), "max_tokens"),
    ("max_tokens zero", chat(max_tokens=0).encode(), "max_tokens"),
    ("max_tokens a float", chat(max_tokens=2.5).encode(), "max_tokens"),
    ("temperature too high", chat(temperature=5).encode(), "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
    ("top_p zero", chat(top_p=0).encode(), "top_p"),
    ("seed a string", chat(seed="1").encode(), "seed"),
    ("stream a string", chat(stream="yes").encode(), "stream"),
    ("five stop sequences", chat(stop=list("abcde")).encode(), "stop"),
    ("an empty stop sequence", chat(stop=[""]).encode(), "stop"),
    ("n of 2", chat(n=2).encode(), "n"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]).encode(), "tools"),
    ("logprobs", chat(logprobs=True).encode(), "logprobs"),
    ("a penalty", chat(presence_penalty=0.5).encode(), "presence_penalty"),
    ("json mode", chat(response_format={"type": "json_object"}).encode(), "response_format"),
    ("stream_options not an object", chat(stream_options=True).encode(), "stream_options"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}).encode(), "stream_options"),
    ("an empty user message", b'{"messages": [{"role": "user", "content": ""}]}', "messages[0].content"),
    (
        "a blank user message",
        chat(messages=[*USER, {"role": "user", "content": " \n"}]).encode(),
        "messages[1].content",
    ),
    ("a user message without content", b'{"messages": [{"role": "user"}]}', "messages[0].content"),
    ("top_k a float", chat(top_k=1.5).encode(), "top_k"),
    ("min_p above 1", chat(min_p=1.5).encode(), "min_p"),
    ("a negative repetition penalty", chat(repetition_penalty=-1).encode(), "repetition_penalty"),
]


@pytest.mark.parametrize("what, body, param", BAD_BODIES, ids=[case[0] for case in BAD_BODIES])
def test_a_bad_chat_request_is_a_400(server, what, body, param):
    reply = httpx.post(server.url + "/chat/completions", content=body, headers={"content-type": "application/json"})
    check_error(reply, 400, param=param)


BAD_COMPLETIONS = [
    ("no prompt", {}, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt"),
    ("token ids out of the vocabulary", {"prompt": [1, 2, 100000]}, "prompt"),
    ("an empty token list", {"prompt": []}, "prompt"),
    ("a suffix", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("best_of", {"prompt": "a", "best_of": 3}, "best_of"),
    ("stream_options without stream", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("what, body, param", BAD_COMPLETIONS, ids=[case[0] for case in BAD_COMPLETIONS])
def test_a_bad_completion_request_is_a_400(server, what, body, param):
    check_error(httpx.post(server.url + "/completions", json=body), 400, param=param)


def test_the_server_still_serves_after_bad_requests(server):
    for _, body, _ in BAD_BODIES:
        httpx.post(server.url + "/chat/completions", content=body)
    still_serves(server)
    assert not any("Traceback" in line for line in server.lines)


def test_a_prompt_beyond_the_reach_is_context_length_exceeded_with_the_numbers(server, stories):
    model, _ = stories
    reach = server.engine.reach()
    words = " ".join(["story"] * (reach + 100))  # more tokens than any G reaches
    reply = httpx.post(server.url + "/completions", json={"prompt": words, "max_tokens": 10}, timeout=60)
    error = check_error(reply, 400, code="context_length_exceeded", param="messages")
    assert error["max_context_length"] == reach
    assert error["prompt_tokens"] > reach and error["completion_tokens"] == 10
    assert error["requested_tokens"] == error["prompt_tokens"] + 10
    assert error["trained_context"] == model.model_info.trained_context == 512
    assert f"{reach:,}" in error["message"]
    still_serves(server)


def test_an_answer_budget_past_the_reach_is_context_length_exceeded(server):
    reply = httpx.post(server.url + "/chat/completions", content=chat(max_tokens=10**6))
    check_error(reply, 400, code="context_length_exceeded")


def test_more_memory_than_the_machine_has_is_a_400(server, monkeypatch):
    monkeypatch.setenv(ENV_MAX_MEMORY, "1MB")
    reply = httpx.post(server.url + "/chat/completions", content=chat())
    assert "not enough memory" in check_error(reply, 400, code="insufficient_memory")["message"]
    monkeypatch.delenv(ENV_MAX_MEMORY)
    still_serves(server)


def test_an_unknown_model_is_a_404(server):
    for name in ("gpt-4o", "../../etc/passwd", str(shared_path("models", "stories260K")) + "/../x"):
        reply = httpx.post(server.url + "/chat/completions", content=chat(model=name))
        assert name in check_error(reply, 404, code="model_not_found", param="model")["message"]
    check_error(httpx.get(f"{server.url}/models/gpt-4o"), 404, code="model_not_found")
    for name in ("stories260K", "STORIES260K", str(shared_path("models", "stories260K"))):
        assert httpx.post(server.url + "/chat/completions", content=chat(model=name)).status_code == 200


def test_a_body_over_the_cap_is_a_413(server):
    big = chat(padding="x" * LIMIT).encode()
    check_error(httpx.post(server.url + "/chat/completions", content=big), 413, code="request_too_large")
    chunked = iter([big[i : i + 4096] for i in range(0, len(big), 4096)])  # no Content-Length: counted as read
    check_error(httpx.post(server.url + "/chat/completions", content=chunked), 413, code="request_too_large")
    still_serves(server)


def test_unknown_routes_and_methods_are_json(server):
    error = check_error(httpx.get(server.url + "/engines"), 404, code="not_found")
    assert "/v1/chat/completions" in error["message"]
    reply = httpx.get(server.url + "/chat/completions")
    check_error(reply, 405, code="method_not_allowed")
    assert "POST" in reply.headers["allow"]


def test_a_half_sent_request_does_not_stop_the_server(server):
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"mess')
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")
    still_serves(server)


def test_an_api_key_is_required_when_set(stories):
    model, tokenizer = stories
    with LiveServer(model, tokenizer, server_options=ServerOptions(api_key="s3cret")) as live:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = httpx.post(live.url + "/chat/completions", content=chat(), headers=headers)
            check_error(reply, 401, code="invalid_api_key")
            assert reply.headers["www-authenticate"] == "Bearer"
            check_error(httpx.get(live.url + "/models", headers=headers), 401, code="invalid_api_key")
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.post(live.url + "/chat/completions", content=chat(), headers=key).status_code == 200
        assert httpx.get(live.url + "/models", headers=key).status_code == 200
        assert httpx.get(live.base + "/health").status_code == 200  # for a load balancer's checks
