"""A markdown table of the planning grid: plain vs the automatic settings, a row per piece, from the
pieces scripts/eval_planning_grid.sh writes (PIECE_plain.json and PIECE_auto.json).

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
    """piece name -> (plain cells, auto cells), from a _plain/_auto pair or one _compare run."""
    found = {}
    for path in folder.glob("*_auto.json"):
        piece = path.name.removesuffix("_auto.json")
        plain = path.with_name(f"{piece}_plain.json")
        found[piece] = (cells(plain) if plain.exists() else {}, cells(path))
    for path in folder.glob("*_compare.json"):
        found[path.name.removesuffix("_compare.json")] = (cells(path, "plain"), cells(path, "selfextend"))
    return found


def table(folder: Path) -> str:
    """One row a piece: each mode's correct/trials summed over depths, then per depth in order."""
    lines = [
        "| piece | length (prompt tokens) | depths | plain | auto | auto ran |",
        "|---|---|---|---|---|---|",
    ]
    for piece, (plain, auto) in sorted(pieces(folder).items(), key=lambda item: _order(item[0])):
        keys = list(auto)
        plain_cell = _score(plain, keys) if all(key in plain for key in keys) else "not run"
        auto_cell = _score(auto, keys)
        mark = "**" if plain_cell not in ("not run", auto_cell) else ""
        tokens = sorted({auto[key]["tokens"] for key in keys})
        span = f"{tokens[0]:,}" if len(tokens) == 1 else f"{tokens[0]:,}-{tokens[-1]:,}"
        ran = sorted({settings(auto[key]) for key in keys})
        lines.append(
            f"| {piece} | {keys[0][0]:,} ({span}) "
            f"| {', '.join(str(key[1]) for key in keys)} | {mark}{plain_cell}{mark} | {mark}{auto_cell}{mark} "
            f"| {', '.join(ran)} |"
        )
    return "\n".join(lines)


def _score(cells_of_mode: dict, keys: list) -> str:
    correct = [cells_of_mode[key]["correct"] for key in keys]
    trials = [cells_of_mode[key]["trials"] for key in keys]
    return f"{sum(correct)}/{sum(trials)} ({' '.join(map(str, correct))})"


def _order(piece: str):
    task, *rest = piece.split("_")
    length = int(rest[-1].removesuffix("k"))
    return (task, rest[:-1], length)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/planning")))
