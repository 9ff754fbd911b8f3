"""The document cache store: keys, round trips, corrupt and mismatched files, atomic writes."""

import mlx.core as mx
import pytest
from conftest import shared_path

import selfextend_mlx.core.cache as core_cache
from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import ENV_CACHE_DIR, DocumentCache, cache_key, default_cache_dir, read_metadata
from selfextend_mlx.loading.load import load

CONFIG = SelfExtendConfig(group_size=4, window=64)
TOKENS = list(range(3, 203))  # 200 tokens


@pytest.fixture(scope="module")
def model():
    model, _ = load(str(shared_path("models", "stories260K")), selfextend=False)
    return apply_selfextend(model, CONFIG)


def filled_cache(model, tokens=TOKENS):
    cache = make_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_key_depends_on_everything_that_changes_the_cache():
    base = cache_key("m", CONFIG, None, TOKENS)
    assert base == cache_key("m", CONFIG, None, list(TOKENS))
    variants = [
        cache_key("other", CONFIG, None, TOKENS),
        cache_key("m", SelfExtendConfig(8, 64), None, TOKENS),
        cache_key("m", SelfExtendConfig(4, 32), None, TOKENS),
        cache_key("m", CONFIG, 4, TOKENS),
        cache_key("m", CONFIG, None, TOKENS[:-1]),
        cache_key("m", CONFIG, None, TOKENS[:-1] + [7]),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv(ENV_CACHE_DIR)
    assert "selfextend-mlx" in str(default_cache_dir())


def test_round_trip_gives_the_same_next_token_logits(model, tmp_path):
    store = DocumentCache(tmp_path)
    key = cache_key("stories", CONFIG, None, TOKENS)
    assert store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS)) is None  # nothing yet
    cache = filled_cache(model)
    store.save(key, cache, model_id="stories", config=CONFIG, metadata={"documents": "a.txt", "tokens": len(TOKENS)})
    loaded = store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS))
    assert loaded is not None and {c.offset for c in loaded} == {len(TOKENS)}
    step = mx.array([[42]])
    assert mx.allclose(model(step, cache=cache), model(step, cache=loaded), atol=1e-5).item()

    (entry,) = store.entries()
    assert entry.path == store.path_for(key) and entry.size == entry.path.stat().st_size
    assert entry.metadata["documents"] == "a.txt" and entry.metadata["tokens"] == "200"
    assert entry.metadata["model_id"] == "stories" and entry.metadata["group_size"] == "4"


def test_corrupt_file_is_reported_in_one_line_and_removed(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    store.path_for(key).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS)) is None
    assert len(notices) == 1 and "\n" not in notices[0]
    assert notices[0].startswith("document cache unusable, rebuilding it:")
    assert not store.path_for(key).exists()


def test_truncated_file_is_detected(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    path = store.save(key, filled_cache(model), model_id="stories", config=CONFIG, metadata={})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS)) is None
    assert len(notices) == 1 and "not a readable prompt cache" in notices[0]


@pytest.mark.parametrize(
    "saved_for, message",
    [
        (dict(model_id="another", config=CONFIG), "was made for model another"),
        (dict(model_id="stories", config=SelfExtendConfig(8, 64)), "G=8"),
    ],
)
def test_file_made_for_other_settings_is_refused(model, tmp_path, saved_for, message):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    core_cache.save_cache(store.path_for(key), filled_cache(model), metadata={"key": key}, **saved_for)
    assert store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS)) is None
    assert len(notices) == 1 and message in notices[0]


def test_file_for_another_document_or_length_is_refused(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    other = cache_key("stories", CONFIG, None, TOKENS[:100])
    path = store.save(other, filled_cache(model, TOKENS[:100]), model_id="stories", config=CONFIG, metadata={})
    path.rename(store.path_for(key))  # right name, wrong content
    assert store.load(key, model_id="stories", config=CONFIG, tokens=len(TOKENS)) is None
    assert "holds another document" in notices[0]


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(model, tmp_path, monkeypatch):
    store = DocumentCache(tmp_path)
    key = cache_key("stories", CONFIG, None, TOKENS)
    cache = filled_cache(model)
    path = store.save(key, cache, model_id="stories", config=CONFIG, metadata={"documents": "old"})
    before = path.read_bytes()
    real_save = core_cache.save_prompt_cache

    def save_then_ctrl_c(file_name, *args, **kwargs):
        real_save(file_name, *args, **kwargs)  # the temp file is complete on disk ...
        with open(file_name, "r+b") as f:  # ... or half written: cut it, as a crash would
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(core_cache, "save_prompt_cache", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        store.save(key, cache, model_id="stories", config=CONFIG, metadata={"documents": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    assert path.read_bytes() == before
    other = cache_key("stories", CONFIG, None, TOKENS[:50])
    with pytest.raises(KeyboardInterrupt):
        store.save(other, cache, model_id="stories", config=CONFIG, metadata={})
    assert not store.path_for(other).exists()
    assert [e.metadata["documents"] for e in store.entries()] == ["old"]


def test_listing_ignores_unfinished_writes_and_clear_removes_everything(model, tmp_path):
    store = DocumentCache(tmp_path)
    for n in (50, 100):
        key = cache_key("stories", CONFIG, None, TOKENS[:n])
        store.save(key, filled_cache(model, TOKENS[:n]), model_id="stories", config=CONFIG, metadata={"tokens": n})
    (tmp_path / ".leftover.abc.safetensors").write_bytes(b"partial")
    assert sorted(e.metadata["tokens"] for e in store.entries()) == ["100", "50"]
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert store.clear() == (3, total)
    assert list(tmp_path.iterdir()) == [] and store.entries() == []


def test_missing_directory_is_an_empty_store(tmp_path):
    store = DocumentCache(tmp_path / "never-made")
    assert store.entries() == [] and store.clear() == (0, 0)


def test_metadata_of_a_non_cache_file_is_empty(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"garbage")
    assert read_metadata(path) == {}
