"""The eval arms (selfextend_mlx.evaluation.methods): each method's positions against mlx-lm's
own RoPE modules, plain where the method says so, the prompt methods' prompts, and `--methods`
end to end on stories260K (JSON shape, one-line errors)."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path
from mlx_lm.models.rope_utils import DynamicNTKScalingRoPE, YarnRoPE
from test_eval_cli import run
from tiny_models import random_tokens, tiny_model

from selfextend_mlx.errors import EvaluationError
from selfextend_mlx.evaluation.methods import (
    METHODS,
    PLAIN,
    Setup,
    applied,
    method_prompt,
    method_setup,
    own_ropes,
    parse_methods,
    retrieved_text,
    scaled_rope,
)
from selfextend_mlx.evaluation.prompts import passkey_prompt
from selfextend_mlx.planning import ModelLimits, choose_settings, plain_settings

L = 64  # the tiny models' trained context


def setup(method, tokens, factor=None, max_tokens=0):
    planned = choose_settings(ModelLimits(L), tokens)  # SelfExtend's, as eval plans them
    return method_setup(
        method, tokens, trained_context=L, context=L, max_tokens=max_tokens, selfextend=planned, factor=factor
    )


def patched_logits(model, the_setup, tokens):
    with applied(model, the_setup, L):
        return model(tokens[None])


@pytest.mark.parametrize(
    "method, scaling",
    [
        ("linear", {"type": "linear", "factor": 2.0}),
        ("yarn", {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": L}),
        ("ntk", {"type": "dynamic", "factor": 1.0}),
    ],
)
def test_rope_scalings_equal_mlx_lms_own_modules(method, scaling):
    """The model with its rope swapped for a pass of 128 tokens gives what mlx-lm builds from a
    config with that rope_scaling (ntk: its dynamic module over the whole 128 tokens at once)."""
    tokens = random_tokens(2 * L)
    model, reference = tiny_model("llama"), tiny_model("llama", rope_scaling=scaling)
    the_setup = setup(method, 2 * L)
    assert the_setup.factor == 2.0 if method != "ntk" else the_setup.factor == 1.0
    expected, plain = reference(tokens[None]), model(tokens[None])
    assert mx.abs(expected - plain).max().item() > 1e-2  # scaling changes something
    got = patched_logits(model, the_setup, tokens)
    assert mx.allclose(got, expected, atol=1e-5).item()
    if method == "yarn":
        with own_ropes(model) as apply:
            apply(the_setup, L)
            assert isinstance(model.layers[0].self_attn.rope, YarnRoPE)
        assert type(model.layers[0].self_attn.rope).__name__ == "RoPE"  # restored on exit
    assert mx.array_equal(model(tokens[None]), plain).item()  # the model's own ropes are back


def test_ntk_base_is_fixed_for_the_pass_as_mlx_lm_computes_it_for_the_length():
    rope = DynamicNTKScalingRoPE(16, max_position_embeddings=L, traditional=False, base=10000.0, factor=1.0)
    x = mx.random.normal((1, 2, 3 * L, 16))
    mine = scaled_rope(nn.RoPE(16, base=10000.0), setup("ntk", 3 * L), L)
    assert mx.allclose(mine(x), rope(x), atol=1e-5).item()
    # a chunk of the pass at an offset uses the same base (mlx-lm's module would not)
    assert mx.allclose(mine(x[:, :, L:], offset=L), mine(x)[:, :, L:], atol=1e-5).item()


def test_every_method_inside_the_window_is_the_plain_model_where_it_says_so():
    model = tiny_model("llama")
    tokens = random_tokens(40)
    plain = model(tokens[None])
    for method in METHODS:
        inside = setup(method, 40)
        if method == "string":  # plain only while every distance is below S = 64 // 3 = 21
            assert inside.key != (PLAIN,) and setup(method, 21).key == (PLAIN,)
            continue
        assert inside.key == (PLAIN,), method
        assert mx.array_equal(patched_logits(model, inside, tokens), plain).item(), method
    string_inside = setup("string", 21)
    assert mx.array_equal(patched_logits(model, string_inside, tokens[:21]), model(tokens[None, :21])).item()
    assert mx.array_equal(model(tokens[None]), plain).item()  # nothing left patched
    # past the window every method but plain computes something of its own
    keys = [setup(m, 2 * L, max_tokens=4).key for m in METHODS]
    assert keys[0] == (PLAIN,) and len(set(keys[2:])) == len(keys[2:]) and (PLAIN,) not in keys[2:]


def test_a_given_factor_scales_even_inside_the_window():
    assert setup("yarn", 40, factor=4.0).factor == 4.0 and setup("linear", 40).factor is None
    assert setup("ntk", 40, factor=4.0).key == (PLAIN,)  # the dynamic base is the model's own up to L


class Words:
    """A tokenizer of whitespace words, enough for the prompt methods."""

    def encode(self, text):
        return [hash(w) % 1000 for w in text.split()]


def test_truncate_keeps_the_last_tokens_and_retrieval_finds_the_needle():
    words = Words()
    prompt = passkey_prompt(words.encode, 600, 0.25, "48213")
    count = lambda text: len(words.encode(text))  # noqa: E731
    truncated = Setup("truncate", plain_settings(L), keep=100)
    assert method_prompt(truncated, prompt, words.encode, count) == prompt.tokens[-100:]
    retrieval = Setup("retrieval", plain_settings(L), keep=200)
    tokens = method_prompt(retrieval, prompt, words.encode, count)
    assert len(tokens) <= 200
    text = retrieved_text(prompt, 200, count)
    assert "The pass key is 48213." in text and text.startswith(prompt.intro) and text.endswith(prompt.question)
    assert words.encode(text) == tokens
    short = passkey_prompt(words.encode, 90, 0.5, "48213")
    assert method_prompt(truncated, short, words.encode, count) == short.tokens  # it fits: unchanged


class WordsAndNewlines(Words):
    """Words, and a token per newline: the blank lines between short paragraphs cost tokens,
    as they do in a real tokenizer."""

    def encode(self, text):
        return super().encode(text) + [1000] * text.count("\n")


def test_retrieval_fits_its_budget_and_keeps_a_key_at_depth_0():
    """The passkey filler is short paragraphs: counted without their blank lines, the chosen
    passages came out past the budget, and the cut from the front took the intro and the key
    with it (a 32k passkey at depth 0 on SmolLM2)."""
    words = WordsAndNewlines()
    count = lambda text: len(words.encode(text))  # noqa: E731
    prompt = passkey_prompt(words.encode, 3000, 0.0, "48213")
    retrieval = Setup("retrieval", plain_settings(L), keep=500)
    text = retrieved_text(prompt, 500, count)
    assert count(text) <= 500 and text.startswith(prompt.intro) and "The pass key is 48213." in text
    assert method_prompt(retrieval, prompt, words.encode, count) == words.encode(text)  # not cut


def test_parse_methods_rejects_in_one_error():
    assert parse_methods("plain, YaRN,string") == ["plain", "yarn", "string"]
    for text, message in (("plain,rope", "unknown rope"), ("", "empty"), ("yarn,yarn", "more than once")):
        with pytest.raises(EvaluationError, match=message):
            parse_methods(text)


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories():
    return shared_path("models", "stories260K")


def test_methods_json_shape(stories):
    names = "plain,selfextend,yarn,ntk,linear,string,truncate,retrieval"
    result = run(
        "eval", "passkey", "-m", stories, "--lengths", "300,700", "--depths", "0.5", "-k", "1",
        "--methods", names, "-n", "4", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["methods"] == names.split(",") and set(data["accuracy"]) == set(names.split(","))
    inside, past = data["results"]
    assert set(inside["outputs"]) == set(names.split(",")) and set(inside["setups"]) == set(names.split(","))
    assert all(inside["setups"][m]["plain"] for m in ("selfextend", "yarn", "ntk", "linear", "truncate", "retrieval"))
    assert len({inside["outputs"][m][0] for m in ("plain", "yarn", "truncate")}) == 1  # the same computation
    assert (
        past["setups"]["yarn"]["factor"] == round((past["tokens"] + 4) / 512, 4)
        and past["setups"]["selfextend"]["group_size"] > 1
    )
    assert past["setups"]["string"] == {"method": "string", "plain": False, "offset": 170, "local_window": 128}
    assert past["setups"]["truncate"]["kept_tokens"] == 512 - 4


def test_ppl_methods(stories):
    text = shared_path("text", "tinystories_sample.txt")
    result = run(
        "eval", "ppl", "-m", stories, "-f", text, "--tokens", "700", "--buckets", "512",
        "--methods", "plain,string,yarn", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["methods"] == ["plain", "string", "yarn"]
    assert data["setups"]["yarn"]["factor"] == round(700 / 512, 4) and data["setups"]["string"]["offset"] == 170
    first, second = data["buckets"]
    assert set(first) == {"start", "end", "targets", "ppl_plain", "ppl_string", "ppl_yarn"}
    assert np.isfinite([second[f"ppl_{m}"] for m in ("plain", "string", "yarn")]).all()
    assert len({second[f"ppl_{m}"] for m in ("plain", "string", "yarn")}) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "plain,rope"], "unknown rope"),
        (["--methods", "plain", "--compare"], "drop --plain/--compare"),
        (["--methods", "plain,yarn", "-G", "4"], "-G/-W set SelfExtend"),
        (["--methods", "plain", "--factor", "2"], "--factor scales RoPE"),
        (["--methods", "yarn", "--factor", "0.5"], "--factor must be a number >= 1"),
        (["--methods", "plain,string", "--kv-bits", "8"], "STRING needs a full-precision KV cache"),
    ],
)
def test_methods_errors_are_one_line(stories, args, message):
    result = run("eval", "passkey", "-m", stories, "--lengths", "300", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and message in lines[0], result.stderr


def test_ppl_refuses_the_prompt_methods(stories):
    text = shared_path("text", "tinystories_sample.txt")
    result = run("eval", "ppl", "-m", stories, "-f", text, "--methods", "plain,truncate")
    assert result.exit_code != 0 and "change the prompt" in result.stderr
