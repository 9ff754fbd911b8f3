#!/usr/bin/env bash
# SmolLM2-135M-Instruct passkey retrieval (the paper's format), 2k-16k tokens, plain vs SelfExtend.
# One 16k-token prefill takes about half an hour on this 2-core shared CPU, so the default is one key
# at depth 0.5 per length; DEPTHS and TRIALS widen it. 16k runs first, SelfExtend before plain, each
# in its own file, so an interrupted run keeps what it finished; `eval compare` joins them.
# Writes docs/results/smollm2_passkey_*.json and docs/img/smollm2_passkey.png.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTHS=${DEPTHS:-0.5}
TRIALS=${TRIALS:-1}
# The G rule picks G for the longest input: pin G/W so every length uses the same setting.
SE=(-G 8 -W 1024)
run() {  # run NAME LENGTHS FLAGS...
  local name=$1 lengths=$2; shift 2
  nice python -m cli eval passkey --lengths "$lengths" --depths "$DEPTHS" --trials "$TRIALS" --seed 0 \
    "$@" --json --progress > "docs/results/smollm2_passkey_$name.json"
}
run 16k_selfextend 16k "${SE[@]}"
run 16k_plain 16k --plain
run 2k-8k 2k,4k,8k "${SE[@]}" --compare
python -m cli eval compare docs/results/smollm2_passkey_*.json --plot docs/img/smollm2_passkey.png
