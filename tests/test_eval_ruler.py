"""The RULER-style generator and scorer (selfextend_mlx.evaluation.ruler): each task's prompt
has exactly one right answer, which the scorer accepts, and the wrong ones it rejects; the
same seed gives the same prompts; `eval ruler --json` end to end on stories260K."""

import json
import re

import pytest
from conftest import shared_path
from test_eval_cli import run

from selfextend_mlx.errors import EvaluationError
from selfextend_mlx.evaluation.ruler import TASKS, haystack_units, parse_tasks, ruler_prompt


def encode(text):
    return text.split()


def prompt(task, length=400, depth=0.5, seed=0, trial=0, units=None):
    return ruler_prompt(encode, task, length, depth, seed, trial, units or haystack_units())


@pytest.mark.parametrize("task", TASKS)
def test_one_right_answer_accepted_and_wrong_ones_rejected(task):
    p = prompt(task)
    right = ", ".join(p.answers)
    assert p.accepts(right) and p.accepts(f" {right.upper()}.")
    assert len(encode(p.text)) <= 400 and len(p.tokens) > 350  # filled to the length
    for answer in p.answers:  # each answer is stated in the text once, and the question does not give it
        stated = rf"VAR {answer} =" if task == "vartrack" else rf"\b{answer}\b"
        assert len(re.findall(stated, p.text)) == 1 and answer not in p.question
    wrong = [", ".join(p.answers[:-1]), right[:-1], right + "9"]  # one missing, cut, longer number
    wrong += [f"{right}, {d}" for d in p.distractors] + list(p.distractors)
    for answer in wrong:
        assert not p.accepts(answer), answer
    if task in ("single", "multikey"):
        assert len(p.answers) == 1
    else:
        assert len(p.answers) == (5 if task == "vartrack" else 4)
    assert bool(p.distractors) == (task in ("multikey", "vartrack"))


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_asked_needle_sits_at_the_depth(depth):
    p = prompt("multikey", length=800, depth=depth)
    body = len(p.text) - len(p.intro) - len(p.question)
    assert abs((p.needle_char - len(p.intro)) / body - depth) < 0.1
    assert (
        p.text[p.needle_char :].startswith("One of the special magic numbers for ")
        and p.answers[0] in p.text[p.needle_char : p.needle_char + 80]
    )


def test_variable_chain_is_in_order():
    p = prompt("vartrack", length=600, depth=0.2)
    first, *rest = p.answers
    places = [p.text.index(f"VAR {first} = ")] + [p.text.index(f"VAR {b} = VAR {a}.") for a, b in zip(p.answers, rest)]
    assert places == sorted(places)


def test_same_seed_same_prompts_and_a_text_haystack():
    assert prompt("multiquery").text == prompt("multiquery").text
    assert prompt("multiquery").text != prompt("multiquery", seed=1).text != prompt("multiquery", trial=1).text
    units = haystack_units("One sentence here. Another one there! A third?")
    p = prompt("single", length=200, units=units)
    assert "Another one there!" in p.text and p.accepts(p.answers[0])
    with pytest.raises(EvaluationError):
        haystack_units("   ")
    assert parse_tasks("single, vartrack,single") == ["single", "vartrack"]
    with pytest.raises(EvaluationError, match="unknown needles"):
        parse_tasks("single,needles")


def test_ruler_json(tmp_path):
    stories = shared_path("models", "stories260K")
    result = run(
        "eval", "ruler", "-m", stories, "--tasks", "multikey,vartrack", "--lengths", "450,900", "--depths", "0.5",
        "-k", "1", "-n", "6", "--methods", "plain,selfextend,string", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "ruler" and data["methods"] == ["plain", "selfextend", "string"] and data["seed"] == 0
    assert list(data["tasks"]) == ["multikey", "vartrack"] and set(data["accuracy"]) == {"multikey", "vartrack"}
    for entry in data["tasks"].values():
        assert [r["length"] for r in entry["results"]] == [450, 900]
        assert set(entry["accuracy"]) == {"plain", "selfextend", "string"}
        assert all(set(r["outputs"]) == {"plain", "selfextend", "string"} for r in entry["results"])
    bad = run("eval", "ruler", "-m", stories, "--tasks", "single,nope", "--lengths", "300")
    assert bad.exit_code != 0 and bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "nope" in bad.stderr
    saved = tmp_path / "ruler.json"
    saved.write_text(result.stdout)
    table = run("eval", "compare", saved)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0] == "model: stories260K" and [line for line in lines if line.endswith(":")] == [
        "multikey:",
        "vartrack:",
    ]
    assert (
        lines[2].split() == ["length", "depth", "plain", "selfextend", "string"] and table.stdout.count("accuracy") == 2
    )
    plot = tmp_path / "ruler.png"
    drawn = run("eval", "compare", saved, "--plot", plot)
    assert drawn.exit_code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", drawn.output


def ruler_run(model: str, cells: dict) -> dict:
    """A ruler result as `eval ruler --json` writes it; cells: task -> {(length, depth): {mode: correct}}."""
    tasks = {}
    for task, grid in cells.items():
        rows = [{"length": n, "depth": d, "trials": 2, "correct": dict(c)} for (n, d), c in grid.items()]
        tasks[task] = {"results": rows}
    return {"task": "ruler", "model": model, "tasks": tasks}


def test_ruler_runs_compare_per_task_and_pool_by_length():
    from selfextend_mlx.evaluation.results import accuracy_by_length, compare_results, comparison_table

    single = {(1024, 0.0): {"plain": 2, "selfextend": 2}, (1024, 1.0): {"plain": 0, "selfextend": 1}}
    first = ruler_run("a", {"single": single, "vartrack": {(1024, 0.0): {"plain": 1, "selfextend": 2}}})
    second = ruler_run("b", {"single": {(2048, 0.0): {"plain": 0, "selfextend": 1}}})
    comparison = compare_results([first, second])
    assert list(comparison["tasks"]) == ["single", "vartrack"]
    assert set(comparison["tasks"]["single"]) == {"a plain", "a selfextend", "b plain", "b selfextend"}
    assert set(comparison["tasks"]["vartrack"]) == {"a plain", "a selfextend"}
    pooled = accuracy_by_length(comparison)
    assert pooled["a plain"] == {1024: (3, 6)} and pooled["a selfextend"] == {1024: (5, 6)}
    assert pooled["b selfextend"] == {2048: (1, 2)}
    table = comparison_table(comparison)
    assert table.startswith("single:") and "\n\nvartrack:" in table and "-" in table
