"""Which path computes an attention step (the table in docs/benchmarks.md), the guard against
MLX refusing a fused call, and the score-budget rule that sizes attention's query chunks."""

import re
from pathlib import Path

import mlx.core as mx
import pytest

from selfextend_mlx.core import attention
from selfextend_mlx.core.attention import EXPLICIT, FUSED, METAL, CachedKV, choose_path, selfextend_attention
from selfextend_mlx.core.config import DEFAULT_CHUNK_SIZE, SelfExtendConfig
from selfextend_mlx.planning import (
    SCORE_BUDGET,
    ModelLimits,
    ModelShape,
    attention_chunk_size,
    choose_settings,
    estimate_memory,
    plan_run,
    score_block_bytes,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def documented_routes():
    """(device, D, dtype name, queries, path) for each row of the docs' routing table."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## GPU paths") :]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in ("cpu", "metal", "cuda"):
            rows.append((cells[0], int(cells[1]), cells[2], int(cells[3]), cells[4]))
        elif rows and not line.startswith("|"):
            break  # the table ended
    return rows


def test_docs_table_has_every_device_and_path():
    rows = documented_routes()
    assert {r[0] for r in rows} == {"cpu", "metal", "cuda"}
    assert {r[4] for r in rows} == {EXPLICIT, FUSED, METAL}


@pytest.mark.parametrize("device,head_dim,dtype,queries,path", documented_routes())
def test_choose_path_follows_the_documented_table(device, head_dim, dtype, queries, path):
    for name in DTYPES if dtype == "any" else [dtype]:
        assert choose_path(head_dim=head_dim, dtype=DTYPES[name], queries=queries, device=device) == path, name


@pytest.mark.parametrize("head_dim", [8, 16, 32, 36, 40, 48, 64, 80, 96, 112, 128, 256])
def test_metal_prefill_is_fused_exactly_where_mlx_has_a_fused_kernel(head_dim):
    # MLX's Metal full attention: equal head sizes in {64, 72, 80, 96, 128} (192 and 256 unfused).
    expected = FUSED if 2 * head_dim in (64, 72, 80, 96, 128) else EXPLICIT
    assert choose_path(head_dim=head_dim, dtype=mx.float16, queries=512, device="metal") == expected


# -- the fused call, as a GPU would run it ------------------------------------------------------


def attention_problem(*, D=16, Hq=4, Hkv=2, n=72, L=24, W=12, dtype=mx.float32, seed=0):
    """Random rotated queries and keys as a cache hands them over, for queries [n - L, n)."""
    keys = mx.random.split(mx.random.key(seed), 5)
    normal = lambda shape, key: mx.random.normal(shape, key=key).astype(dtype)  # noqa: E731
    q_start = n - L
    neighbor_start = max(0, q_start - W + 1)
    grouped_end = max(neighbor_start, n - W)
    kv = CachedKV(
        normal((1, Hkv, grouped_end, D), keys[0]),
        normal((1, Hkv, n, D), keys[1]),
        normal((1, Hkv, n - neighbor_start, D), keys[2]),
        neighbor_start,
    )
    qn, qg = (normal((1, Hq, L, D), k) * D**-0.5 for k in keys[3:])
    return qn, qg, kv, q_start


def run(qn, qg, kv, q_start, backend, chunk_size=8, window=12):
    config = SelfExtendConfig(group_size=3, window=window, chunk_size=chunk_size, backend=backend)
    return selfextend_attention(qn, qg, kv, q_start=q_start, config=config)


def max_diff(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.mark.parametrize("device", ["cpu", "metal"])  # metal: values padded to the query's head size
@pytest.mark.parametrize("chunk_size", [5, 8, 64])
def test_fused_call_matches_the_explicit_path(monkeypatch, device, chunk_size):
    monkeypatch.setattr(attention, "device_kind", lambda: device)
    qn, qg, kv, q_start = attention_problem()
    expected = run(qn, qg, kv, q_start, "explicit")
    assert max_diff(run(qn, qg, kv, q_start, "fused", chunk_size), expected) < 1e-5
    # a step at the very start (no grouped keys yet) and one with every key grouped but the window
    for n, L in ((30, 30), (72, 3)):
        qn, qg, kv, q_start = attention_problem(n=n, L=L, seed=1)
        assert max_diff(run(qn, qg, kv, q_start, "fused", chunk_size), run(qn, qg, kv, q_start, "explicit")) < 1e-5


@pytest.fixture
def fresh_routing(monkeypatch):
    monkeypatch.setattr(attention, "_unfused", set())


def test_a_fused_call_mlx_refuses_falls_back_to_explicit_with_one_line(monkeypatch, capsys, fresh_routing):
    # Pretend this is a CUDA GPU: the table sends fp16, D = 32 prefill to the fused call with
    # force_fused=True. MLX's CPU backend has no fused kernel and refuses, as an MLX whose
    # routing differs from the table would: one line, then the explicit path.
    monkeypatch.setattr(attention, "device_kind", lambda: "cuda")
    qn, qg, kv, q_start = attention_problem(D=32, dtype=mx.float16)
    expected = run(qn, qg, kv, q_start, "explicit")
    out = run(qn, qg, kv, q_start, "auto")
    assert max_diff(out, expected) == 0.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fused attention for head size 64" in err[0] and "explicit" in err[0]
    assert (32, mx.float16) in attention._unfused
    run(qn, qg, kv, q_start, "auto")  # remembered: no second line, no second refusal
    assert capsys.readouterr().err == ""


def test_auto_on_a_cpu_never_takes_the_fused_call(monkeypatch, capsys, fresh_routing):
    called = []
    monkeypatch.setattr(attention, "_attend_chunk_fused", lambda *a, **k: called.append(1))
    qn, qg, kv, q_start = attention_problem()
    assert max_diff(run(qn, qg, kv, q_start, "auto"), run(qn, qg, kv, q_start, "explicit")) == 0.0
    assert not called and capsys.readouterr().err == ""


# -- chunks sized to the score budget ------------------------------------------------------------


@pytest.mark.parametrize(
    "heads,keys,chunk",
    [
        (9, 4096, 512),  # small model, short input: the default chunk
        (9, 32768, 151),
        (32, 8192, 170),
        (32, 32768, 42),
        (32, 131072, 10),
        (128, 10**8, 1),  # never below one query
    ],
)
def test_attention_chunk_size_keeps_the_score_block_within_budget(heads, keys, chunk):
    assert attention_chunk_size(heads, keys) == chunk
    assert chunk == 1 or score_block_bytes(heads, chunk, keys) <= SCORE_BUDGET
    if chunk < DEFAULT_CHUNK_SIZE:  # the largest such chunk
        assert score_block_bytes(heads, chunk + 1, keys) > SCORE_BUDGET


def test_chunk_rule_honours_a_budget_and_a_cap():
    assert attention_chunk_size(32, 32768, budget=2 * SCORE_BUDGET) == 85
    assert attention_chunk_size(9, 4096, largest=128) == 128


def test_memory_estimate_and_plan_use_the_same_chunk():
    shape = ModelShape(layers=32, kv_heads=8, head_dim=128, heads=32, vocab=32000, item_bytes=2)
    limits = ModelLimits(trained_context=8192, max_group_size=16)
    tokens = 32768
    settings = choose_settings(limits, tokens)
    estimate = estimate_memory(shape, 0, tokens, settings)
    assert estimate.prefill == score_block_bytes(32, 42, tokens) + 512 * 32000 * 4

    class Info:
        model_id, weights_bytes = "test", 0

    Info.limits, Info.shape = limits, shape
    plan = plan_run(Info, tokens, prompt_tokens=tokens - 512, max_tokens=512)
    assert plan.chunk_size == 42 and plan.config.chunk_size == 42
    assert (plan.config.group_size, plan.config.window) == (settings.group_size, settings.window)


def test_no_second_copy_of_the_score_rule_in_core():
    # The rule lives in planning only: attention takes its chunk from the config.
    source = (Path(attention.__file__)).read_text()
    assert "SCORE_BUDGET" not in source and not re.search(r"budget\s*//", source)
