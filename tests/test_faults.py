"""The fault suite (issue 12): hostile and unlucky inputs keep getting one clear error and
never lose or corrupt what is saved.

- property-based (hypothesis): the document readers, the prompt-cache loader, the GGUF header
  reader and the registry parser on random, truncated and mutated bytes raise only their one
  error class;
- signals: a SIGTERM during a cache save (its handler raising SystemExit) leaves no temp file;
- a full disk: a real 512 KB tmpfs (root only; otherwise skipped, saying why) and a file-size
  limit (any user) make the cache write fail: one notice, the answer still comes, nothing
  partial stays;
- concurrent writers and readers of one entry;
- weights changed at the same path, and corrupted entries, end to end through the session.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from conftest import shared_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pdf_fixture import make_pdf

import selfextend_mlx.core.cache_file as core_cache
from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import MARKER, DocumentCache
from selfextend_mlx.app.documents import decode_text, html_to_text, parse_document
from selfextend_mlx.errors import CacheMismatchError, DocumentError
from selfextend_mlx.loading import gguf
from selfextend_mlx.loading.registry import RegistryError, parse_registry

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CONFIG = SelfExtendConfig(group_size=2, window=8)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutated(data: bytes, cut: int, flips: list) -> bytes:
    """`data` cut at `cut` (a fraction of its length) with some bytes replaced."""
    out = bytearray(data[: max(1, int(len(data) * cut))])
    for where, value in flips:
        out[int(where * (len(out) - 1))] = value
    return bytes(out)


CUTS = st.floats(0.0, 1.0)
FLIPS = st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6)


# -- the document readers ------------------------------------------------------------------------


def read_or_refuse(data: bytes, suffix: str = ""):
    try:
        document = parse_document("doc", data, suffix, max_chars=1_000_000)
    except DocumentError as error:
        assert "\n" not in str(error)
        return None
    document.text.encode("utf-8")  # real text, no lone surrogates
    return document


@FUZZ
@given(st.binary(max_size=4096), st.sampled_from(["", ".txt", ".html", ".md", ".pdf"]))
def test_random_bytes_are_a_document_or_one_document_error(data, suffix):
    read_or_refuse(data, suffix)


PDF = make_pdf(["First page of the report.", "The code word is zebra."])
HTML = (
    b"<!DOCTYPE html><html><head><title>T</title><script>var x = '<p>';</script></head>"
    b"<body><h1>Head</h1><p>Some &amp; more text.</p><table><tr><td>a</td></tr></table></body></html>"
)
UTF16 = "Grüße aus Köln, and a longer sentence after it.".encode("utf-16")


@FUZZ
@given(st.sampled_from([PDF, HTML, UTF16, "Le café était fermé.".encode("cp1252")]), CUTS, FLIPS)
def test_truncated_and_mutated_documents_are_read_or_refused_in_one_line(data, cut, flips):
    read_or_refuse(mutated(data, cut, flips))


@FUZZ
@given(st.text(max_size=2000))
def test_html_to_text_takes_any_text(text):
    assert isinstance(html_to_text(text), str)


@FUZZ
@given(st.binary(min_size=1, max_size=2048))
def test_decoding_gives_text_or_one_document_error(data):
    try:
        text = decode_text("doc", data)
    except DocumentError:
        return
    text.encode("utf-8")


def test_a_pdf_decompression_bomb_is_one_line_naming_the_file():
    # 80 MB of spaces in an 80 KB content stream: pypdf stops at its 75 MB limit
    squeeze = zlib.compressobj(9)
    body = b"".join(squeeze.compress(b" " * 10**6) for _ in range(80)) + squeeze.flush()
    start = PDF.index(b"5 0 obj")
    old = PDF[start : PDF.index(b"endobj", start)]
    new = b"5 0 obj\n<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(body) + body + b"\nendstream\n"
    with pytest.raises(DocumentError) as error:
        parse_document("bomb.pdf", PDF.replace(old, new))
    assert str(error.value).startswith("cannot read PDF bomb.pdf: LimitReachedError")


# -- the prompt-cache loader ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import random_tokens, tiny_model

    model = apply_selfextend(tiny_model("llama"), CONFIG)
    cache = make_cache(model)
    model(random_tokens(30)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return model, cache


@pytest.fixture(scope="module")
def cache_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "good.safetensors"
    core_cache.save_cache(path, tiny[1], model_id="tiny", config=CONFIG, storage_dtype=mx.float16)
    return path.read_bytes()


def load_or_refuse(path):
    try:
        return core_cache.load_cache(path, model_id="tiny", config=CONFIG)[0]
    except CacheMismatchError as error:
        assert "\n" not in str(error)
        return None


@FUZZ
@given(CUTS, FLIPS)
def test_a_damaged_cache_file_is_refused_or_gives_the_same_answer(tiny, cache_file, tmp_path, cut, flips):
    model, _ = tiny
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(mutated(cache_file, cut, flips))
    loaded = load_or_refuse(path)
    if loaded is not None:  # only a change that spares the arrays (a metadata letter) may load
        path.write_bytes(cache_file)
        intact = load_or_refuse(path)
        step = mx.array([[5]])
        assert mx.array_equal(model(step, cache=loaded), model(step, cache=intact)).item()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_never_a_cache(tmp_path, data):
    path = tmp_path / "random.safetensors"
    path.write_bytes(data)
    assert load_or_refuse(path) is None


def test_a_hostile_header_names_no_class_outside_the_caches(tiny, cache_file, tmp_path):
    arrays, header = mx.load(_saved(tmp_path, cache_file), return_metadata=True)
    # a name mlx-lm's cache module holds that is no cache class (mlx-lm itself would call it)
    header = {k: ("tree_flatten" if k.startswith("1.") else v) for k, v in header.items()}
    path = tmp_path / "hostile.safetensors"
    mx.save_safetensors(str(path), arrays, header)
    with pytest.raises(CacheMismatchError, match="unknown cache class"):
        core_cache.load_cache(path, model_id="tiny", config=CONFIG)


def _saved(tmp_path, data) -> str:
    path = tmp_path / "saved.safetensors"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("length", [2**63, 2**40, 10**9])
def test_a_header_length_past_the_file_is_refused_before_reading(tmp_path, length):
    path = tmp_path / "long-header.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b"{}")
    with pytest.raises(CacheMismatchError, match="header length runs past the file"):
        core_cache.load_cache(path, model_id="tiny", config=CONFIG)


def test_tensor_offsets_past_the_file_are_refused(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}).encode()
    path = tmp_path / "offsets.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CacheMismatchError, match="tensor a is malformed"):
        core_cache.load_cache(path, model_id="tiny", config=CONFIG)


# -- the GGUF header reader and the registry parser --------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, stories_dir_module):
    from test_gguf import write_stories_gguf

    path = tmp_path_factory.mktemp("gguf") / "stories.gguf"
    write_stories_gguf(path, stories_dir_module, "Q8_0")
    return path.read_bytes()[:200_000]  # the header and a little data


@pytest.fixture(scope="module")
def stories_dir_module():
    return shared_path("models", "stories260K")


@FUZZ
@given(CUTS, FLIPS)
def test_a_damaged_gguf_header_is_one_gguf_error(gguf_file, tmp_path, cut, flips):
    path = tmp_path / "damaged.gguf"
    path.write_bytes(mutated(gguf_file, cut, flips))
    try:
        header = gguf.read_header(path)
        gguf.check_supported(header, path)
    except gguf.GGUFError as error:
        assert "\n" not in str(error)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_after_the_gguf_magic(tmp_path, data):
    path = tmp_path / "random.gguf"
    path.write_bytes(gguf.GGUF_MAGIC + struct.pack("<I", 3) + data)
    with pytest.raises(gguf.GGUFError):
        gguf.check_supported(gguf.read_header(path), path)


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(st.one_of(st.text(max_size=300), YAML_VALUES.map(yaml.safe_dump)))
def test_any_registry_text_is_entries_or_one_registry_error(text):
    try:
        entries = parse_registry(text, "user.yaml")
    except RegistryError as error:
        assert "\n" not in str(error) or "YAML" in str(error)
        return
    assert None in entries


# -- signals, a full disk, concurrent writers ----------------------------------------------------------

# A child process that saves a real cache and stops in the middle of writing it.
SAVE_THEN_WAIT = """
import signal, sys, time
sys.path.insert(0, {tests!r})
import mlx.core as mx
import selfextend_mlx.core.cache_file as core_cache
from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import DocumentCache
from tiny_models import random_tokens, tiny_model

signal.signal(signal.SIGTERM, lambda *args: sys.exit(143))  # as the CLI's handler does
model = apply_selfextend(tiny_model("llama"), SelfExtendConfig(2, 8))
cache = make_cache(model)
model(random_tokens(200)[None], cache=cache)
real = core_cache._write_safetensors

def slow_disk(name, *args):
    real(name, *args)
    print("writing", flush=True)
    time.sleep(60)

core_cache._write_safetensors = slow_disk
DocumentCache({folder!r}).save("a" * 64, cache, model_id="tiny", config=SelfExtendConfig(2, 8), metadata={{}})
"""


def test_sigterm_during_a_cache_save_leaves_no_temp_file(tmp_path):
    folder = tmp_path / "cache"
    script = SAVE_THEN_WAIT.format(tests=str(TESTS), folder=str(folder))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert any(p.name.startswith(".") and p.name != MARKER for p in folder.iterdir())  # the temp file
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143
    finally:
        child.kill()
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]


@pytest.fixture(scope="module")
def stories():
    from selfextend_mlx.loading.load import load

    model, tokenizer = load(str(shared_path("models", "stories260K")), selfextend=False)
    return model, tokenizer


def story(chars=2000) -> str:
    return shared_path("text", "tinystories_sample.txt").read_text()[:chars]


def session(stories, text, store, name="stories.txt"):
    from selfextend_mlx.app.documents import Document
    from selfextend_mlx.app.session import Session, SessionOptions

    model, tokenizer = stories
    notices = []
    return Session(
        model,
        tokenizer,
        [Document(name, text, "text")],
        options=SessionOptions(max_tokens=12),
        doc_cache=store,
        notice=notices.append,
    ), notices


@pytest.fixture
def tiny_tmpfs(tmp_path):
    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_is_a_notice_and_the_answer_still_comes(stories, tiny_tmpfs):
    notices = []
    first, _ = session(stories, story(), DocumentCache(tiny_tmpfs, notice=notices.append))
    answer = first.ask("Who is Lily?")
    assert answer.text and first.document_source == "prefill"
    (notice,) = notices
    assert "the disk is full" in notice and "\n" not in notice
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == [MARKER]  # no partial entry
    plain, _ = session(stories, story(), None)
    assert plain.ask("Who is Lily?").text == answer.text


def test_a_file_size_limit_makes_the_write_fail_cleanly(tmp_path):
    """Without root: RLIMIT_FSIZE makes MLX's write fail part-way, as a full disk does."""
    folder = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
        from selfextend_mlx.app.doccache import DocumentCache
        from tiny_models import random_tokens, tiny_model
        model = apply_selfextend(tiny_model("llama"), SelfExtendConfig(2, 8))
        cache = make_cache(model)
        model(random_tokens(4000)[None], cache=cache)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        store = DocumentCache({str(folder)!r}, notice=print)
        assert store.save("b" * 64, cache, model_id="tiny", config=SelfExtendConfig(2, 8), metadata={{}}) is None
        print("saved nothing")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "saved nothing" and lines[0].startswith("could not save the document cache")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER]


def test_ask_on_a_full_disk_answers_with_one_warning(tiny_tmpfs, tmp_path):
    document = tmp_path / "stories.txt"
    document.write_text(story())
    stories_path = str(shared_path("models", "stories260K"))
    env = {**os.environ, "SELFEXTEND_CACHE_DIR": str(tiny_tmpfs)}
    command = [_console_script(), "ask", str(document), "-q", "Who is Lily?", "-m", stories_path, "-n", "8"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    warnings = [line for line in result.stderr.splitlines() if "could not save the document cache" in line]
    assert len(warnings) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == [MARKER]


def _console_script() -> str:
    return str(Path(sys.executable).with_name("selfextend"))


CONCURRENT = """
import os, sys, time
sys.path.insert(0, {tests!r})
import mlx.core as mx
from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.app.doccache import DocumentCache
from tiny_models import random_tokens, tiny_model
config = SelfExtendConfig(2, 8)
model = apply_selfextend(tiny_model("llama"), config)
cache = make_cache(model)
model(random_tokens(300)[None], cache=cache)
notices = []
store = DocumentCache({folder!r}, notice=notices.append)
print("ready", flush=True)
while not os.path.exists({go!r}):  # all start together
    time.sleep(0.01)
loaded = 0
while {role!r} == "reader" and not store.path_for("c" * 64).exists():
    time.sleep(0.001)
for _ in range(25):
    if {role!r} == "writer":
        assert store.save("c" * 64, cache, model_id="tiny", config=config, metadata={{}}) is not None
    else:
        loaded += store.load("c" * 64, model_id="tiny", config=config, tokens=300) is not None
print(len(notices), loaded, flush=True)
"""


def test_concurrent_writers_and_readers_of_one_entry(tmp_path):
    folder, go = tmp_path / "cache", tmp_path / "go"
    roles = ["writer", "writer", "reader"]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT.format(tests=str(TESTS), folder=str(folder), go=str(go), role=role)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for role in roles
    ]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
        go.touch()
        results = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            child.kill()
    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
        assert out.split()[0] == "0"  # no reader ever saw a partial or corrupt entry
    assert int(results[-1][0].split()[1]) > 0  # the reader did read entries while they were rewritten
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "c" * 64 + ".safetensors"])
    assert DocumentCache(folder).load("c" * 64, model_id="tiny", config=CONFIG, tokens=300) is not None


# -- end to end through the session: changed weights, corrupted entries, odd bytes ------------------------


def copy_of_stories(target: Path) -> Path:
    target.mkdir()
    for item in shared_path("models", "stories260K").iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def test_new_weights_at_the_same_path_never_answer_from_the_old_cache(tmp_path):
    from selfextend_mlx.loading.load import load

    folder = copy_of_stories(tmp_path / "model")
    store = DocumentCache(tmp_path / "cache")
    first, _ = session(load(folder, selfextend=False), story(), store)
    first.ask("Who is Lily?")
    assert first.document_source == "prefill"

    weights = folder / "model.safetensors"
    before = weights.stat()
    header = core_cache.read_header(weights)
    start, end = header["model.layers.0.mlp.down_proj.weight"]["data_offsets"]
    data = bytearray(weights.read_bytes())
    base = 8 + struct.unpack("<Q", data[:8])[0]
    values = np.frombuffer(bytes(data[base + start : base + end]), dtype="<f4") * 1.5
    data[base + start : base + end] = values.astype("<f4").tobytes()
    time.sleep(0.02)
    with open(weights, "r+b") as f:  # same path, same inode, same size, new values ...
        f.write(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the old modification time
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    changed = load(folder, selfextend=False)
    second, _ = session(changed, story(), store)
    answer = second.ask("Who is Lily?")
    assert second.document_source == "prefill"  # a miss: the key holds the weights' fingerprint
    uncached, _ = session(changed, story(), None)
    assert uncached.ask("Who is Lily?").text == answer.text


def test_a_corrupted_entry_is_reported_rebuilt_and_answers_as_before(stories, tmp_path):
    store_notices = []
    store = DocumentCache(tmp_path / "cache", notice=store_notices.append)
    first, _ = session(stories, story(), store)
    expected = first.ask("Who is Lily?").text
    (entry,) = store.entries()
    data = bytearray(entry.path.read_bytes())
    data[-64] ^= 0x55  # a byte of tensor data
    entry.path.write_bytes(bytes(data))

    second, _ = session(stories, story(), store)
    assert second.ask("Who is Lily?").text == expected
    assert second.document_source == "prefill"
    assert len(store_notices) == 1 and "does not match its checksum" in store_notices[0]
    (rebuilt,) = store.entries()
    third, _ = session(stories, story(), store)
    assert third.ask("Who is Lily?").text == expected and third.document_source == "cache"
    assert rebuilt.path.exists()


def test_a_cached_answer_equals_the_uncached_one(stories, tmp_path):
    """The float16 entry: the same greedy answer as the exact run (measured in docs/reliability.md)."""
    store = DocumentCache(tmp_path / "cache")
    session(stories, story(3000), store)[0].ask("Who is Lily?")
    cached, _ = session(stories, story(3000), store)
    answer = cached.ask("Who is Lily?")
    assert cached.document_source == "cache"
    assert answer.text == session(stories, story(3000), None)[0].ask("Who is Lily?").text


def test_legacy_bytes_in_a_document_and_its_name_reach_the_model(stories, tmp_path):
    from selfextend_mlx.app.documents import read_document

    raw = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(story(600).encode("ascii", "replace") + b" Le caf\xe9 \xe9tait ferm\xe9.")
    document = read_document(os.fsdecode(raw))
    assert "café était fermé" in document.text
    chat, _ = session(stories, document.text, DocumentCache(tmp_path / "cache"), name=document.name)
    assert chat.ask("Where is the café?").prompt_tokens > 0
    (entry,) = DocumentCache(tmp_path / "cache").entries()
    assert "\ufffd" in document.name and entry.metadata["documents"] == document.name
