"""Real-document check: does `selfextend ask` find one fact placed deep inside a long book?

For each length (in characters of the book, reported back as real prompt tokens) and depth,
a sentence with a five-digit code is put at that depth, and the installed `selfextend ask
--json --no-cache` (default model unless --model) is asked for it. Writes a Markdown table
(and JSON lines) with what was found, the G chosen, prefill speed and wall time.

    python scripts/needle_in_book.py --book ../shared/text/austen-emma.txt \
        --chars 8000,16000,32000 --depths 0.1,0.5,0.9 --out docs/needle_in_book.md
"""

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is the code for the lock of the east tower? Answer with the number."


def needle(code: int) -> str:
    return f" The code for the lock of the east tower is {code}. Remember it: the east tower code is {code}. "


def haystack(book: str, chars: int, depth: float, code: int) -> str:
    start = book.find("CHAPTER I")  # skip the Gutenberg front matter
    text = book[max(start, 0) :][:chars]
    cut = int(len(text) * depth)
    cut = text.rfind(". ", 0, cut) + 1 or cut  # at a sentence end
    return text[:cut] + needle(code) + text[cut:]


def ask(script: str, path: Path, model, max_tokens: int, group_size=None) -> tuple[dict, float]:
    command = [script, "ask", str(path), "-q", QUESTION, "--json", "--no-cache", "-n", str(max_tokens)]
    if model:
        command += ["-m", model]
    if group_size:
        command += ["-G", str(group_size)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        }, wall
    return json.loads(done.stdout), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--book", required=True)
    parser.add_argument("--chars", default="8000,16000,32000", help="comma-separated book lengths in characters")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--group-size", type=int, default=None, help="-G for ask (1: plain attention, for comparison)")
    parser.add_argument("--out", default="docs/needle_in_book.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    script = shutil.which("selfextend") or str(Path(sys.executable).with_name("selfextend"))
    book = Path(args.book).read_text(encoding="utf-8")
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for chars in map(int, args.chars.split(",")):
            for depth in map(float, args.depths.split(",")):
                code = rng.randrange(10000, 100000)
                path = Path(folder) / f"book_{chars}_{depth}.txt"
                path.write_text(haystack(book, chars, depth, code), encoding="utf-8")
                record, wall = ask(script, path, args.model, args.max_tokens, args.group_size)
                found = str(code) in record.get("answer", "")
                row = {"chars": chars, "depth": depth, "code": code, "found": found, "wall_s": round(wall, 1), **record}
                rows.append(row)
                print(json.dumps(row), flush=True)

    lines = [
        "# Needle in a book: `selfextend ask` on a fact placed deep inside a long document",
        "",
        f"Book: `{Path(args.book).name}` (from CHAPTER I on), one sentence with a five-digit code inserted at each "
        f'depth; question: "{QUESTION}"; found = the code appears in the answer (greedy, `--max-tokens '
        f"{args.max_tokens}`).",
        f"Model: {args.model or 'default (SmolLM2-135M-Instruct, embedded Q4_1 GGUF)'}; "
        + (f"-G {args.group_size}" if args.group_size else "G and W chosen by the CLI")
        + ". "
        f"Machine: {platform.machine()}, {platform.system()}, CPU only; measured {time.strftime('%Y-%m-%d')}.",
        "",
        "Command: `python scripts/needle_in_book.py " + " ".join(sys.argv[1:]) + "`",
        "",
        "| prompt tokens | depth | G | W | found | answer | prefill tok/s | wall s |",
        "|---:|---:|---:|---:|:---:|---|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| ({row['chars']} chars) | {row['depth']} | | | error | {row['error']} | | {row['wall_s']} |"
            )
            continue
        answer = row["answer"].strip().replace("\n", " ").replace("|", "/")[:60]
        lines.append(
            f"| {row['prompt_tokens']:,} | {row['depth']} | {row['group_size']} | {row['window']} | "
            f"{'yes' if row['found'] else 'no'} | {answer} | {row['prompt_tps']:.0f} | {row['wall_s']} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    Path(args.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
