"""The OpenAI-compatible HTTP server (`selfextend serve`): one model, requests in order, the
CLI's plan and memory pre-flight per request, KV caches reused across requests that share a
prefix (in memory and in the on-disk document cache)."""
