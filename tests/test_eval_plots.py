"""Plots are real PNG files of the asked pixel size; results read back and line up for compare."""

import struct

import pytest

from selfextend_mlx.errors import EvaluationError
from selfextend_mlx.evaluation.plots import plot_accuracy_grid, plot_perplexity
from selfextend_mlx.evaluation.results import compare_results, comparison_table, grid_panel, load_result


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


BUCKETS = [
    {"start": 0, "end": 512, "ppl": 4.5},
    {"start": 512, "end": 1024, "ppl": None},
    {"start": 1024, "end": 2048, "ppl": 230.0},
]


@pytest.mark.parametrize("size", [(640, 480), (1000, 300)])
def test_perplexity_plot_is_a_png_of_the_asked_size(tmp_path, size):
    path = plot_perplexity(
        {"plain": BUCKETS, "selfextend": BUCKETS[:1]}, tmp_path / "sub" / "p.png", trained_context=512, size=size
    )
    assert png_size(path) == size
    assert path.stat().st_size < 100_000


def test_heatmap_is_a_png_of_the_asked_size(tmp_path):
    cells = {(2048, 0.0): (1, 2), (2048, 1.0): (2, 2), (4096, 0.0): (0, 2), (4096, 1.0): (1, 2)}
    panel = grid_panel(cells)
    assert panel["lengths"] == [2048, 4096] and panel["depths"] == [0.0, 1.0]
    assert panel["correct"] == [[1, 0], [2, 1]] and panel["trials"] == [[2, 2], [2, 2]]
    path = plot_accuracy_grid({"plain": panel, "selfextend": panel}, tmp_path / "k.png", size=(900, 400))
    assert png_size(path) == (900, 400)


def test_plots_refuse_other_formats_and_tiny_sizes(tmp_path):
    with pytest.raises(EvaluationError):
        plot_perplexity({"plain": BUCKETS}, tmp_path / "p.svg")
    with pytest.raises(EvaluationError):
        plot_perplexity({"plain": BUCKETS}, tmp_path / "p.png", size=(50, 50))


def test_compare_refuses_mixed_tasks_and_bad_files(tmp_path):
    ppl = {"task": "ppl", "mode": "plain", "model": "m", "buckets": BUCKETS}
    passkey = {
        "task": "passkey",
        "mode": "plain",
        "model": "m",
        "results": [{"length": 2048, "depth": 0.0, "trials": 1, "correct": 1}],
    }
    with pytest.raises(EvaluationError, match="one task"):
        compare_results([ppl, passkey])
    table = comparison_table(compare_results([passkey, dict(passkey, model="other")]))
    assert "m plain" in table and "other plain" in table and "100%" in table
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="not a JSON result"):
        load_result(tmp_path / "bad.json")
    with pytest.raises(EvaluationError, match="no such result file"):
        load_result(tmp_path / "missing.json")


def test_compare_shows_a_repeated_measurement_once():
    run = {
        "task": "ppl",
        "mode": "compare",
        "model": "m",
        "group_size": 4,
        "window": 64,
        "buckets": [{"start": 0, "end": 512, "targets": 511, "ppl_plain": 4.0, "ppl_selfextend": 4.1}],
    }
    other = dict(run, group_size=8, buckets=[dict(run["buckets"][0], ppl_selfextend=3.9)])
    columns = compare_results([run, other])["columns"]
    assert list(columns) == ["m plain", "m selfextend G4/W64", "m selfextend G8/W64"]


def test_compare_joins_retrieval_runs_of_one_setting_at_other_lengths():
    def run(length, correct):
        return {
            "task": "passkey",
            "mode": "plain",
            "model": "m",
            "results": [{"length": length, "depth": 0.5, "trials": 1, "correct": correct}],
        }

    columns = compare_results([run(2048, 1), run(16384, 0)])["columns"]
    assert columns == {"m plain": {(2048, 0.5): (1, 1), (16384, 0.5): (0, 1)}}
