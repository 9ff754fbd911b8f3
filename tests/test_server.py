"""The server on stories260K (real weights, 512-token context), over real HTTP on 127.0.0.1:
OpenAI's shapes, answers equal to mlx-lm's own, the plan per request, cache reuse in memory and
on disk, stop sequences and seeds, and client disconnects."""

import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import shared_path
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer
from test_server_support import LiveServer, reference_answer, sse_events

from selfextend_mlx.app.doccache import DocumentCache
from selfextend_mlx.loading.load import load
from selfextend_mlx.planning import choose_settings
from selfextend_mlx.server.engine import EngineOptions
from selfextend_mlx.server.prompt_cache import settings_key
from selfextend_mlx.server.prompting import completion_prompt

ANSWER = 24  # tokens: short enough that no answer is cut as a repetition loop


@pytest.fixture
def server(stories):
    model, tokenizer = stories
    with LiveServer(model, tokenizer) as live:
        yield live


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


# -- shapes -------------------------------------------------------------------------------------


def test_chat_completion_in_openai_shape(server):
    body = {"model": "stories260K", "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 8}
    reply = post(server, "/chat/completions", body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "stories260K" and isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert data["selfextend"]["attention"] == "plain"


def test_stream_sends_the_same_answer_in_chunks(server):
    body = {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": ANSWER}
    whole = post(server, "/chat/completions", body).json()
    with httpx.stream(
        "POST",
        server.url + "/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events, _ = sse_events(reply)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finish] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == ANSWER


def test_text_completion_and_echo(server):
    body = {"prompt": "Once upon a time", "max_tokens": 6}
    data = post(server, "/completions", body).json()
    assert data["object"] == "text_completion"
    text = data["choices"][0]["text"]
    echoed = post(server, "/completions", {**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Once upon a time" + text
    with httpx.stream("POST", server.url + "/completions", json={**body, "stream": True}) as reply:
        events, _ = sse_events(reply)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_and_health(server):
    models = httpx.get(server.url + "/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == "stories260K" and card["object"] == "model"
    assert card["trained_context"] == 512 and card["context_length"] > 512
    assert httpx.get(server.url + "/models/stories260K").json()["id"] == "stories260K"
    health = httpx.get(server.base + "/health").json()
    assert health["status"] == "ok" and health["model"] == "stories260K"
    assert httpx.get(server.base + "/chat/completions").status_code == 405  # the /v1-less aliases exist


# -- answers --------------------------------------------------------------------------------------


def test_answer_equals_mlx_lm_within_the_trained_context(server, stories, story):
    model, tokenizer = stories
    tokens = tokenizer.encode(story[:600])
    data = post(server, "/completions", {"prompt": tokens, "max_tokens": ANSWER}).json()
    assert data["selfextend"]["group_size"] == 1 and data["usage"]["prompt_tokens"] == len(tokens)
    server.wait_idle()
    assert data["choices"][0]["text"] == reference_answer(model, tokenizer, tokens, None, ANSWER)


def test_a_prompt_past_the_trained_context_gets_the_smallest_group_size(server, stories, story):
    model, tokenizer = stories
    tokens = tokenizer.encode(story[:3000])
    assert len(tokens) > 1000
    data = post(server, "/completions", {"prompt": tokens, "max_tokens": ANSWER}).json()
    expected = choose_settings(model.model_info.limits, len(tokens) + ANSWER)
    assert expected.group_size > 1
    extension = data["selfextend"]
    assert (extension["group_size"], extension["window"]) == (expected.group_size, expected.window)
    assert extension["attention"] == "selfextend" and extension["settings"] == "extends"
    server.wait_idle()
    answer = reference_answer(model, tokenizer, tokens, expected.config(), ANSWER)
    assert data["choices"][0]["text"] == answer


def test_a_second_question_about_a_document_reads_only_the_question(server, stories, story):
    model, tokenizer = stories
    document = story[:2400]
    questions = ["Question: Who went out?\nAnswer:", "Question: What did she see?\nAnswer:"]
    first = post(server, "/completions", {"prompt": f"{document}\n\n{questions[0]}", "max_tokens": ANSWER}).json()
    second = post(server, "/completions", {"prompt": f"{document}\n\n{questions[1]}", "max_tokens": ANSWER}).json()
    prompt = completion_prompt(f"{document}\n\n{questions[1]}")
    tokens, prefix = prompt.tokens(tokenizer)
    assert first["selfextend"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens"] == len(tokens)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= prefix > 1000
    assert second["selfextend"]["cache"] == "memory"
    assert second["selfextend"]["prefilled_tokens"] < 30
    server.wait_idle()
    settings = choose_settings(model.model_info.limits, len(tokens) + ANSWER)
    assert second["choices"][0]["text"] == reference_answer(model, tokenizer, tokens, settings.config(), ANSWER)


def test_a_cache_made_with_other_settings_is_never_reused(server, stories, story):
    model, tokenizer = stories
    short = post(server, "/completions", {"prompt": f"{story[:800]}\n\nQuestion: Who?\nAnswer:", "max_tokens": 8})
    assert short.json()["selfextend"]["group_size"] == 1
    text = f"{story[:800]}\n\n{story[800:2800]}\n\nQuestion: Who?\nAnswer:"  # the same start, past 512
    long = post(server, "/completions", {"prompt": text, "max_tokens": ANSWER}).json()
    assert long["selfextend"]["group_size"] > 1 and long["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    server.wait_idle()
    tokens, _ = completion_prompt(text).tokens(tokenizer)
    config = choose_settings(model.model_info.limits, len(tokens) + ANSWER).config()
    assert long["choices"][0]["text"] == reference_answer(model, tokenizer, tokens, config, ANSWER)


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(stories):
    """stories260K's tokenizer with a chat template (it has none)."""
    _, tokenizer = stories
    fresh = load_tokenizer(Path(tokenizer._tokenizer.name_or_path))
    fresh._tokenizer.chat_template = CHATML
    return TokenizerWrapper(fresh._tokenizer, eos_token_ids=tokenizer.eos_token_ids)


def test_a_conversation_continues_from_its_own_cache(stories, chat_tokenizer):
    model, _ = stories
    with LiveServer(model, chat_tokenizer) as live:
        history = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "Tom had a red ball."}]
        first = post(live, "/chat/completions", {"messages": history, "max_tokens": 12}).json()
        history += [first["choices"][0]["message"], {"role": "user", "content": "What did Tom do?"}]
        second = post(live, "/chat/completions", {"messages": history, "max_tokens": 12}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]


def test_stop_sequences_end_the_answer_before_them(server):
    body = {"prompt": "Once upon a time", "max_tokens": ANSWER}
    full = post(server, "/completions", body).json()["choices"][0]["text"]
    word = full.split()[3]
    cut = post(server, "/completions", {**body, "stop": [word, "zzz"]}).json()
    assert cut["choices"][0]["text"] == full[: full.index(word)]
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["selfextend"]["stop_reason"] == "stop_sequence"
    with httpx.stream("POST", server.url + "/completions", json={**body, "stop": word, "stream": True}) as reply:
        events, _ = sse_events(reply)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full[: full.index(word)]


def test_a_seed_repeats_a_sampled_answer(server):
    body = {"prompt": "Once upon a time", "max_tokens": ANSWER, "temperature": 1.0, "seed": 7}
    texts = {post(server, "/completions", body).json()["choices"][0]["text"] for _ in range(2)}
    assert len(texts) == 1
    others = {post(server, "/completions", {**body, "seed": seed}).json()["choices"][0]["text"] for seed in range(8)}
    assert len(others) > 1  # sampling does sample


def test_no_max_tokens_near_the_reach_gets_what_is_left(stories, story):
    model, tokenizer = stories
    with LiveServer(model, tokenizer, EngineOptions(group_size=2, max_tokens=400)) as live:
        reach = (512 - 128) * 2 + 128  # N_max for G=2 with stories260K's window (512 // 4)
        tokens = tokenizer.encode(story)[: reach - 5]
        data = post(live, "/completions", {"prompt": tokens}).json()
        assert data["usage"]["completion_tokens"] <= 5
        refused = post(live, "/completions", {"prompt": tokens, "max_tokens": 6})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"


# -- the document cache on disk ------------------------------------------------------------------


def test_a_restarted_server_reads_the_document_from_the_disk_cache(stories, story, tmp_path):
    model, tokenizer = stories
    options = EngineOptions(disk_min_tokens=256)
    body = {"prompt": f"{story[:2000]}\n\nQuestion: Where did she go?\nAnswer:", "max_tokens": ANSWER}
    with LiveServer(model, tokenizer, options, doc_cache=DocumentCache(tmp_path)) as live:
        first = post(live, "/completions", body).json()
    (entry,) = DocumentCache(tmp_path).entries()
    assert entry.metadata["documents"].startswith("served: once upon a time")
    with LiveServer(model, tokenizer, options, doc_cache=DocumentCache(tmp_path)) as live:
        again = post(live, "/completions", body).json()
    _, prefix = completion_prompt(body["prompt"]).tokens(tokenizer)
    assert again["selfextend"]["cache"] == "disk" and again["selfextend"]["cached_tokens"] == prefix
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_no_disk_entry_for_short_prompts(stories, tmp_path):
    model, tokenizer = stories
    with LiveServer(model, tokenizer, doc_cache=DocumentCache(tmp_path)) as live:
        post(live, "/completions", {"prompt": "A cat.\n\nQuestion: What?\nAnswer:", "max_tokens": 4})
    assert DocumentCache(tmp_path).entries() == []


# -- disconnects and the queue ---------------------------------------------------------------------


def long_stream_body(story, tokens=2000):
    """A stream that would run for a while: sampled (no loop ends it early), 2000 tokens."""
    return {"prompt": story[:3000], "max_tokens": tokens, "stream": True, "temperature": 1.0, "seed": 1}


def test_a_client_that_disconnects_stops_its_generation(stories, story):
    model, tokenizer = stories
    body = long_stream_body(story)
    with LiveServer(model, tokenizer, EngineOptions(group_size=16)) as server:  # one G for any answer budget
        with httpx.stream("POST", server.url + "/completions", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    break  # the answer has begun
            assert server.engine.running is not None
        left = time.monotonic()
        server.wait_idle(10)
        assert time.monotonic() - left < 5  # the 2000 tokens would take far longer
        (line,) = [line for line in server.lines if "cancelled" in line]
        assert "its client left" in line and int(line.split()[3].replace(",", "")) < 2000
        # What the cancelled request left in the cache is exactly what it holds: reusing it is exact.
        again = post(server, "/completions", {"prompt": body["prompt"], "max_tokens": ANSWER}).json()
        server.wait_idle()
    tokens, _ = completion_prompt(body["prompt"]).tokens(tokenizer)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(tokens) - 1
    config = choose_settings(model.model_info.limits, group_size=16).config()
    assert again["choices"][0]["text"] == reference_answer(model, tokenizer, tokens, config, ANSWER)


class Holder(threading.Thread):
    """A client reading a long stream until released."""

    def __init__(self, url, story):
        super().__init__()
        self.url, self.story = url, story
        self.started, self.release = threading.Event(), threading.Event()

    def run(self):
        with httpx.stream("POST", self.url + "/completions", json=long_stream_body(self.story), timeout=60) as reply:
            for _line in reply.iter_lines():
                self.started.set()
                if self.release.is_set():
                    break


def test_a_full_queue_answers_503_with_retry_after(stories, story):
    model, tokenizer = stories
    with LiveServer(model, tokenizer, EngineOptions(queue_size=1)) as live:
        holder = Holder(live.url, story)
        holder.start()
        assert holder.started.wait(30)
        queued = threading.Thread(target=post, args=(live, "/completions", {"prompt": "Once", "max_tokens": 2}))
        queued.start()
        deadline = time.monotonic() + 10
        while live.engine.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = post(live, "/completions", {"prompt": "Once", "max_tokens": 2})
        holder.release.set()
        holder.join()
        queued.join()
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_busy"
        assert post(live, "/completions", {"prompt": "Once", "max_tokens": 2}).status_code == 200


# -- a quantized KV cache -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, stories):
    """A random Llama with stories260K's tokenizer and 32-wide heads (--kv-bits needs them), trained
    context 256: loaded from a folder, as `selfextend serve --kv-bits` loads a model."""
    import json
    import shutil

    from mlx_lm.utils import save_model
    from tiny_models import tiny_model

    overrides = dict(hidden_size=128, vocab_size=512, max_position_embeddings=256)
    model = tiny_model("llama", **overrides)
    folder = tmp_path_factory.mktemp("wide_heads")
    save_model(folder, model)
    config = json.loads((shared_path("models", "stories260K") / "config.json").read_text())
    config.update(model.args.__dict__ | overrides | {"model_type": "llama"})
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "rope_scaling"}))
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (shared_path("models", "stories260K") / name).exists():
            shutil.copy(shared_path("models", "stories260K") / name, folder / name)
    return load(str(folder), selfextend=False)


@pytest.mark.parametrize("words", [40, 400], ids=["plain", "selfextend"])
def test_kv_bits_answers_from_a_quantized_cache(wide_heads, story, words):
    model, tokenizer = wide_heads
    tokens = tokenizer.encode(" ".join(story.split()[:words]))[:600]
    with LiveServer(model, tokenizer, engine_options=EngineOptions(kv_bits=8)) as live:
        data = post(live, "/completions", {"prompt": tokens, "max_tokens": 12}).json()
        live.wait_idle()
        settings = choose_settings(model.model_info.limits, len(tokens) + 12)
        kept, reused = live.engine.store.fetch(settings_key(settings, 8), tokens)
    assert reused == len(tokens) - 1
    assert data["selfextend"]["group_size"] == settings.group_size and (settings.group_size > 1) == (words > 100)
    assert all(hasattr(layer, "bits") and layer.bits == 8 for layer in kept), [type(layer) for layer in kept]
    expected = reference_answer(model, tokenizer, tokens, settings.config(), 12, kv_bits=8, kv_group_size=32)
    assert data["choices"][0]["text"] == expected


def test_a_quantized_cache_comes_back_from_the_disk_cache(wide_heads, story, tmp_path):
    model, tokenizer = wide_heads
    options = EngineOptions(kv_bits=8, disk_min_tokens=64)
    body = {"prompt": f"{story[:1500]}\n\nQuestion: Where did she go?\nAnswer:", "max_tokens": 12}
    with LiveServer(model, tokenizer, options, doc_cache=DocumentCache(tmp_path)) as live:
        first = post(live, "/completions", body).json()
    with LiveServer(model, tokenizer, options, doc_cache=DocumentCache(tmp_path)) as live:
        again = post(live, "/completions", body).json()
    assert first["selfextend"]["group_size"] > 1 and again["selfextend"]["cache"] == "disk"
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
