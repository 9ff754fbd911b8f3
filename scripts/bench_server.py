"""Benchmark `selfextend serve`: time to first token for a follow-up question about a cached
long document vs the first question, the same after a restart (the document read from the disk
cache), and requests per minute with 1 and with 4 clients asking about that document.

Starts the server itself (a real `selfextend serve` process on 127.0.0.1, a free port, a
temporary document cache), streams every answer and prints the figures as a Markdown table.

    nice python scripts/bench_server.py                      # the default model, an 8k-token document
    nice python scripts/bench_server.py -m MODEL --tokens 4000 --requests 4
"""

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serve_process import Server

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "text" / "austen-emma.txt"
QUESTIONS = [
    "Who is Emma's father?",
    "Where does Emma live?",
    "Who is Miss Taylor?",
    "What does Emma plan for Harriet?",
    "Who is Mr. Knightley?",
    "What happened at the wedding?",
    "Who is Mr. Elton?",
    "What does Emma think of marriage?",
    "Who is Harriet Smith?",
    "What is Highbury?",
    "Who visits Hartfield?",
    "What does Mr. Woodhouse worry about?",
]


def ask(url, document, question, max_tokens) -> dict:
    """Stream one answer; the seconds to its first token and in all, and its usage."""
    body = {
        "messages": [{"role": "user", "content": f"{document}\n\n{question}"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, usage, extension = None, None, None
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=3600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - started
            extension = chunk.get("selfextend", extension)
            usage = chunk.get("usage") or usage
    return {"ttft": first, "seconds": time.perf_counter() - started, "usage": usage, "selfextend": extension}


def requests_per_minute(url, document, clients, per_client, max_tokens, offset) -> float:
    def client(i):
        for j in range(per_client):
            ask(url, document, QUESTIONS[(offset + i * per_client + j) % len(QUESTIONS)], max_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return clients * per_client / ((time.perf_counter() - started) / 60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", help="model reference (default: the server's default model)")
    parser.add_argument("--tokens", type=int, default=8000, help="document length, about (default 8000)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer budget of every request")
    parser.add_argument("--requests", type=int, default=8, help="requests per throughput run (default 8)")
    args = parser.parse_args()

    text = BOOK.read_text(encoding="utf-8")
    start = text.index("Emma Woodhouse, handsome")
    document = text[start : start + 4 * args.tokens]  # about 4 characters a token in English
    with tempfile.TemporaryDirectory() as cache_dir:
        server = Server(args.model, ["--cache-dir", str(cache_dir)])
        try:
            first = ask(server.url, document, QUESTIONS[0], args.max_tokens)
            follow = ask(server.url, document, QUESTIONS[1], args.max_tokens)
            rpm = {
                n: requests_per_minute(server.url, document, n, max(1, args.requests // n), args.max_tokens, 2 + n)
                for n in (1, 4)
            }
        finally:
            server.stop()
        restarted = Server(args.model, ["--cache-dir", str(cache_dir)])
        try:
            from_disk = ask(restarted.url, document, QUESTIONS[2], args.max_tokens)
        finally:
            restarted.stop()

    extension, usage = first["selfextend"], first["usage"]
    settings = "plain" if extension["group_size"] == 1 else f"G={extension['group_size']} W={extension['window']}"
    print(
        f"model {args.model or 'default'}, document {usage['prompt_tokens']:,} prompt tokens, {settings}, "
        f"answers up to {args.max_tokens} tokens"
    )
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| first question: time to first token | {first['ttft']:.1f} s |")
    cached = follow["usage"]["prompt_tokens_details"]["cached_tokens"]
    print(
        f"| follow-up question (memory cache, {cached:,} tokens reused): time to first token | {follow['ttft']:.2f} s |"
    )
    print(
        f"| follow-up / first | {follow['ttft'] / first['ttft']:.3f} ({first['ttft'] / follow['ttft']:.0f}x faster) |"
    )
    print(
        f"| after a restart (document from the disk cache, {from_disk['selfextend']['cache']}): time to first "
        f"token | {from_disk['ttft']:.2f} s |"
    )
    for n, value in rpm.items():
        print(f"| requests per minute, {n} client{'s' if n > 1 else ''} (follow-up questions) | {value:.1f} |")


if __name__ == "__main__":
    main()
