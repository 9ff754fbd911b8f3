"""Write a random-weight model with Llama-3-8B's attention shape, 4-bit weights, for gpu_check.sh.

    python scripts/gpu_check_model.py OUT_FOLDER [--layers 8] [--seed 0]

Llama-3-8B's layers (hidden 4096, 32 query heads and 8 KV heads of 128, MLP 14336, rope base
500000, trained context 8192), fewer of them by default so a benchmark at 32k takes minutes:
attention and KV figures per layer are the 8B's, and SelfExtend/plain ratios do not depend on
the depth. The vocabulary and tokenizer are stories260K's (512 tokens), which is all a
benchmark on random tokens needs. The folder loads with `selfextend bench -m OUT_FOLDER`.
"""

import argparse
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "models" / "stories260K"

LLAMA3_8B_LAYER = dict(
    model_type="llama",
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    vocab_size=512,
    bos_token_id=1,
    eos_token_id=2,
)


def write_model(out: Path, layers: int, seed: int = 0, tokenizer: Path = TOKENIZER) -> dict:
    """The random 4-bit model in `out` (config.json, weights, tokenizer); returns its config."""
    config = {**LLAMA3_8B_LAYER, "num_hidden_layers": layers}
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.bfloat16)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, out / name)  # not its read-only mode
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="a folder with tokenizer.json (512 tokens)")
    args = parser.parse_args(argv)
    if not (args.tokenizer / "tokenizer.json").exists():
        print(f"error: {args.tokenizer} has no tokenizer.json (give --tokenizer)", file=sys.stderr)
        return 1
    config = write_model(args.out, args.layers, args.seed, args.tokenizer)
    print(f"{args.out}: {config['num_hidden_layers']} Llama-3-8B layers, 4-bit weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
