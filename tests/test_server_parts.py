"""The server's parts on their own: stop sequences over streamed text, the in-memory prompt
caches (bounded in bytes, keyed by settings), and the reusable prefix of a prompt."""

import mlx.core as mx
import pytest
from conftest import shared_path
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from selfextend_mlx.app.stopping import StopSequences
from selfextend_mlx.planning import Settings
from selfextend_mlx.server.prompt_cache import PromptCacheStore, settings_key
from selfextend_mlx.server.prompting import chat_prompt, completion_prompt
from selfextend_mlx.server.protocol import APIError

# -- stop sequences -------------------------------------------------------------------------------


def streamed(stops, pieces):
    matcher = StopSequences(stops)
    sent = [matcher.feed(piece) for piece in pieces]
    if not matcher.hit:
        sent.append(matcher.flush())
    return sent, matcher.hit


def test_a_stop_sequence_split_across_pieces_is_never_sent():
    sent, hit = streamed(["world"], ["Hello wo", "rl", "d and more"])
    assert hit and "".join(sent) == "Hello "
    assert sent[0] == "Hello "  # "wo" was held back: it might have begun the stop sequence


def test_held_text_goes_out_once_it_cannot_begin_a_stop_sequence():
    sent, hit = streamed(["world"], ["Hello wo", "nder", "ful"])
    assert not hit and "".join(sent) == "Hello wonderful"
    sent, hit = streamed(["</s>", "END"], ["ab<", "/x E", "N"])
    assert not hit and "".join(sent) == "ab</x EN"


def test_the_earliest_of_several_stop_sequences_wins():
    sent, hit = streamed(["b", "ccc"], ["a ccc b"])
    assert hit and "".join(sent) == "a "


# -- prompt caches in memory --------------------------------------------------------------------


def cache_of(tokens: int, width: int = 1024) -> list:
    entry = KVCache()
    keys = mx.zeros((1, 1, tokens, width))
    entry.update_and_fetch(keys, keys)
    return [entry]


PLAIN = settings_key(Settings(1, 128, "fits", 512), None)
EXTENDED = settings_key(Settings(4, 128, "extends", 1664), None)


def test_the_nearest_cache_is_a_copy_trimmed_to_the_common_prefix():
    store = PromptCacheStore(max_bytes=10**9)
    store.insert(PLAIN, [1, 2, 3, 4, 5], cache_of(5))
    cache, reused = store.fetch(PLAIN, [1, 2, 3, 9, 9])
    assert reused == 3 and cache[0].offset == 3
    again, reused = store.fetch(PLAIN, [1, 2, 3, 4, 5])  # the whole prompt: all but its last token
    assert reused == 4 and again[0].offset == 4
    assert store.fetch(PLAIN, [1, 2, 3, 4, 5, 6])[1] == 5  # a longer prompt: the whole entry


def test_caches_made_under_other_settings_are_never_handed_out():
    store = PromptCacheStore(max_bytes=10**9)
    store.insert(PLAIN, [1, 2, 3, 4], cache_of(4))
    assert store.fetch(EXTENDED, [1, 2, 3, 4, 5]) == (None, 0)
    assert settings_key(Settings(1, 64, "fits", 512), None) == PLAIN  # W means nothing to plain attention
    assert settings_key(Settings(4, 128, "extends", 1664), 8) != EXTENDED


def test_beyond_its_bytes_the_oldest_caches_go_but_never_the_newest():
    one = sum(c.nbytes for c in cache_of(256))
    store = PromptCacheStore(max_bytes=int(2.5 * one))
    for first in range(4):
        store.insert(PLAIN, [first, 1, 2, 3], cache_of(256))
    assert len(store) == 2 and store.nbytes <= store.max_bytes
    assert store.fetch(PLAIN, [0, 1, 2, 3, 4]) == (None, 0)  # the oldest went
    assert store.fetch(PLAIN, [3, 1, 2, 3, 4])[1] == 4
    store.insert(PLAIN, [7, 7, 7], cache_of(2048))  # larger than the whole bound: kept alone
    assert len(store) == 1 and store.fetch(PLAIN, [7, 7, 7, 7])[1] == 3


# -- the reusable prefix ----------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    path = shared_path("models", "stories260K")
    return load_tokenizer(path)


def templated(tokenizer, template):
    fresh = load_tokenizer(shared_path("models", "stories260K"))
    fresh._tokenizer.chat_template = template
    return TokenizerWrapper(fresh._tokenizer, eos_token_ids=tokenizer.eos_token_ids)


def test_the_document_before_the_question_is_the_prefix(plain_tokenizer):
    tokenizer = templated(plain_tokenizer, CHATML)
    messages = [{"role": "user", "content": "A long document.\n\nIts second paragraph.\n\nWho wrote it?"}]
    prompt = chat_prompt(tokenizer, messages)
    assert prompt.prefix == "<|user|>\nA long document.\n\nIts second paragraph.\n\n"
    assert prompt.text == prompt.prefix + "Who wrote it?\n<|assistant|>\n"
    tokens, prefix = prompt.tokens(tokenizer)
    other = chat_prompt(tokenizer, [{"role": "user", "content": messages[0]["content"].replace("Who", "When")}])
    assert other.tokens(tokenizer)[0][:prefix] == tokens[:prefix]  # the same document tokens, whatever follows
    assert prompt.label == "served: A long document. Its second paragraph."


def test_a_document_in_the_system_message_is_the_prefix_of_every_turn(plain_tokenizer):
    tokenizer = templated(plain_tokenizer, CHATML)
    system = {"role": "system", "content": "The whole document."}
    turns = [system, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    first = chat_prompt(tokenizer, [system, {"role": "user", "content": "Q1"}])
    later = chat_prompt(
        tokenizer, [*turns, {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Q2"}]
    )
    assert first.prefix == later.prefix == "<|system|>\nThe whole document.\n<|user|>\n"
    assert "<|system|>\nBe brief." in later.text


def test_templates_without_a_system_role_get_it_in_the_first_user_message(plain_tokenizer):
    tokenizer = templated(plain_tokenizer, NO_SYSTEM)
    prompt = chat_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt.text == "[user] Be brief.\n\nHi\n[assistant] "


def test_models_without_a_template_get_the_plain_layout(plain_tokenizer):
    tokenizer = TokenizerWrapper(plain_tokenizer._tokenizer)
    assert not tokenizer.has_chat_template
    turns = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert chat_prompt(tokenizer, turns).text == "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer:"
    first = chat_prompt(tokenizer, turns[:1]).text
    assert first == "Question: Q1\nAnswer:"  # laid out as the later turns: their prompts begin with it
    answered = [turns[0], {"role": "assistant", "content": " A1"}, turns[2]]  # as the model wrote it
    assert chat_prompt(tokenizer, answered).text == chat_prompt(tokenizer, turns).text
    with pytest.raises(APIError, match="no chat template"):
        chat_prompt(tokenizer, [{"role": "assistant", "content": "Hello!"}])


def test_a_completion_prompt_keeps_everything_before_its_last_paragraph_break():
    assert completion_prompt("Doc.\n\nMore doc.\n\nQuestion: x\nAnswer:").prefix == "Doc.\n\nMore doc.\n\n"
    assert completion_prompt("no break at all").prefix == ""
