"""The turn runner (app/turns.py) on stories260K: both faces answer through it alike, a cancelled
feed leaves a consistent cache, the plan's answer budget is a hard bound, prefill runs as
mlx-lm's generation does, and part summaries keep the user's sampling."""

import contextlib
import importlib
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from conftest import shared_path
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer
from test_server_support import LiveServer

from selfextend_mlx.app.documents import Document
from selfextend_mlx.app.generation import Sampling
from selfextend_mlx.app.session import Session, SessionOptions
from selfextend_mlx.app.turns import TurnCancelled, TurnRunner
from selfextend_mlx.core.prefill import prefill
from selfextend_mlx.errors import SettingsError
from selfextend_mlx.loading.load import model_info
from selfextend_mlx.planning import plan_run
from selfextend_mlx.server.engine import EngineOptions

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def story_text():
    return shared_path("text", "tinystories_sample.txt").read_text()


def runner_for(model, tokenizer, prompt_tokens: int, max_tokens: int, **settings) -> TurnRunner:
    runner = TurnRunner(model, tokenizer, model_info=model_info(model))
    plan = plan_run(
        model_info(model), prompt_tokens + max_tokens, prompt_tokens=prompt_tokens, max_tokens=max_tokens, **settings
    )
    runner.use(plan)
    return runner


def test_the_cli_and_the_server_answer_a_conversation_alike(stories):
    """The same two-turn conversation, greedy, through a Session (the CLI's) and through the
    server's chat endpoint: the same answers, and the server's second turn reuses its first."""
    model, tokenizer = stories
    fresh = load_tokenizer(Path(tokenizer._tokenizer.name_or_path))
    fresh._tokenizer.chat_template = CHATML
    chat_tokenizer = TokenizerWrapper(fresh._tokenizer, eos_token_ids=tokenizer.eos_token_ids)
    questions = ["Once upon a time there was a girl named Lily.", "What did she like?"]

    session = Session(model, chat_tokenizer, options=SessionOptions(max_tokens=12))
    cli_answers = [session.ask(q).text for q in questions]

    served, messages = [], []
    with LiveServer(model, chat_tokenizer, EngineOptions(max_tokens=12)) as live:
        for question in questions:
            messages.append({"role": "user", "content": question})
            reply = httpx.post(live.url + "/chat/completions", json={"messages": messages}, timeout=60).json()
            served.append(reply)
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    assert [r["choices"][0]["message"]["content"] for r in served] == cli_answers
    assert all(cli_answers)
    second = served[1]["usage"]
    assert second["prompt_tokens_details"]["cached_tokens"] >= served[0]["usage"]["prompt_tokens"]


def test_a_cancelled_feed_leaves_the_cache_at_a_consistent_prefix(stories, story_text, monkeypatch):
    model, tokenizer = stories
    tokens = tokenizer.encode(story_text[:3000])[:400]
    runner = runner_for(model, tokenizer, len(tokens), 8, prefill_step=64)
    steps = []

    def cancel_after_three_steps():
        steps.append(1)
        return len(steps) > 3

    with pytest.raises(TurnCancelled):
        runner.feed(tokens, cancel=cancel_after_three_steps)
    held = len(runner.tokens)
    assert 0 < held < len(tokens) and runner.tokens == tokens[:held]
    assert {entry.offset for entry in runner.cache} == {held}
    # It goes on from there (the held tokens are not fed again), as an uninterrupted run does.
    fed, original = [], type(model).__call__

    def counting(self, inputs, *args, **kwargs):
        fed.append(inputs.shape[1])
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counting)
    answer = runner.answer(tokens, Sampling())
    assert fed[0] == 64 and sum(fed) - answer.generation_tokens == len(tokens) - held  # mlx-lm feeds the last token too
    monkeypatch.undo()
    whole = runner_for(model, tokenizer, len(tokens), 8, prefill_step=64).answer(tokens, Sampling())
    assert answer.text == whole.text and answer.prefilled_tokens == len(tokens)


def test_an_interrupt_between_layers_is_settled_to_one_prefix(stories, story_text):
    """Ctrl-C inside a step can leave the first layers a step ahead: every layer is cut back."""
    model, tokenizer = stories
    tokens = tokenizer.encode(story_text[:2000])[:200]
    runner = runner_for(model, tokenizer, len(tokens), 4, prefill_step=50)
    runner.feed(tokens[:100])
    layer = model.layers[1]
    original = type(layer).__call__

    def interrupt(self, *args, **kwargs):
        if self is layer:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    type(layer).__call__ = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.feed(tokens[100:])
    finally:
        type(layer).__call__ = original
    assert runner.tokens == tokens[:100] and {entry.offset for entry in runner.cache} == {100}


def test_a_turn_never_generates_past_its_plan(stories):
    model, tokenizer = stories
    tokens = tokenizer.encode("Once upon a time")
    runner = runner_for(model, tokenizer, len(tokens), 5)
    answer = runner.answer(tokens, Sampling(stop_loops=False))
    assert answer.generation_tokens <= 5 and len(answer.token_ids) == answer.generation_tokens
    assert runner.answer(tokens, Sampling(), max_tokens=2).generation_tokens <= 2  # fewer may be asked
    with pytest.raises(SettingsError, match="outside this run's plan"):
        runner.answer(tokens, Sampling(), max_tokens=6)


def test_prefill_runs_wired_and_on_the_generation_stream(stories, monkeypatch):
    model, tokenizer = stories
    generation = importlib.import_module("mlx_lm.generate")
    wired, streams = [], []

    @contextlib.contextmanager
    def recording_wired_limit(model_arg, stream_list=None):
        wired.append((model_arg, stream_list))
        yield

    monkeypatch.setattr(generation, "wired_limit", recording_wired_limit)

    def on_logits(start, logits):
        streams.append(mx.default_stream(mx.default_device()))

    runner = runner_for(model, tokenizer, 16, 4)
    prefill(model, runner._new_cache(), list(range(1, 17)), step=8, on_logits=on_logits)
    with mx.stream(generation.generation_stream):
        expected = mx.default_stream(mx.default_device())
    assert wired == [(model, [generation.generation_stream])]
    assert streams and all(stream == expected for stream in streams)


def test_summary_parts_are_sampled_with_the_users_options(stories, story_text, monkeypatch):
    from selfextend_mlx.app import session as session_module
    from selfextend_mlx.app.longdoc import LongDocument

    model, tokenizer = stories
    seen = []
    real_ask = session_module.Session.ask

    def recording_ask(self, question, sampling=None, *args, **kwargs):
        seen.append((question, sampling, self.plan.max_tokens))
        return real_ask(self, question, sampling, *args, **kwargs)

    monkeypatch.setattr(session_module.Session, "ask", recording_ask)
    text = story_text[: len(story_text) // 2]
    sampling = Sampling(temp=0.7, top_p=0.9, top_k=20, min_p=0.05, xtc_probability=0.1, seed=3, stop_loops=False)
    long = LongDocument(
        model,
        tokenizer,
        [Document("stories.txt", text, "text")],
        "Summarize the text above.",
        task="summarize",
        options=SessionOptions(max_tokens=24),
    )
    long.answer(sampling)
    parts = [entry for entry in seen if "is part" in entry[0]]
    assert parts and all(used == sampling for _, used, _ in seen)
    assert all(budget <= 24 for _, _, budget in parts)
