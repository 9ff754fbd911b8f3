#!/usr/bin/env bash
# Side by side: one model family at full precision, 8-bit and 4-bit weights (stories260K, converted
# locally with mlx-lm), each with SelfExtend, in one table. The same loop works for any --model list,
# e.g. a 4-bit and an 8-bit mlx-community conversion, or one model with and without --kv-bits.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-tests/data}  # the test data ships the same files as ../shared
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for bits in 8 4; do
  python -m mlx_lm convert --hf-path "$SHARED/models/stories260K" -q --q-bits $bits --q-group-size 32 \
    --mlx-path "$work/stories260K-${bits}bit" > /dev/null
done
files=()
for model in "$SHARED/models/stories260K" "$work/stories260K-8bit" "$work/stories260K-4bit"; do
  out="docs/results/quant_$(basename "$model").json"
  nice python -m cli eval ppl --model "$model" --file "$SHARED/text/tinystories_sample.txt" --tokens 4096 \
    --buckets 512,2048 -G 16 -W 128 --json > "$out"
  files+=("$out")
done
python -m cli eval compare "${files[@]}"
