"""JSON-ready results, their text tables, and reading them back to compare runs."""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from ..errors import EvaluationError
from .common import SELFEXTEND, Mode
from .retrieval import Cell, accuracy

TASKS = ("ppl", "passkey", "needle", "ruler")  # what `eval compare` reads


def _number(value: float) -> Optional[float]:
    """JSON has no NaN/inf: an empty or overflowing bucket is null."""
    return round(value, 4) if math.isfinite(value) else None


def run_header(
    task: str,
    model_id: str,
    modes: Sequence[Mode],
    kv_bits: Optional[int],
    trained_context: Optional[int],
    tokens: Optional[int] = None,
) -> dict:
    """What a run was: `settings` is "planned" when SelfExtend's G and W were chosen per
    length as the product does (each row then says which), else "given" (-G/-W)."""
    planned = any(m.planned for m in modes)
    config = next((c for c in (m.config_for(tokens or 0) for m in modes if m.name == SELFEXTEND) if c), None)
    if planned and tokens is None:
        config = None  # one per length: the rows say
    return {
        "task": task,
        "model": model_id,
        "mode": "compare" if len(modes) > 1 else modes[0].name,
        "settings": "planned" if planned else "given",
        "group_size": config.group_size if config else None,
        "window": config.window if config else None,
        "kv_bits": kv_bits,
        "trained_context": trained_context,
        "methods": [m.name for m in modes],
    }


def ppl_result(header: dict, tokens: int, per_mode: dict) -> dict:
    """per_mode: mode name -> list[Bucket] over the same ranges."""
    names = list(per_mode)
    rows = []
    for parts in zip(*per_mode.values()):
        row = {"start": parts[0].start, "end": parts[0].end, "targets": parts[0].count}
        if len(names) == 1:
            row["ppl"] = _number(parts[0].ppl)
        else:
            for name, bucket in zip(names, parts):
                row[f"ppl_{name}"] = _number(bucket.ppl)
        rows.append(row)
    return {**header, "tokens": tokens, "buckets": rows}


def retrieval_result(header: dict, cells: Sequence[Cell], mode_names: Sequence[str], **settings) -> dict:
    compare = len(mode_names) > 1
    rows = []
    for cell in cells:
        row = {"length": cell.length, "depth": cell.depth, "tokens": cell.tokens, "trials": cell.trials}
        row["correct"] = dict(cell.correct) if compare else cell.correct[mode_names[0]]
        row["outputs"] = dict(cell.outputs) if compare else cell.outputs[mode_names[0]]
        if cell.settings:
            group = {name: cell.settings[name][0] for name in mode_names}
            window = {name: cell.settings[name][1] for name in mode_names}
            row["group_size"] = group if compare else group[mode_names[0]]
            row["window"] = window if compare else window[mode_names[0]]
        if cell.setups:
            row["setups"] = {name: cell.setups[name].describe() for name in mode_names}
        rows.append(row)
    overall = {name: _number(accuracy(cells, name)) for name in mode_names}
    return {**header, **settings, "results": rows, "accuracy": overall if compare else overall[mode_names[0]]}


def ruler_result(header: dict, by_task: dict, mode_names: Sequence[str], **settings) -> dict:
    """by_task: task name -> its cells. Each task's rows and accuracy as retrieval_result's;
    `accuracy`: task -> its accuracy."""
    tasks = {name: retrieval_result({}, cells, mode_names) for name, cells in by_task.items()}
    accuracy = {name: entry["accuracy"] for name, entry in tasks.items()}
    return {**header, **settings, "tasks": tasks, "accuracy": accuracy}


def ppl_series(result: dict) -> dict:
    """Mode name -> buckets with a plain 'ppl' key, whichever shape the result has."""
    buckets = result["buckets"]
    if "ppl" in buckets[0]:
        return {result["mode"]: buckets}
    names = [key[len("ppl_") :] for key in buckets[0] if key.startswith("ppl_")]
    keep = ("start", "end", "targets")
    return {name: [{**{k: b[k] for k in keep if k in b}, "ppl": b[f"ppl_{name}"]} for b in buckets] for name in names}


def retrieval_series(result: dict) -> dict:
    """Mode name -> {(length, depth): (correct, trials)}."""
    rows = result["results"]
    if isinstance(rows[0]["correct"], dict):
        names = list(rows[0]["correct"])
        return {n: {(r["length"], r["depth"]): (r["correct"][n], r["trials"]) for r in rows} for n in names}
    return {result["mode"]: {(r["length"], r["depth"]): (r["correct"], r["trials"]) for r in rows}}


def grid_panel(cells: dict) -> dict:
    """{(length, depth): (correct, trials)} -> the rows plots.plot_accuracy_grid draws."""
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    return {
        "lengths": lengths,
        "depths": depths,
        "correct": [[cells.get((n, d), (0, 0))[0] for n in lengths] for d in depths],
        "trials": [[cells.get((n, d), (0, 0))[1] for n in lengths] for d in depths],
    }


def _format_ppl(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _accuracy_text(cells: dict) -> str:
    """Counts with the share: columns of joined runs can cover different cells, and a bare
    percentage would hide that one column's 50% is of 4 cells and another's 100% of 3."""
    correct = sum(c for c, _ in cells.values())
    trials = sum(t for _, t in cells.values())
    return f"{correct}/{trials} {correct / trials:.0%}" if trials else "-"


def load_result(path) -> dict:
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"no such result file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvaluationError(f"{path} is not a JSON result of 'selfextend eval' ({error})") from None
    if not isinstance(result, dict) or result.get("task") not in TASKS:
        raise EvaluationError(f"{path} is not a JSON result of 'selfextend eval {'/'.join(TASKS)} --json'")
    return result


def mode_label(result: dict, mode: str) -> str:
    if mode == SELFEXTEND and result.get("group_size"):
        return f"{mode} G{result['group_size']}/W{result['window']}"
    return mode


def series_labels(result: dict, series: dict) -> dict:
    """Mode names -> readable labels (SelfExtend with its G and W), for plots."""
    return {mode_label(result, mode): values for mode, values in series.items()}


def run_label(result: dict, mode: str) -> str:
    name = Path(str(result.get("model") or "model")).name
    kv = f" kv{result['kv_bits']}" if result.get("kv_bits") else ""
    return f"{name}{kv} {mode_label(result, mode)}"


def shared_model(labels: Sequence[str]) -> tuple:
    """(the model name every label starts with or None, the labels without it): "SmolLM2 plain",
    "SmolLM2 yarn" -> ("SmolLM2", ["plain", "yarn"]), so tables and legends of methods read at a glance."""
    labels = list(labels)
    heads = {label.split(" ", 1)[0] for label in labels}  # run_label puts the model's name first
    if len(labels) < 2 or len(heads) != 1 or not all(" " in label for label in labels):
        return None, labels
    head = heads.pop()
    return head, [label[len(head) + 1 :] for label in labels]


def compare_results(results: Sequence[dict]) -> dict:
    """Several runs of one task side by side: a column per (run, mode); for ruler, that for
    each of its tasks (`tasks`: task name -> columns)."""
    tasks = {r["task"] for r in results}
    if len(tasks) != 1:
        raise EvaluationError(f"can only compare results of one task, got {sorted(tasks)}")
    task = tasks.pop()
    if task == "ruler":
        names = list(dict.fromkeys(name for r in results for name in r["tasks"]))
        by_task = {name: [{**r, **r["tasks"][name]} for r in results if name in r["tasks"]] for name in names}
        return {"task": task, "tasks": {name: _columns(runs, task) for name, runs in by_task.items()}}
    return {"task": task, "columns": _columns(results, task)}


def pooled_by_length(cells: Mapping) -> dict:
    """{(length, depth): (correct, trials)} -> {length: (correct, trials)}, depths pooled."""
    pooled: dict = {}
    for (length, _), (correct, trials) in cells.items():
        done, tried = pooled.get(length, (0, 0))
        pooled[length] = (done + correct, tried + trials)
    return dict(sorted(pooled.items()))


def accuracy_by_length(comparison: dict) -> dict:
    """Column label -> {length: (correct, trials)}, every depth (and, for ruler, every task) pooled."""
    tables = comparison["tasks"].values() if comparison["task"] == "ruler" else [comparison["columns"]]
    series: dict = {}
    for columns in tables:
        for label, cells in columns.items():
            total = series.setdefault(label, {})
            for length, (correct, trials) in pooled_by_length(cells).items():
                done, tried = total.get(length, (0, 0))
                total[length] = (done + correct, tried + trials)
    return {label: dict(sorted(by.items())) for label, by in series.items()}


def _columns(results: Sequence[dict], task: str) -> dict:
    columns = {}
    for result in results:
        series = ppl_series(result) if task == "ppl" else retrieval_series(result)
        for mode, values in series.items():
            label = run_label(result, mode)
            if columns.get(label) == values:  # the same measurement twice (e.g. each run's plain baseline)
                continue
            if task != "ppl" and label in columns and not columns[label].keys() & values.keys():
                columns[label] = {**columns[label], **values}  # one setting run in parts (e.g. 16k apart)
                continue
            while label in columns:  # two runs that look alike but differ still get their own column
                label += "'"
            columns[label] = values
    return columns


def comparison_table(comparison: dict) -> str:
    """The side-by-side table; a model name common to every column is said once, above it."""
    tables = comparison["tasks"].values() if comparison["task"] == "ruler" else [comparison["columns"]]
    head, _ = shared_model([label for columns in tables for label in columns])
    title = f"model: {head}\n" if head else ""
    return title + _table(comparison, lambda label: label[len(head) + 1 :] if head else label)


def _table(comparison: dict, short) -> str:
    if comparison["task"] == "ruler":
        return "\n\n".join(
            f"{name}:\n{_retrieval_table({short(k): v for k, v in columns.items()})}"
            for name, columns in comparison["tasks"].items()
        )
    columns = {short(label): values for label, values in comparison["columns"].items()}
    if comparison["task"] == "ppl":
        ranges = []
        for buckets in columns.values():
            for b in buckets:
                if (b["start"], b["end"]) not in ranges:
                    ranges.append((b["start"], b["end"]))
        lookup = {label: {(b["start"], b["end"]): b["ppl"] for b in buckets} for label, buckets in columns.items()}
        rows = [[f"{s}-{e}"] + [_format_ppl(lookup[label].get((s, e))) for label in columns] for s, e in ranges]
        return format_table(["positions"] + list(columns), rows)
    return _retrieval_table(columns)


def _retrieval_table(columns: dict) -> str:
    keys = []
    for cells in columns.values():
        keys += [k for k in cells if k not in keys]
    rows = [[str(n), f"{d:g}"] + [_cell_text(cells.get((n, d))) for cells in columns.values()] for n, d in keys]
    rows.append(["accuracy", ""] + [_accuracy_text(cells) for cells in columns.values()])
    return format_table(["length", "depth"] + list(columns), rows)


def _cell_text(value) -> str:
    return "-" if value is None else f"{value[0]}/{value[1]}"
