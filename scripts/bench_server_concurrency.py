"""Benchmark concurrent short chats against `selfextend serve`: for 1, 4 and 16 clients, the
same greedy chats sent one at a time and then all at once (decoded together), with aggregate
answer tokens per second and p50 / p95 request latency, and whether the answers agree.

Each measurement gets a fresh server (a real `selfextend serve` process on 127.0.0.1, a free
port, no document cache) warmed up by one request, so that no run reuses another's prompt
caches. Prints a Markdown table.

    nice -n 19 python scripts/bench_server_concurrency.py -m ../shared/models/stories260K
    nice -n 19 python scripts/bench_server_concurrency.py            # the default model (SmolLM2)
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from serve_process import Server

TOPICS = [
    "a dog who finds a red ball",
    "a girl who plants a tree",
    "a cat and a bird who become friends",
    "a boy who loses his hat",
    "a little fish in a big pond",
    "a rabbit who wants to fly",
    "a bear who bakes a cake",
    "two friends at the beach",
    "a frog who sings at night",
    "a duck who is afraid of water",
    "a king who loves ice cream",
    "a mouse in a toy shop",
    "a lion who cannot roar",
    "a snowman who meets the sun",
    "a train that goes to the moon",
    "a tree that talks to the wind",
]


def chat(url, topic, max_tokens) -> dict:
    """One greedy chat: its answer, answer tokens and seconds."""
    body = {
        "messages": [{"role": "user", "content": f"Tell me a short story about {topic}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    reply = httpx.post(url + "/chat/completions", json=body, timeout=3600)
    reply.raise_for_status()
    data = reply.json()
    return {
        "text": data["choices"][0]["message"]["content"],
        "tokens": data["usage"]["completion_tokens"],
        "seconds": time.perf_counter() - started,
    }


def measure(model, topics, max_tokens, concurrent: bool) -> dict:
    """The chats on a fresh, warmed-up server: one at a time, or all at once."""
    with Server(model, ["--no-cache"]) as server:
        chat(server.url, "a warm-up", max_tokens)
        started = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(len(topics)) as pool:
                results = list(pool.map(lambda topic: chat(server.url, topic, max_tokens), topics))
        else:
            results = [chat(server.url, topic, max_tokens) for topic in topics]
        wall = time.perf_counter() - started
    latencies = sorted(result["seconds"] for result in results)
    return {
        "texts": [result["text"] for result in results],
        "tokens": sum(result["tokens"] for result in results),
        "wall": wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", help="model reference (default: the server's default model)")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer budget of every chat (default 48)")
    parser.add_argument("--clients", default="1,4,16", help="client counts, comma-separated (default 1,4,16)")
    args = parser.parse_args()

    print(f"model {args.model or 'default'}, greedy chats of up to {args.max_tokens} answer tokens")
    print()
    print("| clients | one at a time: tokens/s | p50 / p95 s | together: tokens/s | p50 / p95 s | speed-up | same |")
    print("|---|---|---|---|---|---|---|")
    for clients in (int(n) for n in args.clients.split(",")):
        topics = [TOPICS[i % len(TOPICS)] for i in range(clients)]
        alone = measure(args.model, topics, args.max_tokens, concurrent=False)
        together = measure(args.model, topics, args.max_tokens, concurrent=True)
        rate = {name: run["tokens"] / run["wall"] for name, run in (("alone", alone), ("together", together))}
        same = sum(a == b for a, b in zip(alone["texts"], together["texts"]))
        print(
            f"| {clients} | {rate['alone']:.1f} | {alone['p50']:.2f} / {alone['p95']:.2f} | {rate['together']:.1f} "
            f"| {together['p50']:.2f} / {together['p95']:.2f} | {rate['together'] / rate['alone']:.2f}x "
            f"| {same}/{clients} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
