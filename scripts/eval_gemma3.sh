#!/usr/bin/env bash
# Gemma 3 270M (Q4_K_M GGUF, trained on 32,768 tokens; 5 of every 6 layers slide over 512 tokens and
# stay plain): passkey and perplexity by position past the trained context, plain against SelfExtend
# on the same inputs. The file is the test extra setup.sh assembles. Each run writes its own JSON so
# an interrupted sequence keeps what it finished; these are the runs behind docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
GEMMA=${GEMMA:-.venv/share/selfextend/gemma-3-270m-q4_k_m.gguf}
OUT=docs/results/gemma3
mkdir -p "$OUT"
passkey() {  # passkey NAME LENGTHS DEPTHS FLAGS...
  local name=$1 lengths=$2 depths=$3; shift 3
  /usr/bin/time -f "$name: %e s, %M KB peak" nice -n 19 python -m cli eval passkey -m "$GEMMA" \
    --lengths "$lengths" --depths "$depths" --trials 1 --seed 0 "$@" --json --no-progress \
    > "$OUT/passkey_$name.json"
}
ppl_40k() {  # ppl_40k NAME FLAGS...: perplexity on Emma to 40k by position
  local name=$1; shift
  /usr/bin/time -f "ppl $name: %e s, %M KB peak" nice -n 19 python -m cli eval ppl -m "$GEMMA" \
    -f tests/data/text/austen-emma.txt --tokens 40k --buckets 4k,8k,16k,24k,32k,36k "$@" \
    --json --no-progress > "$OUT/ppl_$name.json"
}
passkey 4k_plain 4k 0.5 --plain
passkey 40k_compare 40k 0.5 --compare
ppl_40k emma_40k --compare
passkey 40k_compare_ends 40k 0,1 --compare
# the other methods of `eval --methods` on the same 40k prompt and text (issue 25)
for m in yarn ntk string truncate retrieval linear; do passkey "40k_$m" 40k 0.5 --methods "$m"; done
for m in yarn ntk string; do ppl_40k "emma_40k_$m" --methods "$m"; done
