"""GGUF architectures as mlx-lm models: one table row per `general.architecture`.

Each row says which mlx-lm model_type builds the model, how llama.cpp's tensor names map
to mlx-lm's, and what llama.cpp's converter changed in the weights that must be undone:

- llama (Llama, Mistral, SmolLM, TinyLlama): q/k rows permuted so its rotary embedding can
  rotate adjacent pairs (gguf.unpermute_rows undoes it). No other architecture is permuted.
- gemma, gemma2, gemma3: every RMSNorm weight is stored as 1 + w (llama.cpp's norm
  multiplies by the weight; Hugging Face and mlx-lm multiply by 1 + weight), so 1 is
  subtracted at load. The embedding is always tied.
- phi3: q, k, v fused in one matrix and gate/up in another, as mlx-lm's phi3 has them.

`model_config` turns the metadata into the mlx-lm config (Hugging Face field names).
"""

from dataclasses import dataclass, field

_PROJECTIONS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LLAMA_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", **_PROJECTIONS}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm before and after both the attention and the MLP; llama.cpp's `ffn_norm`
# is the norm before the MLP there, not the one after the attention.
GEMMA2_LAYER = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    **_PROJECTIONS,
}
PHI3_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the mlx-lm module that builds it
    layer_names: dict  # llama.cpp block tensor -> mlx-lm name within model.layers.N
    permuted_qk: bool = False  # llama.cpp's q/k row order (llama only)
    norm_plus_one: bool = False  # RMSNorm weights stored as 1 + w (Gemma)
    ffn_tensor: str = "ffn_gate"  # the tensor whose rows are feed_forward_length
    always_tied: bool = False
    extra: dict = field(default_factory=dict)  # fixed config fields

    def hf_name(self, gguf_name: str):
        """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None: not a model tensor)."""
        stem, _, suffix = gguf_name.rpartition(".")
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in self.layer_names:
            return f"model.layers.{parts[1]}.{self.layer_names[parts[2]]}.{suffix}"
        if stem in TOP_NAMES:
            return f"{TOP_NAMES[stem]}.{suffix}"
        return None

    def is_norm(self, hf_name: str) -> bool:
        return hf_name.endswith(("norm.weight", "layernorm.weight"))


ARCHITECTURES = {
    "llama": Architecture("llama", LLAMA_LAYER, permuted_qk=True),
    "qwen2": Architecture("qwen2", LLAMA_LAYER),
    "qwen3": Architecture("qwen3", {**LLAMA_LAYER, **QK_NORMS}),
    "gemma": Architecture("gemma", LLAMA_LAYER, norm_plus_one=True, always_tied=True),
    "gemma2": Architecture("gemma2", GEMMA2_LAYER, norm_plus_one=True, always_tied=True),
    "gemma3": Architecture("gemma3_text", {**GEMMA2_LAYER, **QK_NORMS}, norm_plus_one=True, always_tied=True),
    "phi3": Architecture("phi3", PHI3_LAYER, ffn_tensor="ffn_up"),
}
FAMILY_NAMES = "llama (Llama, Mistral, SmolLM), qwen2, qwen3, gemma, gemma2, gemma3, phi3"

# llama.cpp's rule for the Gemma 2/3 27B models, whose query scale is 1/sqrt(hidden / heads)
# instead of 1/sqrt(head_dim): they are the ones with these layer counts.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_SLIDING_PATTERN = 6  # llama.cpp's fixed pattern when the file does not say


def model_config(header) -> dict:
    """An mlx-lm config (Hugging Face names) from the GGUF metadata of a supported file."""
    arch_name = header.architecture
    arch = ARCHITECTURES[arch_name]
    value = header.arch_value
    heads = int(value("attention.head_count"))
    width = int(value("embedding_length"))
    head_dim = int(value("attention.key_length", width // heads))
    vocab = value("vocab_size") or len(header.metadata.get("tokenizer.ggml.tokens", [])) or None
    if not vocab:
        vocab = header.tensors["token_embd.weight"][1][0]
    config = {
        "model_type": arch.model_type,
        "hidden_size": width,
        "num_hidden_layers": int(value("block_count")),
        "intermediate_size": int(value("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(value("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(value("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "rope_theta": float(value("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(value("context_length", 0)) or None,
        # No separate output matrix: the head shares the embedding.
        "tie_word_embeddings": arch.always_tied or "output.weight" not in header.tensors,
    }
    if "rope_freqs.weight" in header.tensors:
        # A neutral llama3 rope (factor 1: the plain frequencies); the loader then puts the
        # file's frequency table in it (gguf._divide_rope_frequencies).
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if value("rope.scaling.type", "none") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(value("rope.scaling.factor", 1.0))}
    if arch_name in ("gemma2", "gemma3"):
        big = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch_name]
        config["query_pre_attn_scalar"] = width // heads if big else head_dim
    if arch_name == "gemma2":
        config["attn_logit_softcapping"] = float(value("attn_logit_softcapping", 50.0))
        config["final_logit_softcapping"] = float(value("final_logit_softcapping", 30.0))
    if arch_name == "gemma3":
        config["sliding_window"] = int(value("attention.sliding_window", 512))
        config["sliding_window_pattern"] = int(value("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN))
        config["rope_local_base_freq"] = 10000.0  # llama.cpp's fixed local base
        config.setdefault("rope_scaling", None)
    if arch_name == "phi3":
        trained = value("rope.scaling.original_context_length") or config["max_position_embeddings"]
        config["original_max_position_embeddings"] = trained
        config["partial_rotary_factor"] = int(value("rope.dimension_count", head_dim)) / head_dim
    return config
