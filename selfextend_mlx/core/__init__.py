"""The method alone: SelfExtend settings, attention, its KV cache, the Metal kernel, and the
patch that puts it on an mlx-lm model (one adapter per attention layout in families/)."""
