"""KV caches of recent requests, kept in memory so that a request sharing a prefix with an
earlier one (the same document, the same conversation) prefills only what is new.

Built on mlx-lm's LRUPromptCache (a token trie: the nearest cache for a prompt, trimmed back to
the common prefix when it ran further), keyed here by the settings the cache was made under:
a cache made with one G and W is never handed to a request planned with another. Bounded in
bytes: beyond the bound the least recently stored caches go, except the newest (one long
conversation must be able to reuse its own document however large it is), and the engine
evicts more when a request's memory pre-flight needs the room.
"""

from typing import Optional

from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from ..planning import Settings, cache_settings

MAX_ENTRIES = 64  # many short chats: the trie's size stays small


def settings_key(settings: Settings, kv_bits: Optional[int]) -> tuple:
    """What makes two caches interchangeable, besides their tokens (planning's rule)."""
    return cache_settings(settings, kv_bits)


class PromptCacheStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=MAX_ENTRIES)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, key: tuple, prompt: list[int]) -> tuple[Optional[list], int]:
        """A copy of the cache nearest to `prompt` and how many of its tokens it holds, at most
        all but the last (whose logits start the answer); (None, 0) when there is none."""
        cache, rest = self._lru.fetch_nearest_cache(key, list(prompt))
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt: step back one token
            trim_prompt_cache(cache, 1)
            return cache, len(prompt) - 1
        return cache, len(prompt) - len(rest)

    def insert(self, key: tuple, tokens: list[int], cache: list) -> None:
        """Keep `cache`, which holds exactly `tokens` (the store owns it from now on)."""
        self._lru.insert_cache(key, list(tokens), cache)
        while self.nbytes > self.max_bytes and len(self) > 1:
            self.evict_oldest()

    def evict_oldest(self) -> bool:
        if not len(self):
            return False
        self._lru.trim_to(n_sequences=len(self) - 1)
        return True

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
