"""Evaluation: perplexity by position, passkey, needle and RULER-style retrieval, over the methods
of methods.py (plain, SelfExtend, RoPE scalings, STRING, truncation, retrieval) side by side.
`selfextend eval` (cli/eval_cmd.py) drives these; they work on any loaded mlx-lm model.
"""

from .common import PLAIN, SELFEXTEND, Mode, use_mode
from .methods import METHODS, Setup, applied, method_setup, parse_methods
from .perplexity import Bucket, bucket_edges, bucket_perplexity, perplexity_buckets, token_nll
from .prompts import RetrievalPrompt, answer_found, needle_prompt, passkey_prompt
from .retrieval import Cell, build_cells, passkey_keys, run_cells

__all__ = [
    "PLAIN",
    "SELFEXTEND",
    "Mode",
    "use_mode",
    "METHODS",
    "Setup",
    "applied",
    "method_setup",
    "parse_methods",
    "Bucket",
    "bucket_edges",
    "bucket_perplexity",
    "perplexity_buckets",
    "token_nll",
    "RetrievalPrompt",
    "answer_found",
    "needle_prompt",
    "passkey_prompt",
    "Cell",
    "build_cells",
    "passkey_keys",
    "run_cells",
]
