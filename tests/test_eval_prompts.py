"""Passkey and needle prompts: the paper's format, the needle at the asked depth, lengths on target."""

import re

import pytest
from conftest import shared_path
from tokenizers import Tokenizer

from selfextend_mlx.errors import EvaluationError, SelfExtendError
from selfextend_mlx.evaluation.common import parse_depths
from selfextend_mlx.evaluation.prompts import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_QUESTION,
    answer_found,
    needle_prompt,
    passkey_prompt,
    split_sentences,
)
from selfextend_mlx.evaluation.retrieval import passkey_keys
from selfextend_mlx.planning import parse_token_count, parse_token_counts


@pytest.fixture(scope="module")
def encode():
    """SmolLM2's real tokenizer (the default model's), from ../shared."""
    tokenizer = Tokenizer.from_file(str(shared_path("models", "SmolLM2-135M-Instruct", "tokenizer.json")))
    return lambda text: tokenizer.encode(text).ids


def needle_depth(encode, prompt):
    """Where the needle starts, as a fraction of the filler between intro and question, in tokens."""
    intro = len(encode(PASSKEY_INTRO))
    question = len(encode(PASSKEY_QUESTION))
    before = len(encode(prompt.text[: prompt.needle_char]))
    return (before - intro) / (len(prompt.tokens) - intro - question)


@pytest.mark.parametrize("length", [2048, 4096, 16384])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_hits_length_and_depth(encode, length, depth):
    prompt = passkey_prompt(encode, length, depth, "72498")
    assert 0.98 * length <= len(prompt.tokens) <= length
    assert prompt.tokens == encode(prompt.text)
    # The key line sits at the asked depth of the filler, to within one filler line.
    line = len(encode(PASSKEY_FILLER)) / (len(prompt.tokens) - len(encode(PASSKEY_INTRO)))
    assert needle_depth(encode, prompt) == pytest.approx(depth, abs=line + 0.005)


def test_passkey_prompt_is_the_papers_format(encode):
    prompt = passkey_prompt(encode, 2048, 0.5, "31337")
    assert prompt.answer == "31337"
    assert prompt.text.startswith(PASSKEY_INTRO + PASSKEY_FILLER)
    assert prompt.text.endswith(PASSKEY_FILLER + PASSKEY_QUESTION)
    assert prompt.text.count("The pass key is 31337. Remember it. 31337 is the pass key.\n") == 1
    assert prompt.text[prompt.needle_char :].startswith("The pass key is 31337.")
    # Nothing but whole filler lines around the key.
    body = prompt.text[len(PASSKEY_INTRO) : -len(PASSKEY_QUESTION)]
    lines = body.splitlines(keepends=True)
    assert [line for line in lines if line != PASSKEY_FILLER] == [
        "The pass key is 31337. Remember it. 31337 is the pass key.\n"
    ]


def test_passkey_keys_are_seeded_five_digit_numbers():
    keys = passkey_keys(7, [2048, 4096], [0.0, 1.0], 3)
    assert keys == passkey_keys(7, [2048, 4096], [0.0, 1.0], 3)
    assert keys != passkey_keys(8, [2048, 4096], [0.0, 1.0], 3)
    flat = [k for cell in keys.values() for k in cell]
    assert len(flat) == 12 and all(re.fullmatch(r"[1-9]\d{4}", k) for k in flat)
    assert len(set(flat)) > 6  # random, not one key repeated


def test_too_short_a_length_is_one_clear_error(encode):
    with pytest.raises(EvaluationError, match="too short"):
        passkey_prompt(encode, 20, 0.5, "12345")


HAYSTACK = (
    "It was a bright cold day in April. The clocks were striking thirteen! "
    'Winston slipped quickly through the glass doors. "Who is there?" he asked.\n'
    "Nobody answered. The hallway smelt of boiled cabbage and old rag mats."
)
NEEDLE = "The secret ingredient of the soup is cardamom."


def test_split_sentences_gives_the_text_back_and_cuts_after_sentence_ends():
    pieces = split_sentences(HAYSTACK)
    assert "".join(pieces) == HAYSTACK
    assert pieces[1] == "The clocks were striking thirteen! "
    assert pieces[3] == '"Who is there?" he asked.\n'
    assert len(pieces) == 6 and pieces[4] == "Nobody answered. "


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_prompt_hits_length_inserts_at_sentence_boundary(encode, depth):
    prompt = needle_prompt(encode, HAYSTACK, NEEDLE, "What is the secret ingredient?", "cardamom", 2048, depth)
    assert 0.98 * 2048 <= len(prompt.tokens) <= 2048
    assert prompt.text.count(NEEDLE) == 1
    assert prompt.text[prompt.needle_char :].startswith(NEEDLE)
    before = prompt.text[: prompt.needle_char]
    assert before.endswith("\n\n") or re.search(r"[.!?][\"']?\s$", before)  # after the intro or a whole sentence
    assert prompt.text.rstrip().endswith("Question: What is the secret ingredient?\nAnswer:")
    assert prompt.answer == "cardamom"
    # The short haystack was repeated to reach the length.
    assert prompt.text.count("The clocks were striking thirteen!") > 5


def test_needle_depth_follows_the_request(encode):
    shallow = needle_prompt(encode, HAYSTACK, NEEDLE, "Q?", "cardamom", 4096, 0.1)
    deep = needle_prompt(encode, HAYSTACK, NEEDLE, "Q?", "cardamom", 4096, 0.9)
    assert shallow.needle_char / len(shallow.text) == pytest.approx(0.1, abs=0.03)
    assert deep.needle_char / len(deep.text) == pytest.approx(0.9, abs=0.03)


def test_needle_inputs_are_checked(encode):
    with pytest.raises(EvaluationError):
        needle_prompt(encode, "   ", NEEDLE, "Q?", "a", 1024, 0.5)
    with pytest.raises(EvaluationError):
        needle_prompt(encode, HAYSTACK, " ", "Q?", "a", 1024, 0.5)


def test_answer_found_is_case_insensitive_containment():
    assert answer_found("72498", " 72498. Remember")
    assert not answer_found("72498", "7249")
    assert answer_found("Cardamom", "it is cardamom, of course")


def test_lengths_and_depths_parse_like_people_write_them():
    assert parse_token_count("4k") == 4096 and parse_token_count("1.5k") == 1536 and parse_token_count("300") == 300
    assert parse_token_counts("2k,4k, 16k") == [2048, 4096, 16384]
    assert parse_depths("0,0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("x", "0", "1.3", "-2"):
        with pytest.raises(SelfExtendError, match="token count"):
            parse_token_count(bad)
    with pytest.raises(EvaluationError):
        parse_depths("0.5,1.5")
