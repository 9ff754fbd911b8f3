"""The document cache store: keys, compact round trips, checksums, corrupt and mismatched
files, atomic writes, a failed write, and the store's own folder (marker, list, rm, clear)."""

import json
import os
import time

import mlx.core as mx
import pytest
from conftest import shared_path

import selfextend_mlx.core.cache_file as core_cache
from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import (
    ENV_CACHE_DIR,
    MARKER,
    STALE_TEMP_SECONDS,
    DocumentCache,
    DocumentCacheError,
    cache_key,
    default_cache_dir,
    read_metadata,
)
from selfextend_mlx.errors import SelfExtendError
from selfextend_mlx.loading.load import load
from selfextend_mlx.planning import format_bytes

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


def saved(store, model, ids=TOKENS, **metadata):
    key = cache_key("stories", CONFIG, None, ids, weights="w1")
    path = store.save(key, filled_cache(model, ids), model_id="stories", config=CONFIG, metadata=metadata)
    assert path == store.path_for(key)
    return key, path


def load_of(store, key, tokens=TOKENS):
    return store.load(key, model_id="stories", config=CONFIG, tokens=len(tokens))


def test_key_depends_on_everything_that_changes_the_cache():
    base = cache_key("m", CONFIG, None, TOKENS, weights="w")
    assert base == cache_key("m", CONFIG, None, list(TOKENS), weights="w")
    variants = [
        cache_key("other", CONFIG, None, TOKENS, weights="w"),
        cache_key("m", CONFIG, None, TOKENS, weights="other weights"),
        cache_key("m", SelfExtendConfig(8, 64), None, TOKENS, weights="w"),
        cache_key("m", SelfExtendConfig(4, 32), None, TOKENS, weights="w"),
        cache_key("m", CONFIG, 4, TOKENS, weights="w"),
        cache_key("m", CONFIG, None, TOKENS[:-1], weights="w"),
        cache_key("m", CONFIG, None, TOKENS[:-1] + [7], weights="w"),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_default_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv(ENV_CACHE_DIR)
    assert "selfextend-mlx" in str(default_cache_dir())


def test_compact_round_trip_gives_the_same_next_tokens(model, tmp_path):
    store = DocumentCache(tmp_path)
    key = cache_key("stories", CONFIG, None, TOKENS, weights="w1")
    assert load_of(store, key) is None  # nothing yet
    cache = filled_cache(model)
    path = store.save(key, cache, model_id="stories", config=CONFIG, metadata={"documents": "a.txt", "tokens": 200})
    loaded = load_of(store, key)
    assert loaded is not None and {c.offset for c in loaded} == {len(TOKENS)}
    # stored in float16, handed back in the model's float32
    assert all(c.values.dtype == mx.float32 for c in loaded)
    assert path.stat().st_size < 0.6 * sum(c.nbytes for c in cache)
    step = mx.array([[42]])
    exact, restored = model(step, cache=cache), model(step, cache=loaded)
    assert mx.abs(exact - restored).max().item() < 0.05  # measured: ~0.002 (docs/reliability.md)
    assert mx.array_equal(mx.argmax(exact, axis=-1), mx.argmax(restored, axis=-1)).item()

    (entry,) = store.entries()
    assert entry.path == path and entry.size == path.stat().st_size and entry.id == key
    meta = entry.metadata
    assert (meta["documents"], meta["tokens"], meta["model_id"], meta["group_size"], meta["window"]) == (
        "a.txt",
        200,
        "stories",
        4,
        64,
    )
    assert json.loads(json.dumps(entry.record()))["tokens"] == 200


def test_values_beyond_float16_keep_their_precision(model, tmp_path):
    cache = filled_cache(model)
    cache[0].values = cache[0].values * 1e5  # beyond float16's 65504: stored as float32
    key = cache_key("stories", CONFIG, None, TOKENS, weights="w1")
    DocumentCache(tmp_path).save(key, cache, model_id="stories", config=CONFIG, metadata={})
    loaded = load_of(DocumentCache(tmp_path), key)
    assert mx.array_equal(loaded[0].values, cache[0].values[..., : len(TOKENS), :]).item()
    assert mx.isfinite(loaded[0].values).all().item()


def flip_a_payload_byte(path):
    data = bytearray(path.read_bytes())
    (header,) = __import__("struct").unpack("<Q", data[:8])
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0xFF  # the middle of the tensor data
    path.write_bytes(bytes(data))


def test_flipped_payload_bytes_fail_the_checksum_and_the_entry_is_rebuilt(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key, path = saved(store, model)
    flip_a_payload_byte(path)
    assert load_of(store, key) is None
    assert len(notices) == 1 and "does not match its checksum" in notices[0] and "\n" not in notices[0]
    assert notices[0].startswith("document cache unusable, rebuilding it:")
    assert not path.exists()  # removed, so the next save rebuilds it


def test_corrupt_file_is_reported_in_one_line_and_removed(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    store.path_for(key).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert load_of(store, key) is None
    assert len(notices) == 1 and "\n" not in notices[0]
    assert notices[0].startswith("document cache unusable, rebuilding it:")
    assert not store.path_for(key).exists()


def test_truncated_file_is_detected(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key, path = saved(store, model)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert load_of(store, key) is None
    assert len(notices) == 1 and "not a readable prompt cache" in notices[0]


def test_entry_without_a_checksum_is_rebuilt(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    real = core_cache.payload_digest
    core_cache.save_cache(store.path_for(key), filled_cache(model), model_id="stories", config=CONFIG)
    # an older writer: same file, no checksum field
    arrays, header = mx.load(str(store.path_for(key)), return_metadata=True)
    header = {k: v for k, v in header.items() if not k.endswith("payload_sha256")}
    header["0.key"] = key
    mx.save_safetensors(str(store.path_for(key)), arrays, header)
    assert real is core_cache.payload_digest
    assert load_of(store, key) is None and "no checksum" in notices[0]


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
    assert load_of(store, key) is None
    assert len(notices) == 1 and message in notices[0]


def test_file_for_another_document_or_length_is_refused(model, tmp_path):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    _, path = saved(store, model, TOKENS[:100])
    key = cache_key("stories", CONFIG, None, TOKENS, weights="w1")
    path.rename(store.path_for(key))  # right name, wrong content
    assert load_of(store, key) is None
    assert "holds another document" in notices[0]


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(model, tmp_path, monkeypatch):
    store = DocumentCache(tmp_path)
    key, path = saved(store, model, documents="old")
    before = path.read_bytes()
    real_write = core_cache._write_safetensors

    def write_then_stop(file_name, *args, **kwargs):
        real_write(file_name, *args, **kwargs)  # the temp file is complete on disk ...
        with open(file_name, "r+b") as f:  # ... or half written: cut it, as a crash would
            f.truncate(100)
        raise stop

    monkeypatch.setattr(core_cache, "_write_safetensors", write_then_stop)
    # Ctrl-C, and the SystemExit a SIGTERM handler raises: both clean up
    for stop in (KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(stop)):
            store.save(key, filled_cache(model), model_id="stories", config=CONFIG, metadata={"documents": "new"})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, MARKER])  # no temp file
        assert path.read_bytes() == before
    other = cache_key("stories", CONFIG, None, TOKENS[:50])
    with pytest.raises(SystemExit):
        store.save(other, filled_cache(model), model_id="stories", config=CONFIG, metadata={})
    assert not store.path_for(other).exists()
    assert [e.metadata["documents"] for e in store.entries()] == ["old"]


def test_a_failed_write_is_a_notice_and_leaves_nothing(model, tmp_path, monkeypatch):
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)

    def disk_full(file_name, *args, **kwargs):
        with open(file_name, "wb") as f:
            f.write(b"\0" * 1000)  # MLX got this far
        raise RuntimeError(f"[write] Unable to write 1048576 bytes to file {file_name}")

    monkeypatch.setattr(core_cache.mx, "save_safetensors", disk_full)
    monkeypatch.setattr(core_cache, "_disk_full", lambda name: True)
    key = cache_key("stories", CONFIG, None, TOKENS)
    assert store.save(key, filled_cache(model), model_id="stories", config=CONFIG, metadata={}) is None
    assert len(notices) == 1 and "the disk is full" in notices[0] and "\n" not in notices[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]


def test_unwritable_folder_is_a_notice(model, tmp_path):
    notices = []
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = DocumentCache(blocker / "cache", notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS)
    assert store.save(key, filled_cache(model), model_id="stories", config=CONFIG, metadata={}) is None
    assert len(notices) == 1 and "could not save the document cache" in notices[0]


# -- the folder: marker, listing, rm, clear ---------------------------------------------------------


def test_listing_ignores_unfinished_writes_and_clear_removes_only_the_stores_files(model, tmp_path):
    store = DocumentCache(tmp_path)
    for n in (50, 100):
        saved(store, model, TOKENS[:n], tokens=n)
    leftover = tmp_path / f".{'a' * 64}.safetensors.x1y2.safetensors"
    leftover.write_bytes(b"partial")
    mine = [p for p in tmp_path.iterdir() if p.name != MARKER]
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "model.safetensors").write_bytes(b"someone else's weights")
    assert sorted(e.metadata["tokens"] for e in store.entries()) == [50, 100]
    assert store.total_bytes() == sum(e.size for e in store.entries())
    size = sum(p.stat().st_size for p in mine)
    assert store.clear() == (3, size)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "notes.txt", "model.safetensors"])
    assert store.entries() == []


def test_clear_refuses_a_folder_that_is_not_a_store(tmp_path, stories_dir):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in stories_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(DocumentCacheError, match="is not a selfextend document cache") as caught:
        DocumentCache(folder).clear()
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert DocumentCache(folder).entries() == []  # model.safetensors is no entry


def test_a_store_without_the_marker_is_still_recognised_by_its_entries(model, tmp_path):
    store = DocumentCache(tmp_path)
    saved(store, model)
    (tmp_path / MARKER).unlink()  # as a store from before the marker
    assert store.is_store() and store.clear()[0] == 1


def test_rm_by_id_prefix(model, tmp_path):
    store = DocumentCache(tmp_path)
    first, _ = saved(store, model, TOKENS[:50], documents="first")
    second, _ = saved(store, model, TOKENS[:60], documents="second")
    assert store.remove(first[:8]).id == first
    assert [e.id for e in store.entries()] == [second]
    for bad, message in ((first[:8], "no cached document"), ("ab", "at least 4"), ("zzzz", "not an entry id")):
        with pytest.raises(DocumentCacheError, match=message):
            store.remove(bad)


def test_rm_refuses_an_ambiguous_prefix(model, tmp_path):
    store = DocumentCache(tmp_path)
    for key in ("abcd" + "0" * 60, "abcd" + "1" * 60):
        store.save(key, filled_cache(model, TOKENS[:40]), model_id="stories", config=CONFIG, metadata={})
    with pytest.raises(DocumentCacheError, match="matches 2 cached documents"):
        store.remove("abcd")
    assert store.remove("abcd1").id == "abcd" + "1" * 60


def test_stale_temp_files_are_swept_fresh_ones_kept(model, tmp_path):
    store = DocumentCache(tmp_path)
    saved(store, model, TOKENS[:40])
    stale = tmp_path / f".{'b' * 64}.safetensors.old1.safetensors"
    fresh = tmp_path / f".{'c' * 64}.safetensors.new1.safetensors"  # another process writing now
    for path in (stale, fresh):
        path.write_bytes(b"partial")
    past = time.time() - STALE_TEMP_SECONDS - 10
    os.utime(stale, (past, past))
    saved(store, model, TOKENS[:50])
    assert not stale.exists() and fresh.exists()


def test_missing_directory_is_an_empty_store(tmp_path):
    store = DocumentCache(tmp_path / "never-made")
    assert store.entries() == [] and store.clear() == (0, 0)


def test_metadata_of_a_non_cache_file_is_empty(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"garbage")
    assert read_metadata(path) == {}


def test_format_1_entries_are_listed_with_typed_fields(model, tmp_path):
    # what store format 1 wrote: every field a string
    key = "d" * 64
    info = {"key": key, "store_format": "1", "saved": "1700000000.5", "documents": "a.txt", "tokens": "2014"}
    info["kv_bits"] = "None"
    core_cache.save_cache(
        tmp_path / f"{key}.safetensors", filled_cache(model), model_id="m", config=CONFIG, metadata=info
    )
    (entry,) = DocumentCache(tmp_path).entries()
    assert entry.metadata["tokens"] == 2014 and entry.metadata["kv_bits"] is None
    assert entry.metadata["store_format"] == "1" and entry.metadata["documents"] == "a.txt"


# -- the size limit and whose folder it is (issue 29.1, 29.5) ---------------------------------


def test_the_least_recently_used_entries_go_past_the_limit(model, tmp_path):
    store = DocumentCache(tmp_path)
    keys = [saved(store, model, ids=[5 + n, *TOKENS])[0] for n in range(3)]
    size = max(e.size for e in store.entries()) + 100  # the headers differ by a few bytes
    for age, key in enumerate(keys):  # written oldest first ...
        os.utime(store.path_for(key), (time.time() - 100 + age, time.time() - 100 + age))
    load_of(store, keys[0], tokens=[0, *TOKENS])  # ... but the oldest was used last
    store.max_bytes = 3 * size  # room for three: the fourth write evicts the least recently used
    saved(store, model, ids=[9, *TOKENS])
    assert {e.id for e in store.entries()} == {keys[0], keys[2], store.entries()[0].id}
    assert len(store.entries()) == 3 and store.total_bytes() <= store.max_bytes


def test_the_limit_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFEXTEND_CACHE_MAX", "2GB")
    assert DocumentCache(tmp_path).max_bytes == 2_000_000_000
    monkeypatch.setenv("SELFEXTEND_CACHE_MAX", "lots")
    with pytest.raises(SelfExtendError):
        DocumentCache(tmp_path)


def test_a_folder_of_other_files_is_not_made_a_cache(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    notices = []
    store = DocumentCache(tmp_path, notice=notices.append)
    key = cache_key("stories", CONFIG, None, TOKENS, weights="w1")
    assert store.save(key, filled_cache(model), model_id="stories", config=CONFIG, metadata={}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no tag, no entry
    (line,) = notices
    assert "is not a selfextend document cache" in line and "\n" not in line
    saved(DocumentCache(tmp_path / "new"), model)  # a new folder becomes one
    assert (tmp_path / "new" / MARKER).is_file()


def test_each_write_is_reported_with_what_it_evicted_and_the_total(model, tmp_path):
    lines = []
    store = DocumentCache(tmp_path, report=lines.append)
    saved(store, model)
    size = store.total_bytes()
    store.max_bytes = int(size * 1.5)  # room for one entry
    saved(store, model, ids=[9, *TOKENS])
    first, second = lines
    assert first.startswith("cache: wrote ") and "removed" not in first
    assert "removed 1 least recently used entry" in second and len(store.entries()) == 1
    assert second.endswith(f"of {format_bytes(store.max_bytes)})")
    store.max_bytes = 10  # smaller than any entry: the newest stays, and the line says why
    saved(store, model, ids=[8, *TOKENS])
    assert lines[-1].endswith("the newest entry is kept even past the limit)") and len(store.entries()) == 1
