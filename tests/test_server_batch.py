"""Concurrent requests decoded together (core.batch, server.batch, the engine's scheduler) on
stories260K: greedy answers equal to one-at-a-time ones token for token, plain and SelfExtend,
at the engine and over HTTP; a client leaving a batch changes nobody else's answer; SIGTERM
with a batch running; admission that waits for memory."""

import asyncio
import signal
import threading
import time

import httpx
import mlx.core as mx
import pytest
from conftest import shared_path
from test_server_process import ServeProcess
from test_server_support import LiveServer, reference_answer

from selfextend_mlx.core import batch
from selfextend_mlx.core.batch import RowCaches, batched_logits, rows_attention
from selfextend_mlx.core.config import SelfExtendConfig
from selfextend_mlx.core.patch import make_cache, use_selfextend
from selfextend_mlx.core.prefill import prefill
from selfextend_mlx.planning import ENV_MAX_MEMORY
from selfextend_mlx.server.engine import Engine, EngineOptions, Failed, Finished, Job, Text, fits_with
from selfextend_mlx.server.prompting import completion_prompt

SECONDS = 120  # any one engine run in these tests ends well within this


def prompts(tokenizer, story, count, *, longest=200):
    """`count` prompts of different lengths (up to `longest` tokens) cut from the story."""
    tokens = tokenizer.encode(story)
    return [tokens[7 * i : 7 * i + 5 + (longest - 5) * i // max(1, count - 1)] for i in range(count)]


async def _final(job: Job):
    """The job's last event and the text streamed before it."""
    pieces = []
    while True:
        event = await job.events.get()
        if isinstance(event, Text):
            pieces.append(event.text)
        elif isinstance(event, (Finished, Failed)):
            return event, "".join(pieces)


def run_engine(engine: Engine, works) -> list:
    """Submit every work at once, run the engine until all are answered; [(event, text)]."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(work, loop) for work in works]
        for job in jobs:
            engine.submit(job)
        worker = threading.Thread(target=engine.run_forever, daemon=True)
        worker.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(_final(job) for job in jobs)), SECONDS)
        finally:
            engine.stopping = True
            await asyncio.to_thread(worker.join, 10)

    return asyncio.run(main())


def answers(model, tokenizer, token_lists, budgets, options=EngineOptions(), **engine_kwargs):
    engine = Engine(model, tokenizer, options, **engine_kwargs)
    works = [engine.prepare(tokens, max_tokens=budget) for tokens, budget in zip(token_lists, budgets)]
    results = run_engine(engine, works)
    for event, _text in results:
        assert isinstance(event, Finished), event
    return [event.outcome for event, _ in results], [text for _, text in results], engine


# -- the batched model call -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["plain", "plain, whole module per row", "selfextend"])
def test_a_batched_step_gives_each_row_its_own_cache_s_logits(stories, story, path, monkeypatch):
    model, tokenizer = stories
    config = SelfExtendConfig(group_size=2, window=16) if path == "selfextend" else None
    if path == "plain, whole module per row":  # the path of attention classes batch.py has no row code for
        monkeypatch.setattr(batch.llama, "ATTENTION", ())
    use_selfextend(model, config)
    rows = prompts(tokenizer, story, 3, longest=60)
    caches = []
    for tokens in rows:
        caches.append(make_cache(model))
        prefill(model, caches[-1], tokens[:-1])
    alone = []
    for tokens in rows:
        cache = make_cache(model)
        prefill(model, cache, tokens[:-1])
        alone.append(batched_logits(model, [cache], [tokens[-1]]))
    together = batched_logits(model, caches, [tokens[-1] for tokens in rows])
    mx.eval(alone, together)
    for i, logits in enumerate(alone):
        assert mx.argmax(logits).item() == mx.argmax(together[i]).item()
        assert mx.allclose(logits[0], together[i], atol=1e-4).item()
    assert [c.offset for c in caches[0]] == [len(rows[0])] * len(model.layers)
    use_selfextend(model, None)


def test_rows_attention_puts_the_classes_back_and_leaves_other_caches_alone(stories):
    model, _ = stories
    before = [type(layer.self_attn) for layer in model.layers]
    with pytest.raises(RuntimeError):
        with rows_attention(model):
            assert all(type(layer.self_attn) is not cls for layer, cls in zip(model.layers, before))
            raise RuntimeError("a failing step")
    assert [type(layer.self_attn) for layer in model.layers] == before
    with pytest.raises(ValueError):
        RowCaches([None, None]).make_mask(2)


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size, window", [(None, None), (2, 32)], ids=["plain", "selfextend"])
def test_batched_greedy_answers_equal_one_at_a_time_answers(stories, story, group_size, window):
    model, tokenizer = stories
    rows = prompts(tokenizer, story, 6)
    budgets = [40, 8, 64, 24, 50, 16]  # different ends: jobs leave and join between steps
    options = EngineOptions(group_size=group_size, window=window)
    batched, texts, engine = answers(model, tokenizer, rows, budgets, options)
    assert engine.largest_batch > 1
    alone, _, one = answers(
        model, tokenizer, rows, budgets, EngineOptions(group_size=group_size, window=window, batch_size=1)
    )
    assert one.largest_batch == 1
    for together, single, text in zip(batched, alone, texts):
        assert together.token_ids == single.token_ids
        assert together.text == single.text == text
        assert together.finish_reason == single.finish_reason
        assert together.prompt_tokens == single.prompt_tokens
    # and the one-at-a-time answers are mlx-lm's own (those no repetition loop cut short)
    config = None if group_size is None else SelfExtendConfig(group_size=group_size, window=window)
    for tokens, budget, single in zip(rows, budgets, alone):
        if single.finish_reason == "length":
            assert single.text == reference_answer(model, tokenizer, tokens, config, budget)


def test_a_repetition_penalty_applies_to_batched_rows_as_to_a_turn_alone(stories, story):
    """Rows sample with their own logits processors: each answer is mlx-lm's with the penalty
    (its generator fed the prompt's last token, the rest already in the cache), not the greedy one."""
    from dataclasses import replace

    from mlx_lm import generate
    from mlx_lm.sample_utils import make_logits_processors

    model, tokenizer = stories
    rows = prompts(tokenizer, story, 3)
    engine = Engine(model, tokenizer, EngineOptions())
    works = [engine.prepare(tokens, max_tokens=24) for tokens in rows]
    works = [replace(w, sampling=replace(w.sampling, repetition_penalty=1.8, stop_loops=False)) for w in works]
    results = run_engine(engine, works)
    assert engine.largest_batch > 1
    use_selfextend(model, None)
    penalized = differs = 0
    for tokens, (event, _text) in zip(rows, results):
        cache = make_cache(model)
        prefill(model, cache, tokens[:-1])
        processors = make_logits_processors(repetition_penalty=1.8, repetition_context_size=20)
        expected = generate(model, tokenizer, [tokens[-1]], max_tokens=24, prompt_cache=cache,
                            logits_processors=processors)  # fmt: skip
        assert isinstance(event, Finished) and event.outcome.text == expected
        penalized += 1
        differs += expected != reference_answer(model, tokenizer, tokens, None, 24)
    assert penalized == 3 and differs >= 1  # the penalty changed some answer: the check can fail


def test_requests_in_other_modes_wait_for_the_batch_and_still_answer_the_same(stories, story):
    model, tokenizer = stories
    tokens = tokenizer.encode(story)
    rows = [tokens[:20], tokens[:600], tokens[5:30], tokens[50:650]]  # plain, SelfExtend, plain, SelfExtend
    budgets = [16] * 4
    batched, _, engine = answers(model, tokenizer, rows, budgets)
    alone, _, _ = answers(model, tokenizer, rows, budgets, EngineOptions(batch_size=1))
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert engine.largest_batch == 1  # arrival order: each one waits for the mode before it


def test_memory_admission_waits_until_the_estimates_fit(stories, story, monkeypatch):
    model, tokenizer = stories
    tokens = tokenizer.encode(story)
    rows = [tokens[10 * i : 10 * i + 40] for i in range(3)]  # one length: one estimate
    probe = Engine(model, tokenizer)
    one = probe.prepare(rows[0], max_tokens=32).plan
    assert fits_with(one, [one])  # the machine's memory takes two
    # a machine that holds one request's estimate but not two
    room = int((one.memory.total + one.memory.kv_cache // 2) / 0.9)
    monkeypatch.setenv(ENV_MAX_MEMORY, str(room))
    engine = Engine(model, tokenizer)
    tight = engine.prepare(rows[0], max_tokens=32).plan
    assert fits_with(tight, []) and not fits_with(tight, [tight])
    waited, _, engine = answers(model, tokenizer, rows, [32] * 3)
    assert engine.largest_batch == 1
    monkeypatch.delenv(ENV_MAX_MEMORY)
    together, _, engine = answers(model, tokenizer, rows, [32] * 3)
    assert engine.largest_batch > 1
    assert [a.token_ids for a in waited] == [a.token_ids for a in together]


# -- over HTTP --------------------------------------------------------------------------------


def post(url, body, results, key, timeout=SECONDS):
    results[key] = httpx.post(url + "/completions", json=body, timeout=timeout)


def test_concurrent_http_clients_get_the_one_at_a_time_answers(stories, story):
    model, tokenizer = stories
    texts = [story[40 * i : 40 * i + 30 + 60 * i] for i in range(6)]
    budgets = [24, 40, 12, 30, 24, 8]
    with LiveServer(model, tokenizer) as live:
        results = {}
        clients = [
            threading.Thread(target=post, args=(live.url, {"prompt": t, "max_tokens": b}, results, i))
            for i, (t, b) in enumerate(zip(texts, budgets))
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(SECONDS)
        largest = live.engine.largest_batch
    token_lists = [completion_prompt(t).tokens(tokenizer)[0] for t in texts]
    alone, _, _ = answers(model, tokenizer, token_lists, budgets, EngineOptions(batch_size=1))
    for i, single in enumerate(alone):
        reply = results[i]
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == single.text
        assert reply.json()["usage"]["completion_tokens"] == single.generation_tokens
    assert largest > 1


def test_a_client_leaving_a_batch_leaves_the_others_answers_unchanged(stories, story):
    model, tokenizer = stories
    texts = [story[100 * i : 100 * i + 200] for i in range(3)]
    budget = 200  # long enough to still run when the leaving client goes (a loop may end one earlier)
    options = EngineOptions(group_size=16)  # one G for any answer budget: one batch
    with LiveServer(model, tokenizer, options) as live:
        results, begun = {}, threading.Event()

        def leaving():
            body = {"prompt": story[:300], "max_tokens": 2000, "temperature": 1.0, "stream": True}
            with httpx.stream("POST", live.url + "/completions", json=body, timeout=SECONDS) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        begun.set()
                        if live.engine.largest_batch > 1:
                            break  # leave while the others decode beside it
                    if time.monotonic() > deadline:
                        break

        deadline = time.monotonic() + 60
        gone = threading.Thread(target=leaving)
        gone.start()
        assert begun.wait(30)
        clients = [
            threading.Thread(target=post, args=(live.url, {"prompt": t, "max_tokens": budget}, results, i))
            for i, t in enumerate(texts)
        ]
        for client in clients:
            client.start()
        gone.join(SECONDS)
        for client in clients:
            client.join(SECONDS)
        live.wait_idle()
        lines = list(live.lines)
    assert any("cancelled" in line and "its client left" in line for line in lines)
    token_lists = [completion_prompt(t).tokens(tokenizer)[0] for t in texts]
    alone, _, _ = answers(model, tokenizer, token_lists, [budget] * 3, EngineOptions(group_size=16, batch_size=1))
    for i, single in enumerate(alone):
        assert results[i].status_code == 200, results[i].text
        assert results[i].json()["choices"][0]["text"] == single.text


def test_sigterm_with_a_batch_running_exits_within_2_seconds(story):
    server = ServeProcess("-m", str(shared_path("models", "stories260K")))
    try:
        results = {}
        body = {"prompt": story[:400], "max_tokens": 4000, "temperature": 1.0}  # unseeded: batched
        clients = [threading.Thread(target=post, args=(server.url, body, results, i, 30)) for i in range(4)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(server.url.removesuffix("/v1") + "/health", timeout=5).json()
            if health["running"] and health["waiting"] == 0:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # all four decoding together
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        took = time.monotonic() - stopped
        for client in clients:
            client.join(10)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0
    assert took < 2, f"{took:.2f}s"
    assert len(results) == 4
    for reply in results.values():
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_shutting_down"
    assert not any("Traceback" in line for line in server.stderr)
