"""Each GGUF architecture's name map and conventions, on small random-weight files written by
the `gguf` package's own writer (GGUFWriter), checked against the mlx-lm model built directly
from the same weights under Hugging Face names.

The files are written the way llama.cpp's converter writes them: Gemma norms stored as 1 + w,
llama q/k rows permuted, phi3's fused qkv and gate/up, Gemma 2/3 pre/post norms. The K-quant
and IQ types are checked tensor by tensor against the gguf package's dequantizer.
"""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

from selfextend_mlx.loading import gguf as loader
from selfextend_mlx.loading.gguf_arch import ARCHITECTURES

WIDTH, HEADS, KV, HEAD_DIM, FFN, VOCAB, LAYERS = 64, 4, 2, 16, 128, 96, 2


def hf_config(arch: str) -> dict:
    config = {
        "model_type": ARCHITECTURES[arch].model_type,
        "hidden_size": WIDTH,
        "num_hidden_layers": LAYERS,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": arch != "qwen2",  # one untied head
    }
    if arch in ("gemma2", "gemma3"):
        config["query_pre_attn_scalar"] = HEAD_DIM
    if arch == "gemma2":
        config.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "gemma3":
        config.update(sliding_window=4, sliding_window_pattern=2, rope_local_base_freq=10000.0)
    if arch == "phi3":
        config.update(original_max_position_embeddings=2048)
    return config


def random_model(arch: str):
    """An mlx-lm model of the architecture with random weights (norms not 1, biases not 0)."""
    config = hf_config(arch)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize") and arch == "gemma3":
        model.sanitize({})  # tied: drop the separate head
    rng = np.random.default_rng(len(arch))
    weights = {name: rng.normal(0, 0.2, v.shape).astype(np.float32) for name, v in tree_flatten(model.parameters())}
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model, weights, config


def gguf_name(arch: str, hf: str) -> str:
    table = ARCHITECTURES[arch]
    reverse = {f"model.layers.{{}}.{v}": k for k, v in table.layer_names.items()}
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        index, rest = stem[len("model.layers.") :].split(".", 1)
        return f"blk.{index}.{reverse['model.layers.{}.' + rest]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[stem] + "." + suffix


def write_file(path, arch: str, weights: dict, config: dict, kind=GGMLQuantizationType.F32, rope_factors=None):
    table = ARCHITECTURES[arch]
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(50.0)
        writer.add_final_logit_softcapping(30.0)
    if arch == "gemma3":
        writer.add_sliding_window(4)
        writer.add_sliding_window_pattern(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    for hf, array in weights.items():
        stored = array
        if table.permuted_qk and hf.endswith("q_proj.weight"):
            stored = loader.permute_rows(array, HEADS)
        elif table.permuted_qk and hf.endswith("k_proj.weight"):
            stored = loader.permute_rows(array, KV)
        elif table.norm_plus_one and table.is_norm(hf):
            stored = array + 1.0
        if stored.ndim == 2 and kind != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(arch, hf), quantize(stored, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(arch, hf), stored.astype(np.float32))
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TOKENS = [3, 17, 45, 2, 88, 61, 9, 30, 77, 5, 12, 54]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"])
def test_every_architecture_loads_to_the_same_logits(tmp_path, arch):
    model, weights, config = random_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_file(path, arch, weights, config)
    loaded, loaded_config = loader.load_gguf_model(path, dtype=mx.float32)
    assert loaded_config["model_type"] == config["model_type"]
    assert loaded_config["tie_word_embeddings"] == config["tie_word_embeddings"]
    expected = np.array(model(mx.array(TOKENS)[None]))
    np.testing.assert_allclose(np.array(loaded(mx.array(TOKENS)[None])), expected, atol=1e-4, rtol=1e-4)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 256}  # fmt: skip


def llama3_rope_factors(scaling: dict, base: float, dims: int) -> np.ndarray:
    """The divisor of each rotary frequency for a llama3 rope_scaling, as llama.cpp's converter
    stores it in rope_freqs.weight (written here from Llama 3.1's published scaling rule):
    short wavelengths keep theirs, long ones are divided by `factor`, the band between blends."""
    wavelength = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    old = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    return np.where(wavelength < old / high, 1.0, np.where(wavelength > old / low, scaling["factor"], blended))


def test_a_llama3_rope_frequency_table_loads_as_mlx_lm_llama3_rope(tmp_path):
    """Llama 3.1+ GGUF files keep their rope scaling as rope_freqs.weight: the loaded model
    gives the logits of mlx-lm's Llama3RoPE model, plain and under SelfExtend."""
    from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache

    model, weights, config = random_model("llama")
    scaled = dict(config, rope_scaling=LLAMA3_SCALING)
    module = importlib.import_module("mlx_lm.models.llama")
    reference = module.Model(module.ModelArgs.from_dict(scaled))
    reference.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    factors = llama3_rope_factors(LLAMA3_SCALING, config["rope_theta"], HEAD_DIM)
    assert 1.0 < factors[3] < 8.0 and factors[0] == 1.0 and factors[-1] == 8.0  # all three bands
    path = tmp_path / "llama3.gguf"
    write_file(path, "llama", weights, config, rope_factors=factors)

    loaded, _ = loader.load_gguf_model(path, dtype=mx.float32)
    tokens = mx.array(np.random.default_rng(0).integers(0, VOCAB, 400))[None]
    expected = np.array(reference(tokens))
    np.testing.assert_allclose(np.array(loaded(tokens)), expected, atol=1e-4, rtol=1e-4)
    unscaled = np.array(model(tokens))  # the same weights with plain rope: the table matters
    assert np.abs(unscaled - expected).max() > 100 * 1e-4

    se = SelfExtendConfig(group_size=4, window=64)
    extended = [apply_selfextend(m, se) for m in (reference, loaded)]
    logits = [np.array(m(tokens, cache=make_cache(m))) for m in extended]
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_a_rope_table_that_does_not_fit_is_one_line(tmp_path):
    model, weights, config = random_model("llama")
    path = tmp_path / "odd.gguf"
    write_file(path, "llama", weights, config, rope_factors=np.ones(HEAD_DIM))  # twice too long
    with pytest.raises(loader.GGUFError, match=r"rope frequency table F32 \[16\].*expected F32 \[8\]"):
        loader.load_gguf_model(path, dtype=mx.float32)


def test_q8_0_gemma3_file_goes_through_mx_load_and_keeps_its_blocks(tmp_path):
    """A file mx.load reads whole (F32 and Q8_0): the Gemma norm fix still applies."""
    model, weights, config = random_model("gemma3")
    path = tmp_path / "gemma3-q8.gguf"
    write_file(path, "gemma3", weights, config, kind=GGMLQuantizationType.Q8_0)
    loaded, _ = loader.load_gguf_model(path, dtype=None)
    assert loaded.layers[0].self_attn.q_proj.bits == 8
    expected = np.array(model(mx.array(TOKENS)[None]))
    got = np.array(loaded(mx.array(TOKENS)[None]).astype(mx.float32))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


# ------------------------------------------------------------------ every tensor type

DECODED_TYPES = ["BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS",
                 "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"]  # fmt: skip


def random_blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of a tensor of `kind` whose f16 scale fields are small and finite."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if kind == "BF16":
        raw = np.full((rows, cols, 2), 0, np.uint8)
        raw[..., 1] = rng.integers(0x3C, 0x40, (rows, cols))  # about 0.01 .. 1.9
        raw[..., 0] = rng.integers(0, 256, (rows, cols))
        return raw.reshape(rows, -1)
    # Every byte below 0x3C: any f16 scale field is then finite and below 1.
    raw &= 0x3B
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", DECODED_TYPES + ["Q8_K"])
def test_every_tensor_type_decodes_as_the_gguf_package_does(tmp_path, kind):
    rng = np.random.default_rng(0)
    rows, cols = 8, 512
    raw = random_blocks(kind, rows, cols, rng) if kind != "Q8_K" else q8_k_blocks(rows, cols, rng)
    assert loader.decodable(kind)
    got = loader.decode(raw.reshape(-1), kind, (rows, cols))
    expected = q8_k_values(raw) if kind == "Q8_K" else dequantize(raw, GGMLQuantizationType[kind])
    np.testing.assert_array_equal(got, np.asarray(expected, np.float32).reshape(rows, cols))


def q8_k_blocks(rows, cols, rng) -> np.ndarray:
    blocks = np.zeros((rows, cols // 256), dtype=[("d", "<f4"), ("q", "i1", 256), ("s", "<i2", 16)])
    blocks["d"] = rng.uniform(0.001, 0.01, blocks.shape)
    blocks["q"] = rng.integers(-127, 128, (*blocks.shape, 256))
    return blocks.view(np.uint8).reshape(rows, -1)


def q8_k_values(raw) -> np.ndarray:
    """ggml's Q8_K: y = d * q, written out from its block layout (ggml-common.h)."""
    blocks = raw.reshape(-1).view([("d", "<f4"), ("q", "i1", 256), ("s", "<i2", 16)])
    return (blocks["d"][:, None] * blocks["q"]).reshape(raw.shape[0], -1)


def test_k_quant_tensors_in_a_file_decode_and_size_as_held(tmp_path):
    """Q4_K/Q6_K tensors read back from a file as the gguf package decodes them; held natively
    they take 4 bits (groups of 32) for Q4_K, 8 bits (groups of 64) for Q6_K (the re-quantized
    layers themselves: tests/test_gguf_gemma3.py)."""
    path = tmp_path / "mixed.gguf"
    rng = np.random.default_rng(1)
    big = {"Q4_K": random_blocks("Q4_K", FFN, 256, rng), "Q6_K": random_blocks("Q6_K", FFN, 256, rng)}
    writer = GGUFWriter(str(path), "qwen3")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a"])
    for kind, raw in big.items():
        writer.add_tensor(f"{kind}.weight", raw, raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = loader.read_header(path)
    assert {name: kind for name, (kind, _) in header.tensors.items()} == {"Q4_K.weight": "Q4_K", "Q6_K.weight": "Q6_K"}
    data = np.memmap(path, np.uint8, mode="r")
    for name, (kind, shape) in header.tensors.items():
        start, nbytes = header.locations[name]
        values = loader.decode(data[start : start + nbytes], kind, shape)
        np.testing.assert_array_equal(values, dequantize(big[kind], GGMLQuantizationType[kind]))
    assert (
        loader.memory_needed(header, None) == FFN * 256 * 4 // 8 + FFN * 256 // 32 * 4 + FFN * 256 + FFN * 256 // 64 * 4
    )
