"""The session engine on stories260K (real weights, 512-token context): prompt layout, length
planning, multi-turn cache reuse, the document cache and interrupts."""

from pathlib import Path

import pytest
from conftest import shared_path
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from selfextend_mlx.app.doccache import DocumentCache
from selfextend_mlx.app.documents import Document
from selfextend_mlx.app.prompts import PromptFormat, common_prefix_length
from selfextend_mlx.app.session import Session, SessionOptions
from selfextend_mlx.core.cache import cache_nbytes
from selfextend_mlx.core.patch import selfextend_config
from selfextend_mlx.errors import InputTooLongError, InsufficientMemoryError, SelfExtendError
from selfextend_mlx.planning import ENV_MAX_MEMORY, estimate_memory, max_length

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
# A template that repeats the last question before everything: no stable document prefix.
QUESTION_FIRST = "Q: {{ messages[-1]['content'][-20:] }}\n" + CHATML


@pytest.fixture(scope="module")
def story_text():
    return shared_path("text", "tinystories_sample.txt").read_text()


def with_template(tokenizer, template):
    """The same tokenizer with a chat template (stories260K has none)."""
    fresh = load_tokenizer(Path(tokenizer._tokenizer.name_or_path))
    fresh._tokenizer.chat_template = template
    return TokenizerWrapper(fresh._tokenizer, eos_token_ids=tokenizer.eos_token_ids)


def doc(text, name="story.txt"):
    return Document(name, text, "text")


# -- prompt layout ---------------------------------------------------------------------------


def test_plain_layout_without_a_chat_template(stories):
    _, tokenizer = stories
    assert not tokenizer.has_chat_template
    layout = PromptFormat(tokenizer, system="Be brief.")
    text = layout.render("DOCS", [("q1", "a1")], "q2")
    assert text == "Be brief.\n\nDOCS\n\nQuestion: q1\nAnswer: a1\n\nQuestion: q2\nAnswer:"
    assert layout.document_prefix("DOCS") == "Be brief.\n\nDOCS\n\nQuestion: "
    assert PromptFormat(tokenizer).render("", [], "Once upon a time") == "Once upon a time"  # generate


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM])
def test_documents_are_a_stable_prefix_of_every_chat_prompt(stories, template):
    model, tokenizer = stories
    tokenizer = with_template(tokenizer, template)
    session = Session(model, tokenizer, [doc("Tom has a red ball.")], system="Be brief.")
    assert session.prefix_text is not None
    assert "Be brief." in session.prefix_text and "Tom has a red ball." in session.prefix_text
    for turns in ([], [("Who?", "Tom.")]):
        session.history = list(turns)
        text = session.format.render(session.documents_text, turns, "What color?")
        assert text.startswith(session.prefix_text) and text.endswith(
            "What color?\n" + text.rsplit("What color?\n", 1)[1]
        )
        tokens = session.prompt_tokens("What color?")
        assert tokens[: len(session.prefix_tokens)] == session.prefix_tokens
        assert tokenizer.decode(tokens).replace("<s>", "").strip().startswith(text.strip()[:10])


def test_template_without_stable_prefix_disables_document_reuse(stories):
    model, tokenizer = stories
    notices = []
    session = Session(
        model, with_template(tokenizer, QUESTION_FIRST), [doc("Tom has a red ball.")], notice=notices.append
    )
    assert session.prefix_text is None and session.prefix_tokens == []
    assert notices == [
        "the chat template puts the question before the documents end: the document prefill is not reused"
    ]
    answer = session.ask("What does Tom have?", max_tokens=4)
    assert answer.prefilled_tokens == answer.prompt_tokens and session.document_source == "none"


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


# -- planning ----------------------------------------------------------------------------------
# The rules themselves are pinned in test_planning.py; here: the session follows them.


def test_short_documents_run_the_plain_model(stories):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc("Tom has a red ball.")], options=SessionOptions(max_tokens=8))
    assert session.plan.settings.plain and session.plan.config is None
    session.ask("What does Tom have?")
    assert selfextend_config(model) is None  # the model ran unpatched
    assert not any(type(c).__name__.startswith("SelfExtend") for c in session.cache)


def test_long_documents_get_the_smallest_group_size_that_reaches(stories, story_text):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc(story_text[:3000])], options=SessionOptions(max_tokens=16))
    needed = max(session.plan.prompt_tokens, len(session.prefix_tokens) + 128) + 16
    settings = session.plan.settings
    assert settings.reason == "extends" and settings.window == 128  # no registry entry: W = 512 // 4
    assert max_length(512, settings.group_size, 128) >= needed > max_length(512, settings.group_size - 1, 128)
    session.ask("Who is Lily?", max_tokens=2)
    assert selfextend_config(model) == session.plan.config


def test_given_group_size_is_used_as_given(stories):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc("Tom has a red ball.")], options=SessionOptions(group_size=3, window=64))
    assert (session.plan.settings.group_size, session.plan.settings.window) == (3, 64)
    assert session.plan.settings.reason == "given" and session.plan.requested_group_size == 3


def test_sessions_sharing_a_model_each_run_in_their_own_mode(stories, story_text):
    model, tokenizer = stories
    short = Session(model, tokenizer, [doc("Tom has a red ball.")], options=SessionOptions(max_tokens=4))
    long = Session(model, tokenizer, [doc(story_text[:3000])], options=SessionOptions(max_tokens=4))
    long.ask("Who is Lily?")
    assert selfextend_config(model) == long.plan.config
    short.ask("What does Tom have?")
    assert selfextend_config(model) is None
    again = long.ask("Who is Tom?")
    assert selfextend_config(model) == long.plan.config and again.prefilled_tokens < again.prompt_tokens


def test_memory_estimate_tracks_the_real_cache(stories, story_text):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc(story_text[:3000])], options=SessionOptions(max_tokens=8))
    session.prepare()
    tokens = len(session.prefix_tokens)
    info = session.info
    estimate = estimate_memory(info.shape, info.weights_bytes, tokens, session.plan.settings)
    real = cache_nbytes(session.cache)
    assert 0.9 * real <= estimate.kv_cache <= 1.1 * real
    assert estimate.weights == sum(array.nbytes for _, array in tree_flatten(model.parameters()))
    bigger = estimate_memory(info.shape, info.weights_bytes, 4 * tokens, session.plan.settings)
    assert bigger.kv_cache > 3 * estimate.kv_cache and bigger.prefill > estimate.prefill


def test_memory_beyond_the_machine_is_refused_before_prefill(stories, monkeypatch):
    model, tokenizer = stories
    monkeypatch.setenv(ENV_MAX_MEMORY, "2MB")
    with pytest.raises(
        InsufficientMemoryError, match=r"^not enough memory: this run needs about .* and the machine has 2.0 MB"
    ):
        Session(model, tokenizer, [doc("Tom has a red ball.")])


# -- turns ---------------------------------------------------------------------------------------


def fresh_answer(model, tokenizer, documents, history, question, max_tokens):
    """The answer a new session gives for the same conversation, prefilled in one go."""
    session = Session(
        model, tokenizer, documents, options=SessionOptions(max_tokens=max_tokens, prefill_step_size=4096)
    )
    session.history = list(history)
    return session.ask(question, max_tokens=max_tokens).text


def test_second_turn_prefills_only_its_own_tokens_and_answers_as_a_fresh_session(stories, story_text):
    model, tokenizer = stories
    documents = [doc(story_text[:3000])]  # ~1k tokens: beyond the trained 512
    session = Session(model, tokenizer, documents, options=SessionOptions(max_tokens=16, prefill_step_size=256))
    assert session.plan.prompt_tokens > 512 and session.plan.config.group_size > 1
    first = session.ask("Who went to the park?", max_tokens=16)
    assert first.prefilled_tokens == first.prompt_tokens  # document and question
    assert (
        session.cache[0].offset
        == len(session.cache_tokens)
        == first.prompt_tokens + first.generation_tokens + (first.finish_reason == "stop")
    )

    second_tokens = session.prompt_tokens("What did they eat?")
    second = session.ask("What did they eat?", max_tokens=16)
    reused = second.prompt_tokens - second.prefilled_tokens
    # The document and the whole first question came from the cache; what was computed is at
    # most the first answer (where its re-encoding differs from the tokens generated) and the
    # second question.
    assert reused >= first.prompt_tokens
    assert second.prefilled_tokens <= second.prompt_tokens - first.prompt_tokens
    assert second.prompt_tokens == len(second_tokens)
    # Reusing the cache changes nothing: a fresh session over the same conversation says the same.
    assert second.text == fresh_answer(model, tokenizer, documents, session.history[:1], "What did they eat?", 16)


def test_reset_goes_back_to_the_documents(stories):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc("Tom has a red ball. " * 20)], options=SessionOptions(max_tokens=8))
    session.ask("What does Tom have?")
    session.reset()
    assert session.history == [] and session.cache_tokens == session.prefix_tokens
    assert {c.offset for c in session.cache} == {len(session.prefix_tokens)}
    answer = session.ask("What does Tom have?")
    assert answer.prefilled_tokens == answer.prompt_tokens - len(session.prefix_tokens)


def test_interrupted_answer_keeps_cache_and_conversation_consistent(stories, story_text):
    model, tokenizer = stories
    session = Session(model, tokenizer, [doc(story_text[:2000])], options=SessionOptions(max_tokens=40))
    pieces = []

    def stop_after_three(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("Who is Lily?", on_text=stop_after_three)
    assert session.last_answer.finish_reason == "interrupted"
    assert session.history == [("Who is Lily?", "".join(pieces))]
    assert {c.offset for c in session.cache} == {len(session.cache_tokens)}
    # The next turn works, and answers like a fresh session over the same conversation.
    answer = session.ask("Who is Tom?", max_tokens=12)
    assert answer.text == fresh_answer(model, tokenizer, session.documents, session.history[:1], "Who is Tom?", 12)


def test_conversation_past_the_reach_is_refused(stories):
    model, tokenizer = stories
    session = Session(
        model, tokenizer, [doc("Tom has a red ball.")], options=SessionOptions(max_tokens=8, group_size=1)
    )
    with pytest.raises(InputTooLongError, match=r"^too long: \d+ prompt tokens \+ 8 answer tokens = \d+ > N_max 512"):
        session.ask("word " * 600)


def test_a_chat_that_outgrows_its_plan_replans_and_answers_every_turn(stories, story_text):
    model, tokenizer = stories
    notices = []
    session = Session(
        model, tokenizer, [doc(story_text[:600])], options=SessionOptions(max_tokens=24), notice=notices.append
    )
    assert session.plan.settings.plain  # the document and a question fit the 512-token context
    questions = ["What happened next in the story? Tell me about the park and the dog. " * 4] * 6
    group_sizes = []
    for question in questions:
        answer = session.ask(question, max_tokens=24)
        assert answer.generation_tokens > 0
        group_sizes.append(session.plan.settings.group_size)
        assert answer.prompt_tokens + 24 <= session.plan.max_length
    assert group_sizes[0] == 1 and group_sizes[-1] > 1 and group_sizes == sorted(group_sizes)
    assert len(session.history) == len(questions)  # nothing dropped: a larger G still reached
    assert any("re-planned to G=" in n for n in notices)
    # After re-planning, the answer is what a fresh session with those settings gives.
    last_q = "Who was in the park?"
    answer = session.ask(last_q, max_tokens=12)
    fresh = Session(
        model,
        tokenizer,
        session.documents,
        options=SessionOptions(
            max_tokens=12, group_size=session.plan.settings.group_size, window=session.plan.settings.window
        ),
    )
    fresh.history = session.history[:-1]
    assert answer.text == fresh.ask(last_q, max_tokens=12).text


def test_at_the_largest_reach_the_oldest_turns_are_dropped(stories, story_text):
    model, tokenizer = stories
    notices = []
    options = SessionOptions(max_tokens=16, group_size=2, window=128)  # given: never re-planned, reach 896
    session = Session(model, tokenizer, [doc(story_text[:600])], options=options, notice=notices.append)
    for i in range(8):
        session.ask(f"Question {i}: what happened next in the story? " * 6, max_tokens=16)
    assert any(n.startswith("dropped the ") and "the documents stay" in n for n in notices)
    assert len(session.history) < 8 and session.history[-1][0].startswith("Question 7")
    assert session.conversation_tokens <= session.plan.max_length


# -- the document cache ----------------------------------------------------------------------------


def test_document_cache_hit_skips_the_document_prefill_and_answers_the_same(stories, story_text, tmp_path):
    model, tokenizer = stories
    documents = [doc(story_text[:3000])]
    options = SessionOptions(max_tokens=12)
    first = Session(model, tokenizer, documents, options=options, doc_cache=DocumentCache(tmp_path))
    miss = first.ask("Who is Lily?")
    assert first.document_source == "prefill" and len(DocumentCache(tmp_path).entries()) == 1

    second = Session(model, tokenizer, documents, options=options, doc_cache=DocumentCache(tmp_path))
    hit = second.ask("Who is Lily?")
    assert second.document_source == "cache"
    assert hit.prefilled_tokens == hit.prompt_tokens - len(second.prefix_tokens) < 20
    assert hit.text == miss.text


def test_kv_bits_refused_for_heads_too_small_to_quantize(stories):
    model, tokenizer = stories  # head_dim 8: MLX quantizes groups of 32 or 64 values
    with pytest.raises(SelfExtendError, match="--kv-bits needs a head size divisible by 32; this model's is 8"):
        Session(model, tokenizer, [doc("Tom has a red ball.")], options=SessionOptions(kv_bits=8))


def test_quantized_kv_cache_session(stories, tmp_path):
    """--kv-bits on a tiny random-weight Llama with 64-wide heads (stories260K's are 8 wide)."""
    from mlx_lm.models import llama

    from selfextend_mlx.core.cache import QuantizedSelfExtendKVCache
    from selfextend_mlx.loading.load import ModelInfo, model_shape
    from selfextend_mlx.planning import ModelLimits

    _, tokenizer = stories
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        rms_norm_eps=1e-5,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    model.model_info = ModelInfo(
        model_id="tiny-random", family="llama", limits=ModelLimits(256), shape=model_shape(vars(args))
    )
    documents = [doc("Tom has a red ball. Lily has a blue kite. " * 15)]  # ~400 tokens: beyond 256
    options = SessionOptions(max_tokens=6, kv_bits=8)
    session = Session(model, tokenizer, documents, options=options, doc_cache=DocumentCache(tmp_path))
    assert session.kv_group_size == 64 and session.plan.config.group_size > 1
    session.ask("Who has a ball?")
    assert all(isinstance(c, QuantizedSelfExtendKVCache) for c in session.cache)
    second = session.ask("Who has a kite?")  # trims the quantized cache back to the common prefix
    assert {c.offset for c in session.cache} == {len(session.cache_tokens)}
    assert second.prefilled_tokens < second.prompt_tokens - len(session.prefix_tokens)
    again = Session(model, tokenizer, documents, options=options, doc_cache=DocumentCache(tmp_path))
    assert again.prepare() == "cache" and isinstance(again.cache[0], QuantizedSelfExtendKVCache)
