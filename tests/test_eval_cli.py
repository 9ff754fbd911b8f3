"""`selfextend eval` end to end on stories260K: JSON schemas, tables, plots, compare, one-line errors."""

import json
import struct

import pytest
from conftest import shared_path
from typer.testing import CliRunner

from selfextend_cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def stories():
    return shared_path("models", "stories260K")


@pytest.fixture(scope="module")
def story_text():
    return shared_path("text", "tinystories_sample.txt")


@pytest.fixture(scope="module")
def ppl_compare(stories, story_text, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppl")
    result = run(
        "eval",
        "ppl",
        "-m",
        stories,
        "-f",
        story_text,
        "--tokens",
        "1k",
        "--buckets",
        "256,512",
        "-G",
        "4",
        "-W",
        "128",
        "--compare",
        "--json",
        "--plot",
        folder / "ppl.png",
        "--progress",
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), folder


def test_ppl_compare_json_schema(ppl_compare):
    data, _ = ppl_compare
    assert data["task"] == "ppl" and data["mode"] == "compare"
    assert (data["tokens"], data["group_size"], data["window"], data["trained_context"]) == (1024, 4, 128, 512)
    assert [(b["start"], b["end"]) for b in data["buckets"]] == [(0, 256), (256, 512), (512, 1024)]
    for bucket in data["buckets"]:
        assert set(bucket) == {"start", "end", "targets", "ppl_plain", "ppl_selfextend"}
        assert 1.0 < bucket["ppl_plain"] < 50 and 1.0 < bucket["ppl_selfextend"] < 50
    # Every distance in [0, W) is plain attention, so the first bucket barely differs.
    first = data["buckets"][0]
    assert first["ppl_selfextend"] == pytest.approx(first["ppl_plain"], rel=0.05)


def test_ppl_progress_goes_to_stderr_and_plot_is_a_png(ppl_compare):
    _, folder = ppl_compare
    assert png_size(folder / "ppl.png") == (800, 500)


def test_progress_and_the_plot_are_said_on_stderr(stories, story_text, tmp_path):
    plot = tmp_path / "ppl.png"
    args = ("eval", "ppl", "-m", stories, "-f", story_text, "--tokens", "600", "--plain", "--json")
    result = run(*args, "--plot", plot)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("perplexity [") and lines[-1] == f"plot written to {plot}"
    assert "done in" in lines[-2] and not any("0.0 min" in line for line in lines)
    quiet = run(*args, "--plot", tmp_path / "quiet.png", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and (tmp_path / "quiet.png").exists()


@pytest.mark.parametrize("low, high", [(5.8, 7.5), (1.2, 1.3), (4.5, 237.0)])
def test_log_scale_ticks_are_plain_numbers(low, high, tmp_path, monkeypatch):
    from selfextend_mlx.evaluation import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    buckets = [{"start": 0, "end": 512, "ppl": low}, {"start": 512, "end": 1024, "ppl": high}]
    plots.plot_perplexity({"run": buckets}, tmp_path / "p.png")
    (figure,) = figures
    figure.canvas.draw()
    axis = figure.axes[0]
    bottom, top = axis.get_ylim()
    labels = [
        (tick.get_position()[1], tick.get_text())
        for tick in axis.get_yticklabels() + axis.get_yticklabels(minor=True)
        if tick.get_text() and bottom <= tick.get_position()[1] <= top
    ]
    assert len(labels) >= 2, labels  # a narrow range still gets numbers to read
    for value, text in labels:
        assert "times" not in text and "^" not in text and "$" not in text, labels
        assert float(text.replace(",", "")) == pytest.approx(value, rel=0.01)


def test_ppl_single_mode_table_and_json(stories, story_text):
    result = run("eval", "ppl", "-m", stories, "-f", story_text, "--tokens", "600", "--plain", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "plain" and data["group_size"] is None and data["window"] is None
    assert [set(b) for b in data["buckets"]] == [{"start", "end", "targets", "ppl"}] * 2
    assert data["buckets"][1]["targets"] == 88
    table = run("eval", "ppl", "-m", stories, "-f", story_text, "--tokens", "600", "--plain")
    assert table.exit_code == 0 and "512-600" in table.stdout and "stories260K plain" in table.stdout


def test_passkey_compare_json_schema_and_heatmap(stories, tmp_path):
    result = run(
        "eval",
        "passkey",
        "-m",
        stories,
        "--lengths",
        "300,400",
        "--depths",
        "0,1",
        "--trials",
        "2",
        "--seed",
        "3",
        "-G",
        "2",
        "-W",
        "128",
        "--compare",
        "--json",
        "--plot",
        tmp_path / "k.png",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "passkey" and data["seed"] == 3
    assert [(r["length"], r["depth"]) for r in data["results"]] == [(300, 0.0), (300, 1.0), (400, 0.0), (400, 1.0)]
    for row in data["results"]:
        assert row["trials"] == 2 and set(row["correct"]) == {"plain", "selfextend"}
        assert all(0 <= v <= 2 for v in row["correct"].values())
        assert row["tokens"] <= row["length"]
    assert set(data["accuracy"]) == {"plain", "selfextend"}
    for mode in ("plain", "selfextend"):
        expected = sum(r["correct"][mode] for r in data["results"]) / 8
        assert data["accuracy"][mode] == pytest.approx(expected)
    assert png_size(tmp_path / "k.png") == (800, 500)


def test_passkey_same_seed_same_run(stories):
    args = (
        "eval",
        "passkey",
        "-m",
        stories,
        "--lengths",
        "300",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--plain",
        "--json",
    )
    first, second = run(*args), run(*args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == json.loads(second.stdout)
    assert isinstance(json.loads(first.stdout)["results"][0]["correct"], int)


def test_needle_and_compare_of_saved_runs(stories, story_text, tmp_path):
    saved = []
    for mode in ("--plain", "--compare"):
        result = run(
            "eval",
            "needle",
            "-m",
            stories,
            "--haystack",
            story_text,
            "--needle",
            "Tom has a red kite.",
            "--question",
            "What does Tom have?",
            "--answer",
            "kite",
            "--lengths",
            "400",
            "--depths",
            "0.5",
            mode,
            "--json",
            "--max-tokens",
            "4",
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["task"] == "needle" and data["answer"] == "kite" and len(data["results"]) == 1
        saved.append(tmp_path / f"needle{len(saved)}.json")
        saved[-1].write_text(result.stdout)
    table = run("eval", "compare", *saved, "--plot", tmp_path / "cmp.png")
    assert table.exit_code == 0, table.output
    title, header = table.stdout.splitlines()[:2]
    assert title == "model: stories260K" and "accuracy" in table.stdout
    assert {"plain", "selfextend"} <= set(header.split())
    assert png_size(tmp_path / "cmp.png")[1] == 500


def test_compare_ppl_runs_in_one_table(ppl_compare, tmp_path):
    data, _ = ppl_compare
    eight = dict(data, kv_bits=8)
    (tmp_path / "a.json").write_text(json.dumps(data))
    (tmp_path / "b.json").write_text(json.dumps(eight))
    result = run("eval", "compare", tmp_path / "a.json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "model: stories260K" and "kv8 selfextend G4/W128" in lines[1]
    assert lines[3].split()[0] == "0-256" and len(lines) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppl", "-f", "/no/such/file.txt"], "no such file"),
        (["passkey", "--lengths", "2x"], "not a token count"),
        (["passkey", "--depths", "0.5,2"], "between 0 and 1"),
        (["ppl", "-f", "{text}", "--plot", "out.jpg"], "PNG"),
        (["ppl", "-f", "{text}", "--tokens", "1k", "--buckets", "512,2k"], "past the 1024 tokens scored"),
        (["passkey", "--lengths", "1k", "--needle-x"], "No such option"),
        (["ppl", "-f", "{text}", "--plain", "--compare"], "cannot be used together"),
        (["ppl", "-f", "{text}", "-m", "{model}", "--tokens", "100k", "--plain"], "has only"),
        (["compare", "{text}"], "not a JSON result"),
    ],
)
def test_bad_input_is_one_error_line(args, message, stories, story_text):
    args = [a.format(text=story_text, model=stories) for a in args]
    result = run("eval", *args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_prefix_reuse_between_prompts_answers_like_fresh_caches(stories):
    """run_cells trims the cache back to the prompts' common prefix; answers match fresh prefills."""
    from selfextend_mlx.core.config import SelfExtendConfig
    from selfextend_mlx.evaluation.common import SELFEXTEND, Mode, greedy_generate, new_cache, use_mode
    from selfextend_mlx.evaluation.prompts import passkey_prompt
    from selfextend_mlx.evaluation.retrieval import build_cells, passkey_keys, run_cells
    from selfextend_mlx.loading.load import load

    model, tokenizer = load(stories, selfextend=False)
    keys = passkey_keys(1, [700], [0.0, 0.5, 1.0], 2)
    cells = build_cells(
        [700], [0.0, 0.5, 1.0], 2, lambda n, d, t: passkey_prompt(tokenizer.encode, n, d, keys[(n, d)][t])
    )
    mode = Mode(SELFEXTEND, SelfExtendConfig(4, 64))
    use_mode(model, mode)

    class Counting:  # the patched model, counting the tokens it is fed
        layers, model_info, seen = model.layers, model.model_info, 0

        def __call__(self, x, cache):
            Counting.seen += x.shape[1]
            return model(x, cache=cache)

    fed, fed_computed = [], []

    def on_tokens(n, computed=True):
        fed.append(n)
        if computed:
            fed_computed.append(n)

    run_cells(Counting(), tokenizer, cells, [mode], 6, chunk_size=128, on_tokens=on_tokens)
    assert sum(fed) == sum(len(p.tokens) for c in cells for p in c.prompts)
    assert Counting.seen < 0.8 * sum(fed)  # the shared filler was not fed again
    answers = sum(len(c.prompts) for c in cells) * 6  # at most 6 answer tokens fed a prompt
    assert sum(fed_computed) <= Counting.seen <= sum(fed_computed) + answers  # the reused part is not computed
    for cell in cells:
        fresh = [tokenizer.decode(greedy_generate(model, p.tokens, new_cache(model), 6, 128)) for p in cell.prompts]
        assert cell.outputs["selfextend"] == fresh


def test_a_planned_mode_that_plans_plain_attention_takes_the_plain_answers(stories):
    """Inside the context a planned mode is plain attention: its answers are plain's, not
    computed a second time; past the context it runs its own SelfExtend pass."""
    from selfextend_mlx.evaluation.common import PLAIN, SELFEXTEND, Mode
    from selfextend_mlx.evaluation.prompts import passkey_prompt
    from selfextend_mlx.evaluation.retrieval import build_cells, passkey_keys, run_cells
    from selfextend_mlx.loading.load import load

    model, tokenizer = load(stories, selfextend=False)
    keys = passkey_keys(2, [300, 700], [0.5], 1)

    def run(lengths, modes):
        """The cells after the run, and the tokens the model was fed."""
        cells = build_cells(lengths, [0.5], 1, lambda n, d, t: passkey_prompt(tokenizer.encode, n, d, keys[(n, d)][t]))
        fed, seen = [], []

        def counting(x, cache):
            seen.append(x.shape[1])
            return model(x, cache=cache)

        counting.layers, counting.model_info = model.layers, model.model_info
        run_cells(
            counting, tokenizer, cells, modes, 6, chunk_size=128, on_tokens=lambda n, computed=True: fed.append(n)
        )
        assert sum(fed) == len(modes) * sum(len(cell.prompts[0].tokens) for cell in cells)  # progress counts all
        return cells, sum(seen)

    plain, planned = Mode(PLAIN), Mode(SELFEXTEND, limits=model.model_info.limits)
    (inside, past), both_fed = run([300, 700], [plain, planned])  # 300: inside the 512 tokens; 700: past
    assert inside.settings == {"plain": (1, 0), "selfextend": (1, 0)} and past.settings["selfextend"][0] > 1
    assert inside.outputs["selfextend"] == inside.outputs["plain"]
    _, plain_fed = run([300, 700], [plain])
    (past_alone,), extended_fed = run([700], [planned])
    assert past.outputs["selfextend"] == past_alone.outputs["selfextend"]
    assert both_fed == plain_fed + extended_fed  # the inside cell was fed once, for plain
