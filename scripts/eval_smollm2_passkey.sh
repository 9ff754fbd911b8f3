#!/usr/bin/env bash
# SmolLM2-135M-Instruct passkey retrieval (the paper's format), 2k-16k tokens, plain vs SelfExtend,
# one random key per length and depth (CPU time: about an hour on 2 shared cores). The 16k row runs
# on its own so the shorter ones are kept if it is interrupted.
# Writes docs/results/smollm2_passkey_*.json and docs/img/smollm2_passkey.png.
set -euo pipefail
cd "$(dirname "$0")/.."
for lengths in ${LENGTH_SETS:-2k,4k,8k 16k}; do
  name=${lengths//,/_}
  nice python -m cli eval passkey --lengths "$lengths" --depths 0,0.25,0.5,0.75,1 --trials "${TRIALS:-1}" --seed 0 \
    --compare --json --progress > "docs/results/smollm2_passkey_$name.json"
done
python -m cli eval compare docs/results/smollm2_passkey_*.json --plot docs/img/smollm2_passkey.png
