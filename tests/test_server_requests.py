"""Request fields on stories260K over real HTTP (issue 26, item 7): a stream with
include_usage, mlx_lm.server's sampling fields (top_k, min_p, repetition_penalty) applied
rather than ignored, and a conversation with a model without a chat template reusing the
cache of its earlier turns."""

import httpx
import pytest
from test_server_support import LiveServer, sse_events

ANSWER = 24


@pytest.fixture(scope="module")
def server(stories):
    model, tokenizer = stories
    with LiveServer(model, tokenizer) as live:
        yield live


def complete(server, **fields) -> str:
    body = {"prompt": "Once upon a time", "max_tokens": ANSWER, **fields}
    reply = httpx.post(server.url + "/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_with_include_usage_every_chunk_before_the_last_has_usage_null(server, path):
    body = {"max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    body |= {"messages": [{"role": "user", "content": "Once"}]} if "chat" in path else {"prompt": "Once"}
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as reply:
        events, _ = sse_events(reply)
    *chunks, last, done = events
    assert done == "[DONE]" and len(chunks) >= 2
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    with httpx.stream("POST", server.url + path, json={**body, "stream_options": None}, timeout=120) as reply:
        events, _ = sse_events(reply)
    assert not any("usage" in chunk for chunk in events[:-1])  # without it, OpenAI's chunks have no usage


def test_top_k_and_min_p_of_one_token_sample_the_greedy_answer(server):
    greedy = complete(server)
    sampled = [complete(server, temperature=1.0, seed=seed) for seed in (1, 2, 3)]
    assert any(text != greedy for text in sampled)  # temperature 1 alone wanders off
    for seed in (1, 2, 3):
        assert complete(server, temperature=1.0, seed=seed, top_k=1) == greedy
        assert complete(server, temperature=1.0, seed=seed, min_p=1.0) == greedy
    assert complete(server, temperature=1.0, seed=1, top_k=0) == sampled[0]  # 0: no top-k


def test_a_repetition_penalty_changes_the_greedy_answer(server):
    """The penalty looks at the answer so far (the prompt's last token and the answer's)."""
    long = {"max_tokens": 64}
    greedy = complete(server, **long)
    penalized = complete(server, repetition_penalty=3.0, **long)
    assert penalized != greedy
    assert complete(server, repetition_penalty=3.0, **long) == penalized  # still greedy: repeatable
    assert complete(server, repetition_penalty=1.0, **long) == greedy  # 1: no penalty
    assert complete(server, repetition_penalty=3.0, repetition_context_size=1, **long) != penalized


def test_without_a_chat_template_a_second_turn_reuses_the_first(server, stories):
    _, tokenizer = stories
    assert not tokenizer.has_chat_template
    history = [{"role": "user", "content": "Tom had a red ball."}]
    first = httpx.post(server.url + "/chat/completions", json={"messages": history, "max_tokens": 12}, timeout=120)
    first = first.json()
    history += [first["choices"][0]["message"], {"role": "user", "content": "What did Tom do?"}]
    second = httpx.post(server.url + "/chat/completions", json={"messages": history, "max_tokens": 12}, timeout=120)
    second = second.json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
