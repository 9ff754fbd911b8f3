"""Documents past the largest reach: retrieval for ask, map-reduce for summarize (stories260K:
512-token context, so its largest reach, 6,272 tokens, is passed by a few pages)."""

import pytest
from conftest import shared_path

from selfextend_mlx.app.documents import Document
from selfextend_mlx.app.longdoc import LongDocument
from selfextend_mlx.app.passages import SKIPPED, Passage, balanced_parts, join_selected, passages, select_passages
from selfextend_mlx.app.session import SessionOptions
from selfextend_mlx.app.summaries import SummaryMemo
from selfextend_mlx.planning import FULL, MAP_REDUCE, RETRIEVAL, fill_reach, largest_reach

NEEDLE = "The secret word of the old lighthouse keeper is marmalade."


@pytest.fixture(scope="module")
def long_text():
    text = shared_path("text", "tinystories_sample.txt").read_text()
    cut = text.find("\n\n", len(text) * 85 // 100)  # past what the first 6k tokens hold
    return text[:cut] + "\n\n" + NEEDLE + "\n\n" + text[cut:]


def words(text: str) -> int:
    return len(text.split())


def test_passages_cover_the_text_in_order_within_their_size():
    text = "\n\n".join(f"Paragraph {i} " + "word " * (i % 7 * 20) for i in range(60))
    items = passages(text, words, size=100)
    assert all(p.tokens <= 100 for p in items)
    assert [p.index for p in items] == list(range(len(items)))
    assert " ".join(" ".join(p.text.split()) for p in items) == " ".join(text.split())
    long = "This is a sentence. " * 80  # one paragraph past the size: cut at sentence ends
    assert all(p.tokens <= 100 for p in passages(long, words, size=100))


@pytest.mark.parametrize("sizes, budget", [([10] * 25, 60), ([50, 5, 5, 50, 30, 30, 1], 60), ([7], 10)])
def test_balanced_parts_are_few_in_order_and_within_budget(sizes, budget):
    items = [Passage(i, f"p{i}", n) for i, n in enumerate(sizes)]
    groups = balanced_parts(items, budget)
    assert [p for g in groups for p in g] == items
    assert all(sum(p.tokens for p in g) <= budget for g in groups)
    assert len(groups) <= -(-sum(sizes) // budget) + 1


def test_retrieval_keeps_the_relevant_passage_in_document_order():
    items = [Passage(i, f"Filler about the weather on day {i}. It rained.", 10) for i in range(50)]
    items[31] = Passage(31, NEEDLE, 10)
    chosen = select_passages(items, "What is the secret word of the lighthouse keeper?", budget=60)
    assert 31 in [p.index for p in chosen] and sum(p.tokens for p in chosen) <= 60
    assert [p.index for p in chosen] == sorted(p.index for p in chosen)
    assert SKIPPED in join_selected(chosen) or len(chosen) == 1


def test_short_documents_take_the_full_strategy(stories):
    model, tokenizer = stories
    long = LongDocument(
        model,
        tokenizer,
        [Document("a.txt", "Tom has a red ball.", "text")],
        "Who has a ball?",
        task="ask",
        options=SessionOptions(max_tokens=8),
    )
    assert long.strategy == FULL and long.session is not None
    result = long.answer()
    assert result.strategy == FULL and result.answer.generation_tokens > 0


def test_ask_past_the_largest_reach_answers_from_retrieved_passages(stories, long_text):
    model, tokenizer = stories
    options = SessionOptions(max_tokens=16)
    long = LongDocument(
        model,
        tokenizer,
        [Document("stories.txt", long_text, "text")],
        "What is the secret word of the old lighthouse keeper?",
        task="ask",
        options=options,
    )
    limits = model.model_info.limits
    assert long.document_tokens > largest_reach(limits) and long.strategy == RETRIEVAL
    result = long.answer()
    assert result.strategy == RETRIEVAL and result.total_passages > result.selected_passages > 0
    assert result.selected_tokens < long.document_tokens
    prompt = result.answer.prompt_tokens
    assert prompt + 16 <= result.session.plan.max_length <= fill_reach(limits)
    assert prompt > 0.8 * fill_reach(limits)  # the reach is filled
    assert NEEDLE in result.session.documents[0].text  # the relevant passage is in


def test_summarize_past_the_largest_reach_maps_and_reduces(stories, long_text, tmp_path):
    model, tokenizer = stories
    notices = []
    memo = SummaryMemo(tmp_path / "summaries", notices.append)
    doc = Document("stories.txt", long_text, "text")

    def summarize():
        long = LongDocument(
            model,
            tokenizer,
            [doc],
            "Summarize the text above.",
            task="summarize",
            options=SessionOptions(max_tokens=24),
            memo=memo,
            notice=notices.append,
        )
        assert long.strategy == MAP_REDUCE
        return long.answer()

    first = summarize()
    assert first.strategy == MAP_REDUCE and first.parts >= 2 and first.levels >= 2
    assert len(first.part_summaries[0]) == first.parts and all(first.part_summaries[0])
    assert sum(n.startswith("summarizing part ") for n in notices) == first.parts
    assert first.answer.generation_tokens > 0
    assert len(list((tmp_path / "summaries").glob("*.json"))) >= first.parts
    notices.clear()
    again = summarize()  # the part summaries come back from disk
    assert sum("kept from an earlier run" in n for n in notices) == first.parts
    assert again.answer.text == first.answer.text


def test_a_part_the_model_gives_no_summary_of_is_summarized_in_halves(stories, long_text, tmp_path, monkeypatch):
    # SmolLM2-135M answered nothing at all for a 27k-token part of a novel (G=7): the summary
    # must not be that part's silence, kept on disk for every later run.
    from selfextend_mlx.app import session as session_module

    model, tokenizer = stories
    real_ask, asked = session_module.Session.ask, []

    def silent_on_long_parts(self, question, sampling=None, *args, **kwargs):
        answer = real_ask(self, question, sampling, *args, **kwargs)
        if "is part" in question:
            asked.append(self.plan.prompt_tokens)
        if self.plan.prompt_tokens > 1000 and "is part" in question:
            answer.text = ""  # what the model said, as if it had stopped at once
        return answer

    monkeypatch.setattr(session_module.Session, "ask", silent_on_long_parts)
    notices = []
    memo = SummaryMemo(tmp_path / "summaries", notices.append)
    long = LongDocument(
        model,
        tokenizer,
        [Document("stories.txt", long_text, "text")],
        "Summarize the text above.",
        task="summarize",
        options=SessionOptions(max_tokens=24),
        memo=memo,
        notice=notices.append,
    )
    result = long.answer()
    assert result.strategy == MAP_REDUCE and all(result.part_summaries[0])
    silent = [n for n in notices if n.startswith("no summary of part ")]
    assert silent and all(n.endswith(": summarizing it in two halves") for n in silent)
    assert any("first half" in n for n in notices) and any("second half" in n for n in notices)
    assert len(asked) > result.parts and any(tokens <= 1000 for tokens in asked)  # shorter halves were asked
    kept = [path.read_text() for path in (tmp_path / "summaries").glob("*.json")]
    assert kept and all('"summary": ""' not in text for text in kept)  # silence is never kept


def test_summary_memo_survives_corrupt_and_unwritable_entries(tmp_path):
    notices = []
    memo = SummaryMemo(tmp_path, notices.append)
    key = SummaryMemo.key("model", "part", 1)
    memo.put(key, "a summary")
    assert memo.get(key) == "a summary"
    (tmp_path / f"{key}.json").write_text("{not json")
    assert memo.get(key) is None
    blocked = SummaryMemo(tmp_path / "file", notices.append)
    (tmp_path / "file").write_text("not a folder")
    blocked.put(key, "x")
    assert notices and notices[-1].startswith("could not keep a part summary")
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_chat_about_a_document_past_the_largest_reach_points_to_ask_and_summarize(stories, long_text):
    from selfextend_mlx.app.session import Session
    from selfextend_mlx.errors import InputTooLongError

    model, tokenizer = stories
    with pytest.raises(InputTooLongError, match=r"a chat needs it whole; use `selfextend ask`"):
        Session(model, tokenizer, [Document("stories.txt", long_text, "text")])


# -- documents past the reach with no spaces or no searchable words (issues 28.1, 29.3) --------

NO_SPACES = {
    "chinese": "从前有一个小女孩，她的名字叫莉莉。她喜欢在阳光下玩耍。" * 400,
    "base64": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 1200,
    "minified json": '{"id":1,"tags":["a","b"],"ok":true},' * 1500,
    "emoji": "😀🎉" * 8000,
}


@pytest.mark.parametrize("kind", sorted(NO_SPACES))
def test_text_without_spaces_is_cut_into_passages_that_fit(stories, kind):
    _, tokenizer = stories
    text = NO_SPACES[kind]

    def count(piece):
        return len(tokenizer.encode(piece, add_special_tokens=False))

    items = passages(text, count, size=256)
    assert len(items) > 10 and all(p.tokens <= 256 for p in items)
    assert "".join(p.text for p in items) == text  # nothing lost, nothing added


def test_sentence_ends_of_other_scripts_cut_first():
    text = "一二三。四五六！七八九？" * 30
    items = passages(text, len, size=40)  # a character a token
    assert all(p.text.endswith(("。", "！", "？")) for p in items)


@pytest.mark.parametrize(
    "text",
    ["!?., ;: " * 50, "the of a and " * 50, "x y z " * 50, "😀 " * 50],
    ids=["punctuation", "stopwords", "single letters", "emoji"],
)
def test_passages_without_searchable_terms_come_in_document_order(text):
    items = [Passage(i, text, 10) for i in range(20)]
    chosen = select_passages(items, "What is it?", budget=60)
    assert [p.index for p in chosen] == list(range(len(chosen))) and chosen
    items[7] = Passage(7, "The lighthouse keeper.", 10)  # one scores: it comes first, the rest in order
    chosen = select_passages(items, "Who is the lighthouse keeper?", budget=60)
    assert 7 in [p.index for p in chosen] and [p.index for p in chosen][0] == 0


def test_ask_about_punctuation_past_the_reach_answers(stories):
    model, tokenizer = stories
    doc = Document("p.txt", "!?., ;: " * 6000, "text")
    long = LongDocument(model, tokenizer, [doc], "What is it?", task="ask", options=SessionOptions(max_tokens=2))
    assert long.strategy == RETRIEVAL
    result = long.answer()
    assert result.selected_passages > 0 and result.answer.prompt_tokens > 0
