"""Chat templates come from model folders and are untrusted (issue 28.2): every render is
bounded in time and output, and past the bound the user reads one line (the CLI exits
non-zero, the server answers 400 and keeps serving)."""

import subprocess
import sys

import pytest
from cli_support import NESTED_LOOPS, stories_with_template

import selfextend_mlx.app.prompts as prompts
from selfextend_mlx.app.prompts import PromptFormat, TemplateBoundError
from selfextend_mlx.loading.load import load
from selfextend_mlx.server.prompting import chat_prompt
from selfextend_mlx.server.protocol import APIError

HUGE_OUTPUT = "{{ 'x' * 100000000 }}"
PLAIN = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
USER = [{"role": "user", "content": "hi"}]


def with_template(tmp_path, template):
    _, tokenizer = load(str(stories_with_template(tmp_path, template)), selfextend=False)
    assert tokenizer.has_chat_template
    return tokenizer


@pytest.mark.parametrize("template, bound", [(NESTED_LOOPS, "ran for more than"), (HUGE_OUTPUT, "more than")])
def test_a_hostile_template_is_stopped_in_one_line(tmp_path, monkeypatch, template, bound):
    monkeypatch.setattr(prompts, "TEMPLATE_SECONDS", 1.0)
    monkeypatch.setattr(prompts, "TEMPLATE_MAX_CHARS", 1_000_000)
    tokenizer = with_template(tmp_path, template)
    with pytest.raises(TemplateBoundError, match=bound) as error:
        PromptFormat(tokenizer).render("a document", [], "a question")
    assert "\n" not in str(error.value)
    with pytest.raises(APIError) as refused:  # the server: a 400 naming the bound
        chat_prompt(tokenizer, USER)
    assert refused.value.status == 400 and refused.value.code == "template_bound_exceeded"


def test_a_real_template_renders_as_before(tmp_path):
    text = PromptFormat(with_template(tmp_path, PLAIN)).render("doc", [], "q?")
    assert text == "<user>doc\n\nq?<assistant>"


def test_the_cli_says_one_line_for_a_hanging_template(tmp_path):
    folder = stories_with_template(tmp_path, NESTED_LOOPS)
    done = subprocess.run(
        [sys.executable, "-m", "selfextend_cli", "ask", "-q", "hi", "-m", str(folder), "-n", "2", "--no-cache"],
        input="A short story.",
        capture_output=True,
        text=True,
        timeout=120,  # the bound is 10 s; without it the render runs for hours
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(lines) == 1 and "chat template ran for more than" in lines[0], done.stderr
