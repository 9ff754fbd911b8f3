"""README's model table is what planning and the registry say (scripts/model_table.py prints it)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_table_of_models_is_planning_s():
    printed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "model_table.py")], capture_output=True, text=True, check=True
    ).stdout
    assert printed.count("\n") >= 4 and printed in (ROOT / "README.md").read_text(encoding="utf-8")
