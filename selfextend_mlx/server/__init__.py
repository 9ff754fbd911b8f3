"""The OpenAI-compatible HTTP server (`selfextend serve`): one model, a queue of requests run
through the CLI's turn runner with the CLI's plan and memory pre-flight, KV caches reused
across requests that share a prefix (in memory and in the on-disk document cache)."""
