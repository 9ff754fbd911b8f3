#!/usr/bin/env bash
# stories260K (trained on 512 tokens) perplexity on TinyStories, 0-8k tokens, plain vs SelfExtend,
# for several G/W settings. Writes docs/results/stories260k_ppl_*.json, one table and
# docs/img/stories260k_ppl.png with every curve.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-tests/data}  # the test data ships the same files as ../shared
files=()
for setting in ${SETTINGS:-32:128 16:128 8:256}; do
  name="g${setting%:*}w${setting#*:}"
  nice python -m cli eval ppl --model "$SHARED/models/stories260K" --file "$SHARED/text/tinystories_sample.txt" \
    --tokens 8k --buckets 256,512,1k,2k,3k,4k,5k,6k,7k -G "${setting%:*}" -W "${setting#*:}" --compare --json \
    > "docs/results/stories260k_ppl_$name.json"
  files+=("docs/results/stories260k_ppl_$name.json")
done
python -m cli eval compare "${files[@]}" --plot docs/img/stories260k_ppl.png
