#!/usr/bin/env bash
# SmolLM2-135M-Instruct perplexity on Jane Austen's Emma, 0-16k tokens, plain vs SelfExtend.
# Writes docs/results/smollm2_ppl_*.json and docs/img/smollm2_ppl_*.png. Long: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-../shared}
BUCKETS=512,1k,2k,4k,6k,8k,10k,12k,14k
# The G/W settings to measure, as "G:W"; "auto" lets the registry's rule pick them for 16k tokens.
for setting in ${SETTINGS:-auto 4:2048}; do
  if [ "$setting" = auto ]; then flags=(); name=auto; else flags=(-G "${setting%:*}" -W "${setting#*:}"); name="g${setting%:*}w${setting#*:}"; fi
  nice python -m cli eval ppl --file "$SHARED/text/austen-emma.txt" --tokens 16k --buckets $BUCKETS \
    "${flags[@]}" --compare --json --progress --plot "docs/img/smollm2_ppl_$name.png" \
    > "docs/results/smollm2_ppl_$name.json"
done
