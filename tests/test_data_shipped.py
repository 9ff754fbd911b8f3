"""A fresh clone runs every test: each file a test asks shared_path() for ships in tests/data."""

import ast
from pathlib import Path

from conftest import DATA

HERE = Path(__file__).resolve().parent


def requested_paths() -> set:
    """The literal paths the tests pass to shared_path()."""
    found = set()
    for path in HERE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "shared_path":
                parts = [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
                if parts and len(parts) == len(node.args):
                    found.add(tuple(parts))
    return found


def test_every_file_the_tests_ask_for_ships_with_them():
    requested = requested_paths()
    assert ("models", "stories260K") in requested  # the scan sees the calls
    missing = sorted("/".join(parts) for parts in requested if not DATA.joinpath(*parts).exists())
    assert not missing, f"not in tests/data: {missing}"


def test_the_shipped_data_says_where_it_comes_from():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for entry in sorted(DATA.iterdir()):
        for item in sorted(entry.iterdir()) if entry.is_dir() else []:
            assert item.name in readme, f"tests/data/README.md does not name {entry.name}/{item.name}"
