"""Run under `mlx.launch`: load a model sharded over the ranks, run SelfExtend prefill and
decode, and save what each rank computed (tests/test_distributed.py compares it with one
process). Arguments: model folder, output folder, G, W, number of tokens."""

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from selfextend_mlx import SelfExtendConfig, apply_selfextend, make_cache
from selfextend_mlx.loading.distributed import load_sharded, ranks_of, world


def run(model, tokens, config, step=128, decode=8):
    """Logits of a chunked prefill over tokens[:-decode], then `decode` single-token steps."""
    apply_selfextend(model, config)
    cache = make_cache(model)
    prompt = tokens[:-decode]
    logits = [model(prompt[None, s : s + step], cache=cache) for s in range(0, prompt.size, step)]
    logits += [model(tokens[None, i : i + 1], cache=cache) for i in range(prompt.size, tokens.size)]
    return mx.concatenate(logits, axis=1)[0]


def main():
    folder, out, G, W, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    mx.random.seed(int(os.environ.get("MLX_RANK", "0")))  # ranks start apart: loading must align them
    model, _ = load_sharded(folder)
    draw = mx.random.uniform().item()  # what unseeded sampling would use next
    tokens = mx.random.randint(0, model.model_info.shape.vocab, (n,), key=mx.random.key(0))
    logits = run(model, tokens, SelfExtendConfig(group_size=G, window=W))
    group = world()
    info = model.model_info
    np.save(out / f"rank{group.rank()}.npy", np.array(logits.astype(mx.float32)))
    (out / f"rank{group.rank()}.txt").write_text(f"{ranks_of(model)} {info.shape.heads} {info.shape.kv_heads} {draw}")


if __name__ == "__main__":
    main()
