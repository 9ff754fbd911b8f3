import os
from pathlib import Path

import pytest

from selfextend_mlx.loading.blas import reexec_with_openblas

SHARED = Path(os.environ.get("SELFEXTEND_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()


def pytest_configure(config):
    # Real-model tests are 25x faster on OpenBLAS than on the wheel's reference BLAS.
    reexec_with_openblas()


def shared_path(*parts) -> Path:
    """A file under ../shared, or a skip that says it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not there (../shared is absent); this test needs it")
    return path


@pytest.fixture
def stories_dir():
    return shared_path("models", "stories260K")
