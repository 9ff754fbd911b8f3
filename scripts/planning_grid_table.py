"""A markdown table of the planning grid: plain vs the automatic settings, a row per task and
length, from the pieces scripts/eval_planning_grid.sh writes (PIECE_plain.json and PIECE_auto.json,
or PIECE_compare.json; a length run as several pieces of depths, passkey_16k_1-0.75-0.5 and
passkey_16k_0.25-0, makes one row).

Usage: python scripts/planning_grid_table.py [FOLDER]   (default docs/results/planning)
"""

import json
import sys
from pathlib import Path


def cells(path: Path, mode=None) -> dict:
    """(length, depth) -> {correct, trials, tokens, group_size, window} of one mode."""
    rows = json.loads(path.read_text())["results"]
    pick = (lambda row, key: row[key][mode]) if mode else (lambda row, key: row.get(key))
    return {
        (row["length"], row["depth"]): {
            "correct": pick(row, "correct"),
            "trials": row["trials"],
            "tokens": row["tokens"],
            "group_size": pick(row, "group_size"),
            "window": pick(row, "window"),
        }
        for row in rows
    }


def settings(row: dict) -> str:
    group_size = row.get("group_size")
    return "plain (G=1)" if group_size in (None, 1) else f"G={group_size} W={row['window']}"


def pieces(folder: Path) -> dict:
    """row name -> (plain cells, auto cells), from _plain/_auto pairs or _compare runs."""
    found = {}

    def add(path: Path, plain: dict, auto: dict) -> None:
        row = _row_name(path.name.rsplit("_", 1)[0])
        old_plain, old_auto = found.get(row, ({}, {}))
        found[row] = ({**old_plain, **plain}, {**old_auto, **auto})

    for path in folder.glob("*_auto.json"):
        add(path, {}, cells(path))
    for path in folder.glob("*_plain.json"):
        add(path, cells(path), {})
    for path in folder.glob("*_compare.json"):
        add(path, cells(path, "plain"), cells(path, "selfextend"))
    return found


def _row_name(piece: str) -> str:
    """The piece's name up to its length: passkey_16k_0.25-0 -> passkey_16k."""
    parts = piece.split("_")
    length_at = next(i for i, part in enumerate(parts) if part[:-1].isdigit() and part.endswith("k"))
    return "_".join(parts[: length_at + 1])


def table(folder: Path) -> str:
    """One row a task and length: each mode's correct/trials summed over the depths it ran, then
    per depth in order ("-" where a mode has not run that depth yet)."""
    lines = [
        "| piece | length (prompt tokens) | depths | plain | auto | auto ran |",
        "|---|---|---|---|---|---|",
    ]
    for piece, (plain, auto) in sorted(pieces(folder).items(), key=lambda item: _order(item[0])):
        either = {**plain, **auto}
        keys = sorted(either, key=lambda key: -key[1])  # deepest first, as the pieces run
        plain_cell, auto_cell = _score(plain, keys), _score(auto, keys)
        complete = all(key in plain and key in auto for key in keys)
        mark = "**" if complete and plain_cell != auto_cell else ""
        tokens = sorted({either[key]["tokens"] for key in keys})
        span = f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}-{tokens[-1]:,}"
        ran = sorted({settings(auto[key]) for key in keys if key in auto}) or ["-"]
        lines.append(
            f"| {piece} | {keys[0][0]:,} ({span}) "
            f"| {', '.join(str(key[1]) for key in keys)} | {mark}{plain_cell}{mark} | {mark}{auto_cell}{mark} "
            f"| {', '.join(ran)} |"
        )
    return "\n".join(lines)


def _score(cells_of_mode: dict, keys: list) -> str:
    if not cells_of_mode:
        return "not run"
    ran = [cells_of_mode[key] for key in keys if key in cells_of_mode]
    per_depth = [str(cells_of_mode[key]["correct"]) if key in cells_of_mode else "-" for key in keys]
    correct, trials = sum(cell["correct"] for cell in ran), sum(cell["trials"] for cell in ran)
    return f"{correct}/{trials} ({' '.join(per_depth)})"


def _order(piece: str):
    task, *rest = piece.split("_")
    length = int(rest[-1].removesuffix("k"))
    return (task, rest[:-1], length)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/planning")))
