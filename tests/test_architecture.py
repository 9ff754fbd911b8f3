"""The package's shape: layers import only downwards, no import cycles, a light --help."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "selfextend_mlx"

# What each part may import from the package (besides itself). The CLI may import anything.
ALLOWED = {
    "defaults": set(),
    "errors": set(),
    "core": {"defaults", "errors"},
    "planning": {"defaults", "errors", "core"},
    "loading": {"defaults", "errors", "core", "planning"},
    "app": {"defaults", "errors", "core", "planning", "loading"},
    "evaluation": {"defaults", "errors", "core", "planning", "loading", "app"},
    "server": {"defaults", "errors", "core", "planning", "loading", "app"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set) -> set:
    """Every selfextend_mlx module `path` imports, at any depth of the code (function-level
    imports count: hiding a cycle inside a function is still a cycle)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def test_no_import_cycles():
    edges = graph()
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_each_layer_imports_only_the_layers_below():
    wrong = []
    for module, targets in graph().items():
        layer = part(module)
        if layer not in ALLOWED:
            continue  # the package __init__ (lazy re-exports)
        for target in targets:
            if part(target) != layer and part(target) not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_every_folder_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) <= 4, init


def test_help_imports_neither_mlx_lm_nor_transformers():
    code = (
        "import sys\n"
        "from selfextend_cli.main import app\n"
        "try:\n"
        "    app(['--help'], prog_name='selfextend')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'mlx_lm', 'transformers', 'mlx', 'huggingface_hub'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "Usage: selfextend" in done.stdout, done.stderr
    assert "HEAVY []" in done.stdout


def test_public_api_is_importable_lazily():
    code = (
        "import sys, selfextend_mlx\n"
        "assert 'mlx_lm' not in sys.modules\n"
        "from selfextend_mlx import load, apply_selfextend, make_cache, SelfExtendConfig, save_cache, load_cache\n"
        "print('OK', callable(load) and callable(make_cache) and SelfExtendConfig(2, 4).shift)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "OK 2", done.stderr


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand (the CLI's folder is mapped to another name):
    a new folder left out would be missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(init) for init in PACKAGE.rglob("__init__.py")} | {"selfextend_cli"}
    assert listed == found


# -- one turn runner, one home for each default -------------------------------------------------

TURN_RUNNER = "selfextend_mlx.app.turns"
# Who may call the prefill loop and the generator directly: the runner, and the measurements
# that score logits themselves (perplexity, the benchmark, the selftest).
PREFILL_CALLERS = {
    TURN_RUNNER,
    "selfextend_mlx.evaluation.perplexity",
    "selfextend_mlx.evaluation.bench",
    "selfextend_mlx.evaluation.common",
    "selfextend_mlx.evaluation.selftest",
}
GENERATION_CALLERS = {TURN_RUNNER}


def callers_of(function: str, module: str) -> set:
    """Modules of the package and the CLI that import `function` from `module`."""
    found = set()
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith(module.rsplit(".", 1)[-1]):
                if any(alias.name == function for alias in node.names):
                    found.add(module_name(path) if PACKAGE in path.parents else f"cli.{path.stem}")
    return found


def test_the_server_and_the_cli_prefill_and_generate_only_through_the_turn_runner():
    assert callers_of("prefill", "selfextend_mlx.core.prefill") <= PREFILL_CALLERS
    assert callers_of("stream_answer", "selfextend_mlx.app.generation") <= GENERATION_CALLERS
    for face in ("selfextend_mlx.app.session", "selfextend_mlx.server.engine", "selfextend_mlx.evaluation.retrieval"):
        assert TURN_RUNNER in graph()[face], face


def test_the_shared_defaults_are_written_once():
    """The prefill step, the answer budget and attention's chunk are 512 in defaults.py and
    nowhere else as a default (a parameter default names the constant)."""
    offenders = []
    for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "cli").glob("*.py")):
        if path.name == "defaults.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            defaults = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
                names = [a.arg for a in node.args.args[len(node.args.args) - len(node.args.defaults) :]]
                names += [a.arg for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                pairs = zip(names, defaults)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                pairs = [(node.target.id, node.value)]
            else:
                continue
            for name, value in pairs:
                watched = any(word in name for word in ("prefill_step", "max_tokens", "chunk_size", "step"))
                if watched and isinstance(value, ast.Constant) and value.value == 512:
                    offenders.append(f"{path.relative_to(ROOT)}:{value.lineno} {name}")
    assert not offenders, offenders
