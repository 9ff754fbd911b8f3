#!/usr/bin/env bash
# SmolLM2-135M-Instruct perplexity on Jane Austen's Emma, 0-16k tokens, plain vs SelfExtend.
# Writes docs/results/smollm2_ppl_*.json and docs/img/smollm2_ppl_*.png. Long: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-tests/data}  # the test data ships the same files as ../shared
BUCKETS=512,1k,2k,4k,6k,8k,10k,12k,14k
# The G/W settings to measure, as "G:W"; "auto" lets the registry's rule pick them for 16k tokens.
# docs/results.md has 8:1024 (what the rule picked when the registry gave an effective context of 3072).
for setting in ${SETTINGS:-8:1024}; do
  if [ "$setting" = auto ]; then flags=(); name=auto; else flags=(-G "${setting%:*}" -W "${setting#*:}"); name="g${setting%:*}w${setting#*:}"; fi
  nice python -m cli eval ppl --file "$SHARED/text/austen-emma.txt" --tokens 16k --buckets $BUCKETS \
    "${flags[@]}" --compare --json --progress --plot "docs/img/smollm2_ppl_$name.png" \
    > "docs/results/smollm2_ppl_$name.json"
done
