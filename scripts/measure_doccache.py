"""How the document cache's float16 entries compare with the exact (fp32) cache.

For each model and document size: the entry's size on disk against the fp32 payload store
format 1 wrote, the largest difference in next-token logits after the cached document, and
whether the greedy answer from the cache equals the one from a fresh prefill.

    nice python scripts/measure_doccache.py            # stories260K and the default SmolLM2
    nice python scripts/measure_doccache.py --quick    # stories260K only
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from selfextend_mlx.app.doccache import DocumentCache, cache_key, weights_fingerprint
from selfextend_mlx.app.documents import Document
from selfextend_mlx.app.session import Session, SessionOptions
from selfextend_mlx.loading.load import load

SHARED = Path(__file__).resolve().parents[1] / "tests" / "data"  # the same files as ../shared
QUESTION = "What is the main thing that happens in the text? Answer in one sentence."


def measure(model_ref, text_file, sizes, answer_tokens):
    model, tokenizer = load(model_ref, selfextend=False)
    text = (SHARED / "text" / text_file).read_text()
    for size in sizes:
        document = [Document(text_file, text[:size], "text")]
        options = SessionOptions(max_tokens=answer_tokens)
        with tempfile.TemporaryDirectory() as folder:
            store = DocumentCache(Path(folder))
            exact = Session(model, tokenizer, document, options=options)
            started = time.perf_counter()
            exact.prepare()
            prefill_s = time.perf_counter() - started
            info, plan = exact.info, exact.plan
            key = cache_key(info.model_id, plan.settings, None, exact.prefix_tokens, weights=weights_fingerprint(info))
            fp32 = sum(array.nbytes for c in exact.cache for array in _arrays(c.state))
            path = store.save(key, exact.cache, model_id=info.model_id, config=plan.config, metadata={})
            loaded = store.load(key, model_id=info.model_id, config=plan.config, tokens=len(exact.prefix_tokens))
            suffix = exact.prompt_tokens(QUESTION)[len(exact.prefix_tokens) :]
            exact._activate()
            step = mx.array(suffix)[None]
            reference, restored = model(step, cache=exact.cache)[0, -1], model(step, cache=loaded)[0, -1]
            diff = mx.abs(reference - restored).max().item()
            same_top = mx.argmax(reference).item() == mx.argmax(restored).item()

            fresh = Session(model, tokenizer, document, options=options).ask(QUESTION).text
            Session(model, tokenizer, document, options=options, doc_cache=store).ask(QUESTION)  # the entry exists
            hit = Session(model, tokenizer, document, options=options, doc_cache=store)
            cached = hit.ask(QUESTION).text
            assert hit.document_source == "cache"
            print(
                f"| {info.model_id.rsplit('/', 1)[-1]} | {len(exact.prefix_tokens):,} | {plan.settings.describe()} "
                f"| {fp32 / 1e6:.1f} MB | {path.stat().st_size / 1e6:.1f} MB | {diff:.4f} | {same_top} "
                f"| {'same' if cached == fresh else 'DIFFERENT'} | {prefill_s:.0f} s |",
                flush=True,
            )
            if cached != fresh:
                print(f"  fresh:  {fresh!r}\n  cached: {cached!r}", flush=True)


def _arrays(state):
    for item in state:
        if isinstance(item, mx.array):
            yield item
        elif isinstance(item, (tuple, list)):
            yield from _arrays(item)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stories260K only")
    args = parser.parse_args()
    print(
        "| model | document tokens | settings | fp32 payload | float16 entry | max logit diff | same top token "
        "| greedy answer from the cache | prefill |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    measure(str(SHARED / "models" / "stories260K"), "tinystories_sample.txt", (2000, 8000, 11000), 48)
    if not args.quick:
        measure(None, "austen-emma.txt", (8000, 20000), 48)
    return 0


if __name__ == "__main__":
    sys.exit(main())
