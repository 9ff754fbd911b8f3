"""`selfextend eval --chat-template` renders the model folder's chat template under the same
bound as every other render (issue 28): a hostile template is one line, in bounded time."""

import time

import cli_support
import pytest
from cli_support import NESTED_LOOPS, invoke, stories_with_template
from conftest import shared_path

import selfextend_mlx.app.prompts as prompts
from selfextend_cli.eval_cmd import _encoder
from selfextend_mlx.loading.load import load

isolated_cache, load_each_model_once = cli_support.isolated_cache, cli_support.load_each_model_once  # autouse fixtures
PLAIN = "{% for m in messages %}<s><{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


NEEDLE = ["needle", "--haystack", shared_path("text", "tinystories_sample.txt"), "--needle", "The code is 48213."]
NEEDLE += ["--question", "What is the code?", "--answer", "48213"]


@pytest.mark.parametrize("task", [["passkey", "--trials", "1"], NEEDLE], ids=["passkey", "needle"])
def test_a_hostile_template_stops_eval_in_one_line(tmp_path, monkeypatch, task):
    monkeypatch.setattr(prompts, "TEMPLATE_SECONDS", 1.0)
    folder = stories_with_template(tmp_path, NESTED_LOOPS)
    started = time.monotonic()
    result = invoke("eval", *task, "-m", folder, "--chat-template", "--lengths", "300", "--depths", "0.5")
    took = time.monotonic() - started
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert "chat template ran for more than 1 s" in line, result.stderr
    assert took < 30  # the bound, plus loading the model; unbounded the loops run for hours


def test_the_bounded_render_gives_the_tokens_apply_chat_template_gave(tmp_path):
    _, tokenizer = load(str(stories_with_template(tmp_path, PLAIN)), selfextend=False)
    text = "Once upon a time there was a cat."
    expected = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    assert _encoder(tokenizer, True)(text) == list(expected)
