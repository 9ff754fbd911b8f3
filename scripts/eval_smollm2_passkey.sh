#!/usr/bin/env bash
# SmolLM2-135M-Instruct passkey retrieval (the paper's format), 2k-16k tokens, plain vs SelfExtend
# (G=8, W=1024 at every length), one random key per length and depth (seed 0); depths 0.25 and 0.75
# were added for SelfExtend at 16k only (time ran out for the rest).
# One 16k-token prefill took over half an hour on this 2-core shared CPU, so the runs are split: each
# file keeps what it finished if a later run is interrupted, and `eval compare` joins them into
# one table and heatmap. These are the runs behind docs/results.md, in the order they were made.
set -euo pipefail
cd "$(dirname "$0")/.."
run() {  # run NAME LENGTHS DEPTHS FLAGS...
  local name=$1 lengths=$2 depths=$3; shift 3
  nice python -m cli eval passkey --lengths "$lengths" --depths "$depths" --trials 1 --seed 0 \
    "$@" --json --progress > "docs/results/smollm2_passkey_$name.json"
}
SE=(-G 8 -W 1024)
run 16k_selfextend 16k 0.5 "${SE[@]}"
run 16k_plain 16k 0.5 --plain
run 2k-8k 2k,4k,8k 0.5 "${SE[@]}" --compare
run 16k_selfextend_more_depths 16k 0.25,0.75 "${SE[@]}"
python -m cli eval compare docs/results/smollm2_passkey_*.json --plot docs/img/smollm2_passkey.png
