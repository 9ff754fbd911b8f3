"""Use OpenBLAS on Linux CPUs: the mlx[cpu] wheel's reference BLAS is about 25x slower.

MLX binds BLAS when it is loaded, so the only way in is LD_PRELOAD before the process
starts: entry points call `reexec_with_openblas()` first thing.
"""

import os
import sys
from pathlib import Path

OPT_OUT = "SELFEXTEND_NO_OPENBLAS"
_REEXECED = "_SELFEXTEND_OPENBLAS_TRIED"
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


def find_openblas():
    for candidate in _CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def loaded_blas() -> str:
    """Which BLAS this process runs on: 'openblas', 'accelerate' or 'reference'."""
    if sys.platform == "darwin":
        return "accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "openblas" if "openblas" in maps else "reference"


def reexec_with_openblas() -> None:
    """Restart this process with OpenBLAS preloaded, when it is installed and not yet used."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) or os.environ.get(_REEXECED):
        return
    library = find_openblas()
    preload = os.environ.get("LD_PRELOAD", "")
    if library is None or library in preload.split(":"):
        return
    os.environ["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    os.environ[_REEXECED] = "1"  # never loop, even if the preload is refused
    os.execv(sys.executable, [sys.executable, *sys.argv])
