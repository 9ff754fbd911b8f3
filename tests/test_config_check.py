"""Hostile model folders and files (issues 28.4, 28.5, 29.4): each is one line naming the file
and what is wrong, bounded in time and memory.

- config.json / tokenizer_config.json with values of the wrong type or shape;
- a weight file that is a dangling link;
- a `.gguf` path that links to /dev/zero, /dev/urandom or a FIFO (never opened);
- a GGUF file with a 250 MB metadata array (a sparse file): refused or skipped without
  reading it into memory.
"""

import json
import os
import shutil
import struct
import threading
import tracemalloc

import pytest

from selfextend_mlx import load
from selfextend_mlx.errors import ModelNotFoundError, SelfExtendError
from selfextend_mlx.loading import gguf
from selfextend_mlx.loading.load import describe


@pytest.fixture
def folder(tmp_path, stories_dir):
    copy = tmp_path / "model"
    shutil.copytree(stories_dir, copy)
    return copy


def edit(folder, name, change):
    path = folder / name
    config = json.loads(path.read_text())
    path.write_text(json.dumps(change(config)))


def set_field(key, value):
    return lambda config: {**config, key: value}


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(SelfExtendError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message and len(message) < 300, message
    return message


@pytest.mark.parametrize(
    "change, field, what",
    [
        (lambda c: [c], None, "JSON object, not list"),
        (lambda c: None, None, "JSON object, not NoneType"),
        (set_field("max_position_embeddings", "512"), "max_position_embeddings", "whole number"),
        (set_field("max_position_embeddings", 1e30), "max_position_embeddings", "whole number"),
        (set_field("rms_norm_eps", -1e-5), "rms_norm_eps", "positive number"),
        (
            lambda c: {**c, "num_attention_heads": 7, "num_key_value_heads": 7, "head_dim": None},
            "num_attention_heads",
            "divisor of hidden_size",
        ),
        (set_field("num_key_value_heads", 3), "num_key_value_heads", "divisor of num_attention_heads"),
        (set_field("hidden_size", True), "hidden_size", "whole number"),
        (set_field("eos_token_id", "two"), "eos_token_id", "token id"),
    ],
)
def test_config_json_of_the_wrong_type_or_shape(folder, change, field, what):
    edit(folder, "config.json", change)
    for call in (load, describe):
        message = one_line_error(call, folder, **({"selfextend": False} if call is load else {}))
        assert "config.json" in message and what in message
        assert field is None or f"field {field}" in message


@pytest.mark.parametrize(
    "key, value, what",
    [("eos_token", 5, "a string, an object or null"), ("chat_template", 3, "a string or a list"),
     ("add_bos_token", "yes", "true or false")],
)  # fmt: skip
def test_tokenizer_config_fields_of_the_wrong_type(folder, key, value, what):
    edit(folder, "tokenizer_config.json", set_field(key, value))
    message = one_line_error(load, folder, selfextend=False)
    assert "tokenizer_config.json" in message and f"field {key}" in message and what in message


def test_dangling_weight_link(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder / "gone.safetensors")
    message = one_line_error(load, folder, selfextend=False)
    assert "model.safetensors is a link to" in message and "does not exist" in message


def bounded(call, seconds=20):
    """Run `call` in a thread; a call still running after `seconds` fails the test."""
    result = {}

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001  (handed to the test)
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return result.get("error")


@pytest.mark.parametrize("target, kind", [("/dev/zero", "character device"), ("/dev/urandom", "character device")])
def test_gguf_link_to_a_device_says_what_it_is(tmp_path, target, kind):
    link = tmp_path / "model.gguf"
    link.symlink_to(target)
    for call in (lambda: load(link, selfextend=False), lambda: describe(link), lambda: gguf.read_header(link)):
        error = bounded(call)
        assert isinstance(error, SelfExtendError) and kind in str(error) and "config.json" not in str(error)


def test_gguf_link_to_a_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "model.gguf"
    link.symlink_to(fifo)
    for call in (lambda: load(link, selfextend=False), lambda: gguf.read_header(link)):
        error = bounded(call)
        assert isinstance(error, SelfExtendError) and "FIFO" in str(error), error
    assert isinstance(bounded(lambda: load(fifo, selfextend=False)), ModelNotFoundError)


# ------------------------------------------------------------------ 29.4: huge metadata arrays

BIG = 250_000_000  # a 250 MB uint8 array


def sparse_gguf(path, key: str, item_type: int = 0, count: int = BIG):
    head = gguf.GGUF_MAGIC + struct.pack("<IQQ", 3, 0, 1)
    head += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IIQ", 9, item_type, count)
    with open(path, "wb") as file:
        file.write(head)
        item = 8 if item_type == 8 else 1  # a string takes at least its 8-byte length
        file.truncate(len(head) + count * item)  # sparse: nothing written, nothing on disk


def peak_bytes(call):
    tracemalloc.start()
    try:
        error = bounded(call)
        return tracemalloc.get_traced_memory()[1], error
    finally:
        tracemalloc.stop()


def test_a_huge_metadata_array_is_skipped_unread(tmp_path):
    path = tmp_path / "blob.gguf"
    sparse_gguf(path, "general.blob")
    peak, error = peak_bytes(lambda: gguf.read_header(path))
    assert error is None and peak < 20_000_000  # without the cap: about 2.2 GB
    header = gguf.read_header(path)
    assert header.skipped == {"general.blob": BIG} and "general.blob" not in header.metadata


@pytest.mark.parametrize("key, item_type", [("tokenizer.ggml.token_type", 0), ("general.words", 8)])
def test_a_huge_array_that_would_be_needed_is_refused_in_one_line(tmp_path, key, item_type):
    path = tmp_path / "blob.gguf"
    sparse_gguf(path, key, item_type, count=BIG // 8 if item_type == 8 else BIG)
    peak, error = peak_bytes(lambda: gguf.read_header(path))
    assert isinstance(error, gguf.GGUFError) and peak < 20_000_000
    assert "items, more than the 4,194,304 read" in str(error) and key in str(error)
