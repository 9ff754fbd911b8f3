"""Use OpenBLAS on Linux CPUs: the mlx[cpu] wheel's reference BLAS is about 25x slower.

MLX binds BLAS when it is loaded, so the only way in is LD_PRELOAD before the process
starts: entry points call `reexec_with_openblas()` first thing.
"""

import ctypes
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


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _global_sgemm_library():
    """The file that provides `cblas_sgemm` in the global symbol scope, or None.

    libmlx looks its BLAS symbols up there first (LD_PRELOAD, then its own bundled
    reference BLAS), so this is the BLAS MLX really calls. Scanning /proc/self/maps is not
    enough: numpy's bundled scipy-openblas is mapped too but exports prefixed names.
    """
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(process.cblas_sgemm, ctypes.c_void_p)
        info = _DlInfo()
        if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
        return os.path.realpath(info.dli_fname.decode())
    except (OSError, AttributeError):
        return None


def loaded_blas() -> str:
    """Which BLAS MLX runs on: 'openblas', 'accelerate', 'reference' or another library's name."""
    if sys.platform == "darwin":
        return "accelerate"
    if not sys.platform.startswith("linux"):
        return "unknown"
    library = _global_sgemm_library()
    if library is None:
        return "reference"  # the mlx[cpu] wheel's bundled netlib BLAS
    name = Path(library).name
    return "openblas" if "openblas" in library.lower() else name


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
    # orig_argv keeps `-m module` and interpreter flags; argv alone would turn `python -m cli`
    # into running cli/__main__.py as a script
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
