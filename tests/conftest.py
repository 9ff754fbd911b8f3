import os
import signal
from pathlib import Path

import pytest

from selfextend_mlx.loading.blas import reexec_with_openblas

# What the tests need ships with them (tests/data, its README gives sources and licences);
# ../shared only extends it.
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("SELFEXTEND_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


def pytest_configure(config):
    # Real-model tests are 25x faster on OpenBLAS than on the wheel's reference BLAS.
    reexec_with_openblas()
    # A test run started in the background (`cmd &` in a script) ignores SIGINT, and an ignored
    # signal stays ignored in every command a test starts: the Ctrl-C tests' command would then
    # run to its end instead of stopping. A handler (unlike SIG_IGN) is reset to the default by exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_path(*parts) -> Path:
    """A test data file: shipped in tests/data, else under ../shared, else a skip that says so."""
    for root in (DATA, SHARED):
        path = root.joinpath(*parts)
        if path.exists():
            return path
    pytest.skip(f"{'/'.join(parts)} is neither in tests/data nor in {SHARED}; this test needs it")


@pytest.fixture
def stories_dir():
    return shared_path("models", "stories260K")


@pytest.fixture(scope="module")
def stories():
    """(model, tokenizer) of stories260K, loaded plain once per test module (a module may
    define its own `stories`, as cli_support's path)."""
    from selfextend_mlx.loading.load import load

    return load(str(shared_path("models", "stories260K")), selfextend=False)


@pytest.fixture(scope="module")
def story():
    return shared_path("text", "tinystories_sample.txt").read_text()
