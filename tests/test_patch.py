"""Applying SelfExtend to loaded models: the parameter tree, quantized and LoRA layers, and
clear refusals for what is not supported."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from tiny_models import COMMON, random_tokens, tiny_model

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache, remove_selfextend, selfextend_config
from selfextend_mlx.errors import UnsupportedModelError

CONFIG = SelfExtendConfig(group_size=2, window=64)  # W above the inputs: must equal the plain model


def tree(model):
    return [(k, v.shape, v.dtype) for k, v in tree_flatten(model.parameters())]


def test_parameter_tree_is_unchanged_and_removal_restores():
    model = tiny_model("gemma3_text")
    before = tree(model)
    apply_selfextend(model, CONFIG)
    assert tree(model) == before
    assert selfextend_config(model) == CONFIG
    patched = [type(layer.self_attn).__name__ for layer in model.layers]
    assert patched == ["Attention", "SelfExtendAttention", "Attention", "SelfExtendAttention"]
    apply_selfextend(model, SelfExtendConfig(group_size=3, window=9))  # re-applying replaces
    assert selfextend_config(model).group_size == 3
    remove_selfextend(model)
    assert selfextend_config(model) is None
    assert all(type(layer.self_attn).__name__ == "Attention" for layer in model.layers)
    assert "make_cache" not in vars(model)


def test_quantized_weights_keep_working():
    model = tiny_model("llama", head_dim=32)
    nn.quantize(model, group_size=32, bits=4)
    tokens = random_tokens(30)
    plain = model(tokens[None])
    apply_selfextend(model, CONFIG)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert mx.allclose(model(tokens[None], cache=make_cache(model)), plain, atol=1e-4).item()


def test_lora_adapters_keep_working_and_train():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_model("llama")
    model.freeze()
    linear_to_lora_layers(
        model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    )
    for layer in model.layers:  # non-zero adapters, so they change the output
        layer.self_attn.q_proj.lora_b = mx.random.normal(layer.self_attn.q_proj.lora_b.shape) * 0.1
    tokens = random_tokens(30)
    plain = model(tokens[None])
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    apply_selfextend(model, CONFIG)
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable
    assert mx.allclose(model(tokens[None]), plain, atol=1e-4).item()

    def loss(m):
        return m(tokens[None]).sum()

    grads = nn.value_and_grad(model, loss)(model)[1]
    assert any(mx.abs(g).sum().item() > 0 for _, g in tree_flatten(grads))


def test_unsupported_architecture_names_what_is_supported():
    config = {
        **COMMON,
        "model_type": "gpt2",
        "n_ctx": 64,
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
    }
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral"):
        apply_selfextend(model, CONFIG)


def test_dynamic_ntk_rope_is_refused():
    model = tiny_model("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="DynamicNTKScalingRoPE"):
        apply_selfextend(model, CONFIG)
    assert selfextend_config(model) is None  # nothing half-applied


def test_config_is_validated():
    for bad in (dict(group_size=0, window=4), dict(group_size=2, window=0), dict(group_size=2.0, window=4)):
        with pytest.raises(ValueError):
            SelfExtendConfig(**bad)
