"""Prefill peak memory per 512-token step, plain vs SelfExtend, on a random model with
SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64) but a small MLP and
vocabulary, so that only attention and the cache differ between the two.

Run: python scripts/prefill_peak.py [TOKENS] [LAYERS]    (defaults 4096 and 30)
Prints, for each step, mx.get_peak_memory() above the memory in use before that step.
"""

import sys

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.llama import Model, ModelArgs

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache, remove_selfextend
from selfextend_mlx.loading.blas import reexec_with_openblas


def main(n_tokens: int = 4096, layers: int = 30, step: int = 512):
    args = ModelArgs(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=layers,
        intermediate_size=64,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        vocab_size=500,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    model = Model(args)
    mx.eval(model.parameters())
    tokens = mx.random.randint(0, args.vocab_size, (n_tokens,), key=mx.random.key(0))
    for mode in ("plain", "selfextend"):
        remove_selfextend(model)
        if mode == "selfextend":
            apply_selfextend(model, SelfExtendConfig(group_size=4, window=1024))
            cache = make_cache(model)
        else:
            cache = make_prompt_cache(model)
        peaks = []
        for s in range(0, n_tokens, step):
            mx.synchronize()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(model(tokens[None, s : s + step], cache=cache))
            peaks.append((mx.get_peak_memory() - before) / 2**20)
        print(f"{mode:>10} MiB above the step's start:", " ".join(f"{p:.0f}" for p in peaks))
        del cache


if __name__ == "__main__":
    reexec_with_openblas()
    main(*(int(a) for a in sys.argv[1:3]))
