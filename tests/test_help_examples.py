"""Every --help page teaches with an example, and every example runs as written from the
repository's root (on the default model, with the documents in docs/examples/), shortened only
where the full run would take minutes: smaller lengths and answers, one trial."""

import shlex
import subprocess
from pathlib import Path

import pytest
from cli_support import load_each_model_once  # noqa: F401 (autouse: one load of each model here too)
from typer.main import get_command
from typer.testing import CliRunner

from selfextend_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Examples that start something that runs until it is stopped: their page is checked, not run.
NOT_RUN = {
    ("serve",): "starts a server that runs until stopped; tests/test_server*.py run it",
    ("pull",): "downloads from the Hub, which tests cannot reach; tests/test_models_cli.py runs its failure",
}
ANSWERING = {"ask", "summarize", "chat", "generate"}


def pages(command=None, path=()):
    """(path, help text) for the root and every group and command below it."""
    command = command or get_command(app)
    yield path, runner.invoke(app, [*path, "--help"]).stdout
    for name, sub in getattr(command, "commands", {}).items():
        yield from pages(sub, (*path, name))


PAGES = list(pages())


def examples(help_text: str) -> list:
    """The command lines under a page's `Example:` / `Examples:` heading."""
    found, inside, pending = [], False, ""
    for line in help_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("Example") and stripped.endswith(":"):
            inside = True
            continue
        if inside and line and not line.startswith(" "):  # the next section
            inside = False
        if not inside or not stripped:
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.startswith("selfextend ") or "| selfextend " in pending:
            found.append(pending)
        pending = ""
    return found


def test_every_page_has_an_example():
    assert len(PAGES) >= 17
    missing = [" ".join(("selfextend", *path)) for path, text in PAGES if not examples(text)]
    assert not missing, f"--help pages without a runnable example: {missing}"


def test_usage_lines_name_arguments_plainly():
    for path, text in PAGES:
        usage = text.splitlines()[0]
        assert "{" not in usage and "<list" not in text, (path, usage)


def _set(args: list, names: tuple, value: str, add: bool = False) -> list:
    out, i, seen = [], 0, False
    while i < len(args):
        if args[i] in names:
            out += [args[i], value]
            seen = True
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out + ([names[0], value] if add and not seen else [])


def shorten(args: list) -> list:
    """The same command, small enough for a test: the cuts are listed here, nothing else changes."""
    words = [a for a in args if not a.startswith("-")]
    command = tuple(words[:2]) if words[:1] == ["eval"] else tuple(words[:1])
    if command[0] in ANSWERING:
        args = _set(args, ("-n", "--max-tokens"), "4", add=True)
    elif command in (("eval", "passkey"), ("eval", "needle")):
        args = _set(args, ("--lengths",), "300")
        args = _set(args, ("-n", "--max-tokens"), "4")
        args = _set(args, ("--trials", "-k"), "1")
    elif command == ("eval", "ppl"):
        args = _set(_set(args, ("--tokens",), "300"), ("--buckets",), "128")
    elif command == ("bench",):
        args = _set(_set(args, ("-l", "--lengths"), "256", add=True), ("--decode-steps",), "1", add=True)
        args = _set(args, ("-W", "--window"), "128", add=True)
    elif command == ("selftest",):
        args = _set(args, ("--keys",), "512")
    return args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder where examples may write their files, with the repository's docs/ in it."""
    folder = tmp_path_factory.mktemp("examples")
    (folder / "docs").symlink_to(ROOT / "docs")
    return folder


@pytest.fixture(autouse=True)
def examples_cache(monkeypatch, tmp_path_factory):
    """One document cache the examples share (`cache rm` needs an entry that an earlier one made)."""
    monkeypatch.setenv("SELFEXTEND_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "examples-cache"))


def _cache_id() -> str:
    import json

    entries = json.loads(runner.invoke(app, ["cache", "list", "--json"]).stdout)["entries"]
    if not entries:  # `cache clear` ran before: make one
        runner.invoke(app, ["ask", "docs/examples/bakery.md", "-q", "Who?", "-n", "1", "--quiet"])
        entries = json.loads(runner.invoke(app, ["cache", "list", "--json"]).stdout)["entries"]
    return entries[0]["id"]


def run_example(line: str, folder: Path):
    """Run one example line: the part before a pipe in the shell, `selfextend ...` in process
    (so the model loads once), `> FILE` written in `folder`."""
    tokens = shlex.split(line)
    stdin = None
    if "|" in tokens:
        cut = len(tokens) - 1 - tokens[::-1].index("|")
        feed = subprocess.run(shlex.join(tokens[:cut]), shell=True, cwd=folder, capture_output=True, check=True)
        stdin, tokens = feed.stdout, tokens[cut + 1 :]
    target = None
    if ">" in tokens:
        at = tokens.index(">")
        target, tokens = folder / tokens[at + 1], tokens[:at]
    assert tokens[0] == "selfextend", line
    args = shorten(tokens[1:])
    if args[:2] == ["cache", "rm"]:  # an id from the cache as it is now, not the page's sample id
        args = ["cache", "rm", _cache_id(), *args[3:]]
    result = runner.invoke(app, args, input=stdin if stdin is not None else "")
    if target is not None:
        target.write_text(result.stdout)
    return args, result


RUNNABLE = [(path, line) for path, text in PAGES for line in examples(text) if path not in NOT_RUN]


@pytest.mark.slow
def test_every_example_runs_as_written(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    failures = []
    for _path, line in RUNNABLE:
        args, result = run_example(line, workdir)
        if result.exit_code != 0 or "Traceback" in result.output:
            failures.append(
                f"{line}\n  ran as: selfextend {shlex.join(args)}\n  exit {result.exit_code}: "
                f"{result.stderr.strip()[-400:]}"
            )
    assert not failures, "\n".join(failures)
    assert len(RUNNABLE) >= 25
