"""setup.sh checks what it needs before it changes anything, and says so in one line."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_python(tmp_path: Path, version: str, has_venv: bool) -> Path:
    """A stand-in interpreter: reports `version`, passes or fails the checks setup.sh makes."""
    major, minor = (int(part) for part in version.split(".")[:2])
    old = (major, minor) < (3, 11)
    script = tmp_path / "python"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -V ]; then echo "Python {version}"; exit 0; fi\n'
        'case "$2" in\n'
        f"  *version_info*) exit {1 if old else 0} ;;\n"
        f"  *venv*) exit {0 if has_venv else 1} ;;\n"
        "esac\n"
        "echo 'setup.sh went past its checks' >&2; exit 3\n"
    )
    script.chmod(0o755)
    return script


def run_setup(python: Path):
    env = {**os.environ, "PYTHON": str(python)}
    return subprocess.run(["bash", str(ROOT / "setup.sh")], capture_output=True, text=True, env=env, timeout=60)


def test_an_old_python_is_refused_before_anything_is_made(tmp_path):
    done = run_setup(fake_python(tmp_path, "3.9.18", has_venv=True))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "setup: error: Python 3.9.18 is too old: selfextend-mlx needs Python 3.11 or newer (set PYTHON=python3.12 ...)"
    )
    assert "went past" not in done.stderr


def test_a_python_without_venv_is_refused_with_the_package_to_install(tmp_path):
    done = run_setup(fake_python(tmp_path, "3.12.1", has_venv=False))
    assert done.returncode == 1 and "no venv module" in done.stderr and "python3-venv" in done.stderr


def test_a_missing_python_is_one_line(tmp_path):
    done = run_setup(tmp_path / "no-such-python")
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "not found" in done.stderr
