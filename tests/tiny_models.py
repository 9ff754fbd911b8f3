"""Random-weight mlx-lm models of every supported family, small enough to run in milliseconds."""

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _get_classes

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=97,
    max_position_embeddings=64,
)

# One entry per attention layout, with the features that make each family different.
FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "llama3-rope": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(model_type="mistral", rope_traditional=True),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True, rope_theta=1e6),
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5),
    "phi": dict(model_type="phi", num_key_value_heads=4, partial_rotary_factor=0.5, layer_norm_eps=1e-5),
    "gemma": dict(model_type="gemma", head_dim=16),
    "gemma2": dict(model_type="gemma2", head_dim=16, attn_logit_softcapping=3.0, query_pre_attn_scalar=16.0),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        num_hidden_layers=4,
        sliding_window=8,
        sliding_window_pattern=2,
        query_pre_attn_scalar=16.0,
        rope_local_base_freq=10000.0,
    ),
}


def tiny_model(name: str, seed: int = 0, **overrides):
    config = {**COMMON, **FAMILY_CONFIGS[name], **overrides}
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    # Larger-than-default projections, so attention is far from uniform and mistakes show.
    for layer in model.layers:
        for child in layer.self_attn.children().values():
            if isinstance(child, nn.Linear):
                child.weight = mx.random.normal(child.weight.shape) * 0.2
    mx.eval(model.parameters())
    return model


def random_tokens(n: int, seed: int = 1, vocab: int = COMMON["vocab_size"]):
    return mx.random.randint(0, vocab, (n,), key=mx.random.key(seed))
