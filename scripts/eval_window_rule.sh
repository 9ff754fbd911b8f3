#!/usr/bin/env bash
# The W rule (issue 16): the effect of the neighbor window on perplexity and passkey retrieval at
# 1.5x-4x the trained context, with G the smallest that covers the input for each W.
#   stories260K (L = 512): W = L/8, L/4, L/2 at 768, 1024, 1536, 2048 tokens (seconds per run)
#   SmolLM2 (effective context C = 5120): W = C/8, C/4, C/2 at 12k and 16k (perplexity on Emma)
#   and 16k (passkey, 3 depths x 1 key): half an hour to an hour per run on a 2-core CPU.
# Writes docs/results/window_rule/*.json; docs/results.md has the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-tests/data}  # the test data ships the same files as ../shared
OUT=docs/results/window_rule
ceil_g() { python3 -c "import math; L, W, N = $1, $2, $3; print(max(1, math.ceil((N - W) / (L - W))))"; }
for N in 768 1024 1536 2048; do
  for W in 64 128 256; do
    G=$(ceil_g 512 $W $N)
    nice python -m cli eval ppl --model "$SHARED/models/stories260K" --file "$SHARED/text/tinystories_sample.txt" \
      --tokens $N --buckets 512 -G $G -W $W --json > $OUT/stories_ppl_N${N}_W${W}.json
    nice python -m cli eval passkey --model "$SHARED/models/stories260K" --lengths $N --depths 1,0.75,0.5,0.25,0 \
      --trials 2 -G $G -W $W --json > $OUT/stories_passkey_N${N}_W${W}.json
  done
done
nice python -m cli eval ppl --model "$SHARED/models/stories260K" --file "$SHARED/text/tinystories_sample.txt" \
  --tokens 2048 --buckets 512,768,1024,1536 --plain --json > $OUT/stories_ppl_plain.json
nice python -m cli eval passkey --model "$SHARED/models/stories260K" --lengths 512,768,1024,1536,2048 \
  --depths 1,0.75,0.5,0.25,0 --trials 2 --plain --json > $OUT/stories_passkey_plain.json
for N in 12288 16384; do
  for W in 640 1280 2560; do
    G=$(ceil_g 5120 $W $((N + 16)))  # + the ppl run's few extra positions
    nice python -m cli eval ppl --file "$SHARED/text/austen-emma.txt" --tokens $N --buckets 4k,8k,12k \
      -G $G -W $W --json > $OUT/smollm2_ppl_N$((N / 1024))k_W${W}.json
  done
done
for W in 640 1280 2560; do
  G=$(ceil_g 5120 $W $((16384 + 16)))
  nice python -m cli eval passkey --lengths 16k --depths 0.75,0.5,0.25 --trials 1 --seed 1 -G $G -W $W \
    --json > $OUT/smollm2_passkey_N16k_W${W}.json
done
