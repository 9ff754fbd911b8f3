"""The defaults every part shares, in one light module (no MLX): the planner, the library and
every CLI option take them from here, so a default changes in one place."""

PREFILL_STEP = 512  # tokens fed to the model at once while reading a prompt (bounds activations)
MAX_TOKENS = 512  # the answer budget when none is given
ATTENTION_CHUNK = 512  # queries SelfExtend attention handles at once (planning may lower it)
