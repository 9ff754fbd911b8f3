"""What a web page may not do to the local server (issue 29.1), as raw HTTP on loopback: a
"simple" cross-origin POST (text/plain, a form), a request sent to a rebound host name, a
request from another origin. Each is a 4xx JSON error, runs nothing, and the server keeps
serving; the server's disk store keeps to the document cache's size limit."""

import json

import httpx
import pytest
from test_server_support import LiveServer

from selfextend_mlx.app.doccache import DocumentCache
from selfextend_mlx.server.app import ServerOptions
from selfextend_mlx.server.engine import EngineOptions
from selfextend_mlx.server.guard import RequestGuard, host_name

BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(stories):
    model, tokenizer = stories
    options = ServerOptions(allow_hosts=("myhost.lan",), allow_origins=("http://localhost:3000",))
    with LiveServer(model, tokenizer, server_options=options) as live:
        yield live


def post(server, headers, path="/chat/completions"):
    return httpx.post(server.url + path, content=BODY, headers=headers, timeout=TIMEOUT)


def refused(reply, status, code):
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["code"] == code


def test_host_names():
    assert host_name("LocalHost:8080") == "localhost" and host_name("[::1]:80") == "::1"
    guard = RequestGuard("127.0.0.1", allow_hosts=("box.lan",))
    for good in ("127.0.0.1:8080", "localhost", "app.localhost:1", "[::1]:8080", "10.0.0.7", "box.lan:8080"):
        assert guard.host_allowed(good), good
    for bad in ("evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "", None):
        assert not guard.host_allowed(bad), bad
    assert RequestGuard("0.0.0.0", allow_hosts=("*",)).host_allowed("anything.example")
    assert RequestGuard("my.box").host_allowed("my.box:8080")


def test_a_simple_cross_origin_post_runs_nothing(server):
    before = len(server.engine.store)
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        refused(post(server, {"Content-Type": kind}), 415, "unsupported_media_type")
        refused(post(server, {"Content-Type": kind, "Origin": "http://evil.example"}), 403, "origin_not_allowed")
    assert len(server.engine.store) == before  # nothing ran
    assert post(server, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200
    assert post(server, {}).status_code == 200  # command-line clients that send no type


def test_a_rebound_host_name_is_refused_on_every_route(server):
    for method, path in (("POST", "/chat/completions"), ("GET", "/models"), ("GET", "/health")):
        url = server.base + ("/v1" if path != "/health" else "") + path
        reply = httpx.request(method, url, content=BODY, headers={"Host": "evil.example:8080"}, timeout=TIMEOUT)
        refused(reply, 421, "host_not_allowed")
    assert post(server, {"Host": "myhost.lan:8080", "Content-Type": "application/json"}).status_code == 200
    assert post(server, {"Host": "localhost", "Content-Type": "application/json"}).status_code == 200


def test_only_allowed_origins_may_call(server):
    own = server.base.removeprefix("http://")
    assert post(server, {"Origin": "http://localhost:3000", "Content-Type": "application/json"}).status_code == 200
    assert post(server, {"Origin": f"http://{own}", "Content-Type": "application/json"}).status_code == 200
    refused(post(server, {"Origin": "null", "Content-Type": "application/json"}), 403, "origin_not_allowed")
    assert httpx.get(server.url + "/models", timeout=TIMEOUT).status_code == 200


# What the official openai JavaScript SDK (v4, v5) sends from a browser besides the body's type.
SDK_HEADERS = (
    "authorization,content-type,openai-beta,openai-organization,openai-project,x-stainless-arch,"
    "x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
    "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"
)


def test_a_browser_running_the_openai_js_sdk_may_call_from_an_allowed_origin(server):
    page = {"Origin": "http://localhost:3000"}
    asked = {**page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": SDK_HEADERS}
    preflight = httpx.options(server.url + "/chat/completions", headers=asked, timeout=TIMEOUT)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert set(SDK_HEADERS.split(",")) <= allowed
    sdk = {name: "1" for name in SDK_HEADERS.split(",") if name.startswith(("x-", "openai-"))}
    reply = post(server, {**page, **sdk, "Content-Type": "application/json", "Authorization": "Bearer x"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "retry-after" in reply.headers["access-control-expose-headers"].lower()
    other = {**asked, "Origin": "http://evil.example"}
    refused(httpx.options(server.url + "/chat/completions", headers=other, timeout=TIMEOUT), 403, "origin_not_allowed")


def test_the_disk_store_keeps_to_the_size_limit(stories, tmp_path):
    model, tokenizer = stories
    prompt = " ".join(f"w{i}" for i in range(300))
    store = DocumentCache(tmp_path, max_bytes=1)  # room for the newest entry only
    with LiveServer(model, tokenizer, EngineOptions(disk_min_tokens=64), doc_cache=store) as live:
        for n in range(4):
            body = {"prompt": f"{n} {prompt}\n\nQuestion: What?\nAnswer:", "max_tokens": 1}
            assert httpx.post(live.url + "/completions", json=body, timeout=TIMEOUT).status_code == 200
    (entry,) = DocumentCache(tmp_path).entries()
    assert entry.metadata["documents"].startswith("served: 3 ")
