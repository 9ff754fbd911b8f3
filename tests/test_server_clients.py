"""The clients people use, against `selfextend serve` on the default model (SmolLM2-135M-Instruct):
the `openai` package (whole and streamed) and the `llm` command line, each asked about a fact
inside a ~1.5k-token document. The first question reads the document; the others are served
from its cache (usage shows the cached prompt tokens) in a fraction of the time."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import shared_path
from openai import OpenAI
from test_server_process import ServeProcess

FACT = "The code for the lock of the east tower is 48213."
NUMBER = "48213"


@pytest.fixture(scope="module")
def document() -> str:
    """About 1.5k tokens of Emma with the fact in the middle."""
    emma = shared_path("text", "austen-emma.txt").read_text()
    start = emma.index("Emma Woodhouse, handsome")
    return f"{emma[start : start + 3000]}\n\n{FACT}\n\n{emma[start + 3000 : start + 6000]}"


@pytest.fixture(scope="module")
def server():
    running = ServeProcess()  # the default model
    yield running
    assert running.stop() == 0


@pytest.mark.slow
def test_openai_and_llm_find_the_fact_and_reuse_the_document(server, document, tmp_path):
    client = OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=600)
    (model,) = [m.id for m in client.models.list()]
    assert model == "SmolLM2-135M-Instruct"

    def ask(question):
        return [{"role": "user", "content": f"{document}\n\n{question}"}]

    started = time.monotonic()
    first = client.chat.completions.create(
        model=model,
        messages=ask("What is the code for the lock of the east tower? Answer with the number."),
        max_tokens=40,
    )
    first_seconds = time.monotonic() - started
    assert NUMBER in first.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"
    assert first.usage.prompt_tokens > 1300 and first.usage.prompt_tokens_details.cached_tokens == 0

    started = time.monotonic()
    stream = client.chat.completions.create(
        model=model,
        messages=ask("Which number opens the lock of the east tower?"),
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, first_token_seconds = [], None
    for chunk in stream:
        chunks.append(chunk)
        if first_token_seconds is None and chunk.choices and chunk.choices[0].delta.content:
            first_token_seconds = time.monotonic() - started
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert NUMBER in text
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 1300 and usage.prompt_tokens_details.cached_tokens > usage.prompt_tokens - 40
    # The answer starts once the question is read: a fraction of the time the first request took.
    # (Whole answers take a while to decode on a busy CPU; the time to the first token does not.)
    assert first_token_seconds < first_seconds / 4, (first_seconds, first_token_seconds)
    reading = [first.model_extra["selfextend"], chunks[-2].model_extra["selfextend"]]
    assert reading[1]["prefilled_tokens"] < 40 and reading[1]["prompt_seconds"] < reading[0]["prompt_seconds"] / 4

    answer = run_llm(server.url, model, tmp_path, "What is the code for the lock of the east tower?", document)
    assert answer.returncode == 0, answer.stderr
    assert NUMBER in answer.stdout
    deadline = time.monotonic() + 10
    while len(server.stderr) < 3 and time.monotonic() < deadline:  # one log line per request
        time.sleep(0.1)
    assert "cached (memory)" in server.stderr[2] and "streamed" in server.stderr[2]  # llm streams too


def run_llm(url: str, model: str, home: Path, question: str, document: str):
    """`cat document | llm -m selfextend QUESTION` with an OpenAI-compatible model entry."""
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: selfextend\n  model_name: {model}\n  api_base: {url}\n", encoding="utf-8"
    )
    env = {**os.environ, "LLM_USER_PATH": str(home), "LLM_LOAD_PLUGINS": ""}
    llm = Path(sys.executable).with_name("llm")
    # llm joins piped text and the prompt with a space: the blank line keeps the document a paragraph
    return subprocess.run(
        [str(llm), "-m", "selfextend", "--no-log", "-o", "max_tokens", "40", question],
        input=document + "\n\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
