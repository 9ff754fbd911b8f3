"""Plots drawn from recorded JSON (issue 27): accuracy against length from `eval --json`
files (`eval compare --by-length --plot`) and prefill/decode time against length from
`bench --json` rows (`bench --from ROWS.json --plot`), without running a model."""

import json
import struct

import cli_support
from cli_support import invoke
from conftest import DATA

from selfextend_mlx.evaluation.plots import plot_accuracy_by_length, plot_bench
from selfextend_mlx.evaluation.results import pooled_by_length

isolated_cache = cli_support.isolated_cache
PLANNING = DATA.parent.parent / "docs" / "results" / "planning"
ROWS = [
    {"length": n, "mode": mode, "prefill_tps": 1000 / n * k, "decode_tps": 100 / k, "peak_memory_bytes": 1}
    for n in (1024, 2048)
    for mode, k in (("plain", 1), ("selfextend", 2))
]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_depths_are_pooled_per_length():
    cells = {(4096, 0.0): (1, 2), (4096, 1.0): (2, 2), (2048, 0.5): (0, 1)}
    assert pooled_by_length(cells) == {2048: (0, 1), 4096: (3, 4)}


def test_the_plot_functions_write_pngs_of_their_size(tmp_path):
    series = {"plain": {2048: (1, 2), 4096: (0, 0)}, "auto": {2048: (2, 2), 4096: (1, 2)}}
    assert png_size(plot_accuracy_by_length(series, tmp_path / "a.png", 4096, size=(640, 400))) == (640, 400)
    assert png_size(plot_bench(ROWS, tmp_path / "b.png", size=(900, 420))) == (900, 420)


def test_compare_draws_the_recorded_planning_grid_by_length(tmp_path):
    files = sorted(PLANNING.glob("passkey_*.json"))
    assert len(files) >= 10
    plot = tmp_path / "by_length.png"
    result = invoke("eval", "compare", *files, "--by-length", "--plot", plot)
    assert result.exit_code == 0, result.stderr
    assert png_size(plot) == (800, 500) and plot.stat().st_size < 150_000
    assert f"plot written to {plot}" in result.stderr
    accuracy = result.stdout.splitlines()[-1].split()
    assert accuracy[0] == "accuracy" and sorted(zip(accuracy[1::2], accuracy[2::2])) == [
        ("18/36", "50%"),
        ("36/36", "100%"),
    ]


def test_by_length_needs_a_retrieval_plot(tmp_path):
    files = sorted(PLANNING.glob("passkey_4k_*.json"))
    for args in (["--by-length"], ["--by-length", "--quiet"]):
        result = invoke("eval", "compare", *files, *args)
        assert result.exit_code == 1 and result.stderr.startswith("error: --by-length draws")


def test_bench_draws_recorded_rows_and_refuses_others(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))
    plot = tmp_path / "bench.png"
    drawn = invoke("bench", "--from", rows, "--plot", plot)
    assert drawn.exit_code == 0 and png_size(plot) == (900, 420), drawn.stderr
    assert json.loads(invoke("bench", "--from", rows, "--json").stdout) == ROWS
    bad = [[], [{"length": 1024, "mode": "plain"}], {"rows": 1}, [dict(ROWS[0], decode_tps=0)], "not json"]
    for content in bad:
        rows.write_text(content if isinstance(content, str) else json.dumps(content))
        refused = invoke("bench", "--from", rows, "--plot", plot)
        (line,) = refused.stderr.splitlines()
        assert refused.exit_code == 1 and line.startswith(f"error: --from {rows}: not the")
    missing = invoke("bench", "--from", tmp_path / "none.json", "--json")
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    assert "add --plot FILE.png or --json" in invoke("bench", "--from", rows).stderr


def test_bench_plot_draws_the_run_it_measured(tmp_path):
    plot = tmp_path / "live.png"
    model = DATA / "models" / "stories260K"
    args = ("bench", "-m", model, "-l", "256", "--modes", "plain,selfextend", "-W", "128", "--decode-steps", "1")
    result = invoke(*args, "--quiet", "--plot", plot)
    assert result.exit_code == 0, result.stderr
    assert png_size(plot) == (900, 420) and result.stderr == ""


def test_a_table_or_legend_of_methods_names_the_model_once():
    from selfextend_mlx.evaluation.plots import titled_legend
    from selfextend_mlx.evaluation.results import compare_results, comparison_table, shared_model

    labels = ["SmolLM2 plain", "SmolLM2 selfextend G3/W1024", "SmolLM2 kv8 yarn"]
    assert shared_model(labels) == ("SmolLM2", ["plain", "selfextend G3/W1024", "kv8 yarn"])
    two_models = ["SmolLM2 plain", "Gemma plain"]
    assert shared_model(two_models) == (None, two_models)
    assert shared_model(["plain"]) == (None, ["plain"])
    assert titled_legend("Perplexity", labels[:2]) == ("Perplexity: SmolLM2", ["plain", "selfextend G3/W1024"])
    assert titled_legend("Perplexity", two_models) == ("Perplexity", two_models)
    row = {"length": 4096, "depth": 0.5, "trials": 1}
    run = {"task": "passkey", "model": "SmolLM2", "results": [dict(row, correct={"plain": 1, "yarn": 0})]}
    longer = {"task": "passkey", "model": "SmolLM2", "mode": "plain", "results": [dict(row, length=8192, correct=0)]}
    table = comparison_table(compare_results([run, longer])).splitlines()
    assert table[0] == "model: SmolLM2" and table[1].split() == ["length", "depth", "plain", "yarn"]
    # plain's two runs join into one column of two cells; yarn has one: the counts say so
    assert table[-1].split() == ["accuracy", "1/2", "50%", "0/1", "0%"]
