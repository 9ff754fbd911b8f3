#!/usr/bin/env bash
# Issue 16's evidence: plain attention vs the automatic settings (planning.choose_settings per
# length: plain inside SmolLM2's effective context, the smallest G beyond it) on the default model.
# Hours on a 2-core CPU, so it runs in pieces: each piece writes its own JSON and a piece whose JSON
# exists is skipped (re-run the script to go on); `selfextend eval compare` joins them.
#   passkey:L[:DEPTHS]  5 depths x 2 keys (seed 0) at L in 4k, 8k, 16k; 3 depths x 1 key at 24k
#              and 32k; DEPTHS (comma list) runs some of them, so a long length splits into pieces
#              of an hour or so: the deep depths together (they share most of their prefill), the
#              shallow ones apart (each re-prefills nearly all of it anyway). The table joins them.
#   needle:BOOK:L  one of the books in tests/data/text at L in 2k..16k, 3 depths
# Depths run deepest first, so each prompt re-prefills only from its needle on.
# Usage: scripts/eval_planning_grid.sh plain|auto|compare [PIECE...]   (default: every piece, the
#        cells where plain and auto differ first). compare runs both in one process: cells that
#        auto runs plain (inside the effective context) are then computed once.
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED=${SELFEXTEND_SHARED:-tests/data}  # the test data ships the same files as ../shared
OUT=${SELFEXTEND_GRID_OUT:-docs/results/planning}
mode=$1; shift
case $mode in plain) flags=(--plain) ;; compare) flags=(--compare) ;; *) flags=() ;; esac
BOOKS="austen-emma austen-persuasion chesterton-thursday"
pieces=("$@")
if [ ${#pieces[@]} -eq 0 ]; then
  pieces=(passkey:8k needle:austen-emma:8k needle:austen-emma:12k needle:austen-emma:16k)
  for length in 8k 12k 16k; do for book in austen-persuasion chesterton-thursday; do
    pieces+=(needle:$book:$length); done; done
  pieces+=(passkey:16k:1,0.75,0.5 passkey:16k:0.25,0 passkey:24k:1,0.5 passkey:24k:0
    passkey:32k:1,0.5 passkey:32k:0 passkey:4k)
  for length in 2k 4k; do for book in $BOOKS; do pieces+=(needle:$book:$length); done; done
fi
mkdir -p "$OUT"
for piece in "${pieces[@]}"; do
  IFS=: read -r task a b <<< "$piece"
  name=${piece//:/_}; name=${name//,/-}_$mode.json
  [ -s "$OUT/$name" ] && continue
  echo "$(date +%H:%M:%S) $piece $mode" >&2
  case $task in
    passkey)
      depths=1,0.75,0.5,0.25,0; trials=2
      case $a in 24k|32k) depths=1,0.5,0; trials=1 ;; esac
      [ -n "$b" ] && depths=$b
      command=(eval passkey --lengths "$a" --depths $depths --trials $trials --seed 0) ;;
    needle)
      command=(eval needle --haystack "$SHARED/text/$a.txt"
        --needle "The code for the lock of the east tower is 48213."
        --question "What is the code for the lock of the east tower? Answer with the number."
        --answer 48213 --lengths "$b" --depths 0.9,0.5,0.1 --chat-template) ;;
    *) echo "unknown piece: $piece" >&2; exit 2 ;;
  esac
  nice python -m cli "${command[@]}" "${flags[@]}" --json > "$OUT/$name.tmp" && mv "$OUT/$name.tmp" "$OUT/$name"
done
