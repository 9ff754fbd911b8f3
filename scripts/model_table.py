"""The README's table of recommended models, from the registry (models.yaml) and planning's
rules: trained and effective context; the reach with grouped positions inside the effective
context (what the planner reads as well as an input that fits: planning.fill_reach) and the
largest reach (grouped positions up to the trained context: planning.largest_reach); and the
memory of 4-bit weights plus a 16k-token fp16 KV cache on a Mac's GPU.

    python scripts/model_table.py

Weights are estimated as parameters x 4.5 bits (MLX's 4-bit affine quantization, one fp16
scale and bias per 64 weights); speed is not measured here (the project has no Mac).
"""

from selfextend_mlx.loading.registry import registry_entry
from selfextend_mlx.planning import ModelShape, choose_settings, fill_reach, format_bytes, kv_cache_bytes, largest_reach

# name in the registry, parameters (billions), what it is good for
RECOMMENDED = [
    ("SmolLM2-135M-Instruct", 0.135, "the embedded default: finds facts, no reasoning"),
    ("Qwen2.5-1.5B-Instruct", 1.5, "32k of its own: SelfExtend past it"),
    ("Gemma-2-2b-it", 2.6, "sliding-window layers stay plain"),
    ("Phi-3-mini-4k-instruct", 3.8, "4k trained; a large KV cache"),
    ("Llama-3-8B-Instruct", 8.0, "the paper's settings (G 8-16, W 2048)"),
    ("Mistral-7B-Instruct-v0.2", 7.2, "32k of its own: SelfExtend past it"),
]
TOKENS = 16 * 1024


def row(name: str, billions: float, use: str) -> str:
    entry = registry_entry(name)
    limits = entry.limits
    shape = ModelShape(entry.layers, entry.kv_heads, entry.head_dim, item_bytes=2)
    at_16k = choose_settings(limits, TOKENS)
    weights = billions * 1e9 * 4.5 / 8
    memory = weights + kv_cache_bytes(shape, TOKENS, at_16k)
    effective = f"{limits.effective_context:,}" if limits.effective_context else "-"
    return (
        f"| {name} | {billions:g}B | {limits.trained_context:,} | {effective} | {fill_reach(limits):,} | "
        f"{largest_reach(limits):,} | {format_bytes(weights)} / {format_bytes(memory)} | {use} |"
    )


def main() -> None:
    print(
        "| model | size | trained context | effective context | reach, well read | largest reach | "
        "4-bit weights / with 16k tokens | for |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, billions, use in RECOMMENDED:
        print(row(name, billions, use))


if __name__ == "__main__":
    main()
