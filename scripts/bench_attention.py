"""One decode step of attention alone, SelfExtend vs mlx's fused attention, at SmolLM2's shape.

Run: python scripts/bench_attention.py   (through `selfextend`'s OpenBLAS: LD_PRELOAD=... or
SELFEXTEND_NO_OPENBLAS unset; the script re-executes itself like the CLI does)
"""

import mlx.core as mx
import mlx.nn as nn

from selfextend_mlx import SelfExtendConfig
from selfextend_mlx.core.attention import CachedKV, rotate_queries_and_keys, selfextend_attention
from selfextend_mlx.evaluation.selftest import median_ms
from selfextend_mlx.loading.blas import reexec_with_openblas


def main(heads=9, kv_heads=3, head_dim=64, group_size=4, window=1024):
    rope = nn.RoPE(head_dim, base=1e5)
    config = SelfExtendConfig(group_size, window)
    print(f"{'keys':>6} {'SelfExtend us':>14} {'plain us':>9} {'ratio':>6}")
    for n in (4096, 8192, 16384):
        k = mx.random.normal((1, kv_heads, n, head_dim))
        v = mx.random.normal((1, kv_heads, n, head_dim))
        q = mx.random.normal((1, heads, 1, head_dim))
        window_keys = k[..., n - window :, :]
        scale = head_dim**-0.5

        def selfextend():
            q_neighbor, q_grouped, _, _ = rotate_queries_and_keys(rope, q * scale, q[:, :kv_heads], n - 1, config)
            kv = CachedKV(k, v, window_keys, n - window)
            return selfextend_attention(q_neighbor, q_grouped, kv, q_start=n - 1, config=config)

        se = 1e3 * median_ms(selfextend, 30)
        plain = 1e3 * median_ms(
            lambda: mx.fast.scaled_dot_product_attention(rope(q, offset=n - 1), k, v, scale=head_dim**-0.5), 30
        )
        print(f"{n:>6} {se:>14.0f} {plain:>9.0f} {se / plain:>6.2f}")


if __name__ == "__main__":
    reexec_with_openblas()
    main()
