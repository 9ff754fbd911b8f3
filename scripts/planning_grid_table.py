"""Markdown tables of the planning grid: plain vs the automatic settings, per cell, from the
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
    lines = [
        "| piece | length (prompt tokens) | depth | plain | auto | auto ran |",
        "|---|---|---|---|---|---|",
    ]
    for piece, (plain, auto) in sorted(pieces(folder).items(), key=lambda item: _order(item[0])):
        for key, row in auto.items():
            theirs = plain.get(key)
            plain_cell = f"{theirs['correct']}/{theirs['trials']}" if theirs else "not run"
            auto_cell = f"{row['correct']}/{row['trials']}"
            mark = "**" if theirs and row["correct"] != theirs["correct"] else ""
            lines.append(
                f"| {piece} | {key[0]:,} ({row['tokens']:,}) | {key[1]} | {mark}{plain_cell}{mark} "
                f"| {mark}{auto_cell}{mark} | {settings(row)} |"
            )
    return "\n".join(lines)


def _order(piece: str):
    task, *rest = piece.split("_")
    length = int(rest[-1].removesuffix("k"))
    return (task, rest[:-1], length)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/planning")))
