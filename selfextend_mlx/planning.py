"""The rules that decide how a run uses a model, each written once.

- reach: N_max = (L - W) * G + W                                         max_length()
- the G/W choice: plain attention while input + answer fit the model's own context; past
  it the smallest G that covers them, W from the registry or the window rule   choose_settings()
- the long-context method (plain, SelfExtend), from the measured scoreboard      choose_method()
- what to do with a document past the largest reach (a summary: past the
  summary reach)                                            choose_strategy(), summary_reach()
- the KV cache's size, SelfExtend's or plain                                 kv_cache_bytes()
- the memory a run needs, and the check against the machine       estimate_memory(), check_memory()
- the memory of runs alive at once (bench's modes, the server's batch)        memory_together()
- attention's query chunk, so its score block stays within a budget     attention_chunk_size()
- a run's whole plan: settings, memory, KV quantization group, answer budget     plan_run()
- the plans of measurement runs: eval's modes, bench's modes side by side
                                    plain_settings(), modes_memory(), bench_settings()

Everything here is arithmetic on a model's limits and shape and on token counts: nothing is
loaded or patched, so load, the session, `info`, `eval`, `bench` and the server all get the
same answers, and tests pin each rule with a table of cases.
"""

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

from .defaults import ATTENTION_CHUNK, PREFILL_STEP
from .errors import InputTooLongError, InsufficientMemoryError, SelfExtendError, SettingsError

DEFAULT_MAX_GROUP_SIZE = 16  # for models the registry does not know
DEFAULT_GROUP_SIZE = 4  # G when nothing says how long the input is
WINDOW_DIVISOR = 4  # W = context // 4 for models the registry does not know
QUESTION_RESERVE = 128  # tokens kept free for a chat question when planning on the documents
MEMORY_FRACTION = 0.9  # refuse a run whose estimate is above this share of the machine's memory
ENV_MAX_MEMORY = "SELFEXTEND_MAX_MEMORY"

# How the settings were chosen.
FITS = "fits"  # input + answer within the model's own context: plain attention (G = 1)
EXTENDS = "extends"  # the smallest G that covers input + answer, grouped positions within the context
LARGEST = "largest"  # past the comfortable range: the largest G, up to the hard limit of L
GIVEN = "given"  # the user's G (and W)
UNKNOWN_LENGTH = "unknown length"  # no length to plan for: the registry's G


# -- a model's limits ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLimits:
    """What bounds a model's positions, from the registry or its config.

    trained_context (L): the hard limit; no grouped or neighbor position may reach it.
    effective_context: where the plain model really stops working, when that is below L.
    group_size, window: the registry's G (used when no length is known) and W.
    max_group_size: the largest G worth using.
    """

    trained_context: int
    effective_context: Optional[int] = None
    group_size: Optional[int] = None
    window: Optional[int] = None
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE

    @property
    def context(self) -> int:
        """The context the plain model handles: plain attention runs inside it, and SelfExtend
        keeps its grouped positions below it."""
        return self.effective_context or self.trained_context

    def default_window(self) -> int:
        """W for extended inputs: the registry's, else the window rule."""
        return self.window or max(1, self.context // WINDOW_DIVISOR)

    def grouping_context(self, window: int) -> int:
        """The context that grouped positions stay within for `window`: the plain model's, unless
        a user's window is as wide as that (then only the trained context bounds them)."""
        return self.context if window < self.context else self.trained_context


# -- reach and the G/W choice --------------------------------------------------------------


def max_length(context: int, group_size: int, window: int) -> int:
    """N_max = (L - W) * G + W: the longest input whose positions all stay below `context`."""
    if group_size == 1:
        return context
    if window >= context:
        raise SettingsError(f"window {window} must be smaller than the trained context {context}")
    return (context - window) * group_size + window


def smallest_group_size(context: int, window: int, tokens: int) -> int:
    """The smallest G whose reach over `context` covers `tokens` (1 when the context does)."""
    if tokens <= context:
        return 1
    if window >= context:
        raise SettingsError(f"window {window} must be smaller than the trained context {context}")
    return math.ceil((tokens - window) / (context - window))


@dataclass(frozen=True)
class Settings:
    """SelfExtend's G and W for a run, why, and how far they reach."""

    group_size: int
    window: int
    reason: str  # FITS, EXTENDS, LARGEST, GIVEN or UNKNOWN_LENGTH
    reach: int  # the longest input + answer these settings were chosen for
    context: Optional[int] = None  # the context the reach is over: the effective one, or L

    def formula(self) -> str:
        """The reach with its parts: "17,408 = (5,120 - 1,024) x 4 + 1,024" (plain: the context)."""
        if self.plain or self.context is None:
            return f"{self.reach:,}"
        return f"{self.reach:,} = ({self.context:,} - {self.window:,}) x {self.group_size} + {self.window:,}"

    @property
    def plain(self) -> bool:
        return self.group_size == 1

    @property
    def method(self) -> str:
        return choose_method(self)

    def config(self, **options):
        """The SelfExtendConfig to apply, or None when the run is plain attention."""
        from .core.config import SelfExtendConfig

        return None if self.plain else SelfExtendConfig(self.group_size, self.window, **options)

    def describe(self) -> str:
        if self.plain:
            return "plain attention" + (" (fits the model's context)" if self.reason == FITS else "")
        return f"G={self.group_size} W={self.window:,}" + {
            EXTENDS: " (the smallest G that reaches)",
            LARGEST: " (the largest G)",
        }.get(self.reason, "")


PLAIN_METHOD, SELFEXTEND_METHOD = "plain", "selfextend"


def choose_method(settings: Settings) -> str:
    """The long-context method a run uses: the plain model where its context suffices,
    SelfExtend past it.

    From the scoreboard in docs/results.md ("Side by side", issue 25), which is where another
    method would have to win for the planner to pick it:
    - stories260K at 8x and 12x its context (4k, 6k): SelfExtend kept perplexity at 4.4-6.7
      where dynamic NTK reached 16 and 34, YaRN 28 and 65, linear 86 and 99, and STRING and
      plain broke (past 1,000); inside the context every RoPE scaling cost perplexity (linear
      69-84 against plain's 4.5).
    - SmolLM2-135M at 1.5x its context (Emma to 12k): the planned SelfExtend 22.0 on the last 2k,
      dynamic NTK 22.0, YaRN 22.2, STRING 22.5, linear 28.1, plain 36.1; inside 8k SelfExtend
      is within 0.7% of plain (equal to 6k), NTK within 0.7%, YaRN up to 1.1% and STRING 3.6%
      worse, linear 20-30%. NTK ties SelfExtend; it does not beat it.
    - SmolLM2 passkey at 12k, 16k and 32k: SelfExtend and retrieval keep the key at all three;
      YaRN at 12k and 16k but not 32k (factor 4); STRING and dynamic NTK at 12k only (STRING
      is past L + S - w from 11k); plain, the kept tail and linear lose it from 12k on.
    - SmolLM2 RULER at 4k, inside the context, where STRING is meant to help: it loses multikey
      and multivalue, which plain (every other method there) passes.
    - Gemma 3 270M at 40k (L 32k): SelfExtend, STRING, retrieval and the kept tail keep a
      mid-prompt key; YaRN, dynamic NTK and linear lose it; SelfExtend has the lowest
      perplexity past 32k (22.4 and 28.7 against 22.5-29.6) and STRING is 1-1.5% above plain
      inside 32k.
    So no family or length has a measured case for another method: ties go to SelfExtend, which
    is the exact plain model on every distance below W. The others stay `eval --methods` arms
    until one wins a cell, and this is the one place to change when it does."""
    return PLAIN_METHOD if settings.plain else SELFEXTEND_METHOD


def _check_given(limits: ModelLimits, group_size, window) -> None:
    for name, value in (("--group-size", group_size), ("--window", window)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SettingsError(f"{name} must be a positive integer, got {value!r}")
    if window is not None and window >= limits.trained_context:
        raise SettingsError(
            f"--window {window} must be smaller than the model's trained context {limits.trained_context}"
        )
    if group_size is not None and group_size > limits.max_group_size:
        raise SettingsError(
            f"--group-size {group_size} is above this model's largest useful G ({limits.max_group_size})"
        )


def choose_settings(
    limits: ModelLimits,
    tokens: Optional[int] = None,
    *,
    group_size: Optional[int] = None,
    window: Optional[int] = None,
    answer_tokens: int = 0,
) -> Settings:
    """G and W for an input of `tokens` tokens (prompt plus answer budget).

    - G given by the user: used as given, with their W or the default one.
    - Input + answer within the model's context: plain attention (G = 1), the exact model.
    - Past it: the smallest G whose reach over the context covers them, W the user's or the
      default (registry, else context // 4); past the comfortable range but within the hard
      one of L, the largest G.
    - Past that: InputTooLongError with the numbers (see choose_strategy for what the
      product does instead).
    `answer_tokens` (part of `tokens`) only words the error.
    """
    _check_given(limits, group_size, window)
    L = limits.trained_context
    W = window or limits.default_window()
    if W >= L:
        raise SettingsError(f"window {W} must be smaller than the trained context {L}")
    if group_size is not None:
        return Settings(group_size, W, GIVEN, max_length(L, group_size, W), L)
    if tokens is None:
        G = limits.group_size or DEFAULT_GROUP_SIZE
        return Settings(G, W, UNKNOWN_LENGTH, max_length(L, G, W), L)
    context = limits.grouping_context(W)
    if tokens <= context:
        return Settings(1, W, FITS, context, context)
    G = smallest_group_size(context, W, tokens)
    if G <= limits.max_group_size:
        return Settings(G, W, EXTENDS, max_length(context, G, W), context)
    largest = max_length(L, limits.max_group_size, W)
    if tokens <= largest:
        return Settings(limits.max_group_size, W, LARGEST, largest, L)
    what = (
        f"{tokens - answer_tokens} prompt tokens + {answer_tokens} answer tokens = {tokens}"
        if answer_tokens
        else f"{tokens} tokens"
    )
    raise InputTooLongError(
        f"input too long: {what} > N_max {largest}, beyond this model's reach (L={L}, W={W}, "
        f"G={limits.max_group_size}, the most this model allows); it would need G={smallest_group_size(L, W, tokens)}: "
        "shorten the document or lower --max-tokens"
    )


def largest_reach(limits: ModelLimits, window: Optional[int] = None) -> int:
    """The most input + answer any G this model allows can take."""
    return max_length(limits.trained_context, limits.max_group_size, window or limits.default_window())


# -- documents past the largest reach --------------------------------------------------------


def fill_reach(limits: ModelLimits, window: Optional[int] = None) -> int:
    """Prompt + answer tokens that a retrieval prompt fills: the most the largest G takes with
    its grouped positions inside the model's context (so it is read as well as any input that
    fits)."""
    W = window or limits.default_window()
    context = limits.grouping_context(W)
    return max_length(context, limits.max_group_size, W)


def summary_reach(limits: ModelLimits, window: Optional[int] = None) -> int:
    """The most prompt + answer a summary reads at once (a whole document, or one map-reduce
    part): the reach of the model's usual G (the registry's, else DEFAULT_GROUP_SIZE), not of
    its largest. Writing a summary asks more of a model than finding a fact: SmolLM2-135M
    answered nothing at all for 27k-token parts of a novel at G=7, and wrote one for 13.6k
    tokens at G=4 (docs/results.md)."""
    W = window or limits.default_window()
    context = limits.grouping_context(W)
    group_size = min(limits.group_size or DEFAULT_GROUP_SIZE, limits.max_group_size)
    return max(max_length(context, group_size, W), limits.context)


FULL = "full"  # the whole document in the prompt
RETRIEVAL = "retrieval"  # the passages most relevant to the question, in document order
MAP_REDUCE = "map-reduce"  # summarize parts, then the summaries

STRATEGY_FOR_TASK = {"ask": RETRIEVAL, "summarize": MAP_REDUCE}


def choose_strategy(task: str, limits: ModelLimits, tokens: int, window: Optional[int] = None) -> str:
    """FULL when `tokens` (document + question + answer) fit the largest reach (a summary: the
    summary reach); else what `task` does with a longer document. A chat cannot hold such a
    document: one error line."""
    if tokens <= (summary_reach(limits, window) if task == "summarize" else largest_reach(limits, window)):
        return FULL
    if task in STRATEGY_FOR_TASK:
        return STRATEGY_FOR_TASK[task]
    raise InputTooLongError(
        f"the document is {tokens:,} tokens with the question and answer, beyond this model's largest reach "
        f"of {largest_reach(limits, window):,}: a chat needs it whole; use `selfextend ask` (it picks the "
        "relevant passages) or `selfextend summarize` (it summarizes the parts) instead"
    )


# -- memory ---------------------------------------------------------------------------------

CACHE_STEP = 256  # mlx-lm's KVCache and SelfExtendKVCache grow their buffers by this many positions
NEIGHBOR_SLACK = 128  # the SelfExtend window buffer's room beyond W (2 x its compaction step)


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory depends on."""

    layers: int
    kv_heads: int
    head_dim: int
    heads: int = 1
    vocab: int = 32000
    item_bytes: int = 4  # bytes per activation (and so per cached key or value element)


def _rounded(n: int, step: int = CACHE_STEP) -> int:
    return math.ceil(n / step) * step if n > 0 else 0


def kv_group_size(head_dim: int, kv_bits: Optional[int]) -> int:
    """The quantization group of a `kv_bits` cache: 64 values, or 32 for small heads."""
    if kv_bits is None or head_dim % 64 == 0:
        return 64
    if head_dim % 32 == 0:
        return 32
    raise SettingsError(f"--kv-bits needs a head size divisible by 32; this model's is {head_dim}: leave --kv-bits out")


def kv_cache_bytes(shape: ModelShape, tokens: int, settings: Settings, kv_bits: Optional[int] = None) -> int:
    """The KV cache after `tokens` tokens, as the caches allocate it.

    Plain (G = 1): mlx-lm's KVCache, keys and values for every position. SelfExtend: values
    for every position, keys held about once (grouped before the window, at their own position
    within it; the window buffer has a little slack). Quantized grouped keys and values
    (`kv_bits`) take bits/8 bytes an element plus a scale and a bias per group."""
    row = shape.kv_heads * shape.head_dim  # elements per position per layer
    if kv_bits is None:
        quantized = shape.item_bytes
    else:
        quantized = kv_bits / 8 + 2 * shape.item_bytes / kv_group_size(shape.head_dim, kv_bits)
    if settings.plain:
        per_layer = 2 * _rounded(tokens) * row * quantized
    else:
        window = min(tokens, settings.window)
        grouped = _rounded(max(0, tokens - window + 1))
        per_layer = (_rounded(tokens) + grouped) * row * quantized + (window + NEIGHBOR_SLACK) * row * shape.item_bytes
    return int(shape.layers * per_layer)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    prefill: int  # transient: one prefill step's attention scores and logits
    machine: Optional[int]  # what the machine has (or the SELFEXTEND_MAX_MEMORY cap); None if unknown

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.prefill


# A prefill chunk's explicit scores, softmax and mixed band: three fp32 heads x chunk x N blocks.
SCORE_MATRICES = 3
SCORE_BUDGET = 512 * 2**20  # bytes of those blocks per layer a chunk may hold (7B at 32k: 42 queries)


def score_block_bytes(heads: int, queries: int, keys: int) -> int:
    """The transient scores of `queries` queries against `keys` keys, per layer (explicit path)."""
    return SCORE_MATRICES * heads * queries * keys * 4


def attention_chunk_size(heads: int, keys: int, *, budget: int = SCORE_BUDGET, largest: Optional[int] = None) -> int:
    """Queries per attention chunk: the most (up to `largest`, default the config's chunk size)
    whose score block against `keys` keys stays within `budget` bytes, and at least one. A plain
    512-query chunk of a 32-head model at 32k keys would hold 2 GB per score matrix per layer."""
    largest = largest or ATTENTION_CHUNK
    return max(1, min(largest, budget // score_block_bytes(heads, 1, max(1, keys))))


def estimate_memory(
    shape: ModelShape,
    weights_bytes: int,
    tokens: int,
    settings: Settings,
    kv_bits: Optional[int] = None,
    prefill_step: int = PREFILL_STEP,
    chunk_size: int = ATTENTION_CHUNK,
) -> MemoryEstimate:
    """What a run over `tokens` tokens needs at its peak: the weights, the KV cache, and one
    prefill step's score block (score_block_bytes, for the chunk attention_chunk_size allows)
    and logits."""
    queries = attention_chunk_size(shape.heads, tokens, largest=min(prefill_step, chunk_size))
    scores = score_block_bytes(shape.heads, queries, tokens)
    logits = prefill_step * shape.vocab * 4
    kv = kv_cache_bytes(shape, tokens, settings, kv_bits)
    return MemoryEstimate(weights_bytes, kv, scores + logits, machine_memory())


def machine_memory() -> Optional[int]:
    """$SELFEXTEND_MAX_MEMORY, else the machine's physical memory (None when unknown)."""
    cap = os.environ.get(ENV_MAX_MEMORY)
    if cap:
        return parse_size(cap, ENV_MAX_MEMORY)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(estimate: MemoryEstimate) -> None:
    if estimate.machine is None or estimate.total <= MEMORY_FRACTION * estimate.machine:
        return
    raise InsufficientMemoryError(
        f"not enough memory: this run needs about {format_bytes(estimate.total)} (weights "
        f"{format_bytes(estimate.weights)}, KV cache {format_bytes(estimate.kv_cache)}, prefill "
        f"{format_bytes(estimate.prefill)}) and the machine has {format_bytes(estimate.machine)}; "
        "use a shorter document, --kv-bits 4, or a smaller --prefill-step-size"
    )


# -- sizes as people write them ----------------------------------------------------------------


def parse_size(text: str, what: str = "size") -> int:
    """'8GB', '512M', '1e9' or a plain number of bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    value = str(text).strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(value[-1:], 1) if value else 1
    try:
        number = float(value[:-1] if scale != 1 else value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise SelfExtendError(f"{what}={text!r} is not a size (use bytes or e.g. 8GB)")
    return int(number * scale)


_TOKEN_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_token_count(text: str) -> int:
    """'4096', '4k' (4096) or '1.5k' (1536): token counts as people write them."""
    match = _TOKEN_COUNT.match(str(text))
    if not match:
        raise SettingsError(f"not a token count: {text!r} (write e.g. 4096 or 4k)")
    number, unit = float(match.group(1)), match.group(2).lower()
    value = number * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
    if value != int(value) or value < 1:
        raise SettingsError(f"not a whole positive token count: {text!r}")
    return int(value)


def parse_token_counts(text: str) -> list[int]:
    values = [parse_token_count(part) for part in str(text).split(",") if part.strip()]
    if not values:
        raise SettingsError(f"no token counts in {text!r}")
    return values


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- a run's plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything one run needs to use a model: its settings, the tokens planned for, the
    answer budget (a run never generates more), the KV cache's quantization and group, the
    prefill step and attention chunk, and the memory all of that needs."""

    model_id: str
    limits: ModelLimits
    settings: Settings
    prompt_tokens: int  # the document part (chat) or the whole prompt (ask, generate)
    max_tokens: int  # the answer budget
    memory: MemoryEstimate
    requested_group_size: Optional[int] = None  # the user's -G, if any
    chunk_size: Optional[int] = None  # attention's query chunk for the planned length (None: the default)
    kv_bits: Optional[int] = None  # quantized KV cache (4 or 8), None for the model's dtype
    kv_group_size: int = 64  # the quantization group of a quantized KV cache
    prefill_step: int = PREFILL_STEP

    @property
    def max_length(self) -> int:
        return self.settings.reach

    @property
    def trained_context(self) -> int:
        return self.limits.trained_context

    @property
    def config(self):
        """The SelfExtendConfig to run with, or None for plain attention."""
        return self.settings.config(**({"chunk_size": self.chunk_size} if self.chunk_size else {}))

    @property
    def cache_settings(self) -> tuple:
        """What makes two KV caches interchangeable besides their tokens (G=1 is plain
        attention, whatever W)."""
        return cache_settings(self.settings, self.kv_bits)


def cache_settings(settings: Settings, kv_bits: Optional[int]) -> tuple:
    return (settings.group_size, 0 if settings.plain else settings.window, kv_bits)


def plan_run(
    model,
    tokens: int,
    *,
    prompt_tokens: int,
    max_tokens: int,
    group_size: Optional[int] = None,
    window: Optional[int] = None,
    kv_bits: Optional[int] = None,
    prefill_step: int = PREFILL_STEP,
) -> Plan:
    """The plan for `tokens` tokens (prompt + answer budget) on a model described by `model`
    (a loaded model's ModelInfo: model_id, limits, shape, weights_bytes)."""
    _check_run(max_tokens, prefill_step)
    settings = choose_settings(model.limits, tokens, group_size=group_size, window=window, answer_tokens=max_tokens)
    if tokens > settings.reach:  # only given settings can fall short
        needed = choose_settings(model.limits, tokens, window=window, answer_tokens=max_tokens)
        raise InputTooLongError(
            f"input too long for -G {group_size}: {prompt_tokens} prompt tokens + {max_tokens} answer tokens "
            f"= {tokens} > N_max {settings.reach}; it needs {needed.describe()}: leave -G out to have it chosen"
        )
    return plan_with(
        model,
        settings,
        tokens,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        prefill_step=prefill_step,
        requested_group_size=group_size,
    )


def _check_run(max_tokens: int, prefill_step: int) -> None:
    if max_tokens < 1:
        raise SettingsError(f"--max-tokens must be at least 1, got {max_tokens}")
    if prefill_step < 1:
        raise SettingsError(f"--prefill-step-size must be at least 1, got {prefill_step}")


def plan_with(
    model,
    settings: Settings,
    tokens: int,
    *,
    prompt_tokens: int,
    max_tokens: int,
    kv_bits: Optional[int] = None,
    prefill_step: int = PREFILL_STEP,
    requested_group_size: Optional[int] = None,
) -> Plan:
    """The plan for `tokens` tokens under settings already chosen (a measurement's mode)."""
    _check_run(max_tokens, prefill_step)
    group = kv_group_size(model.shape.head_dim, kv_bits)
    memory = estimate_memory(model.shape, model.weights_bytes, tokens, settings, kv_bits, prefill_step)
    chunk = attention_chunk_size(model.shape.heads, tokens)
    return Plan(
        model.model_id,
        model.limits,
        settings,
        prompt_tokens,
        max_tokens,
        memory,
        requested_group_size,
        chunk,
        kv_bits,
        group,
        prefill_step,
    )


# -- measurement runs (eval, bench) ------------------------------------------------------------


def plain_settings(tokens: int) -> Settings:
    """Plain attention over every token, however far (a measurement's `plain` mode)."""
    return Settings(1, 1, GIVEN, tokens)


def given_settings(group_size: int, window: int, tokens: int) -> Settings:
    """A measurement's fixed G and W, as given."""
    return Settings(group_size, window, GIVEN, tokens)


def modes_memory(
    model,
    tokens: int,
    modes: list,
    kv_bits: Optional[int] = None,
    prefill_step: int = PREFILL_STEP,
    *,
    together: bool = False,
) -> MemoryEstimate:
    """The memory of measuring `modes` (Settings) over `tokens` tokens: the hungriest one when
    they run one after another (eval), all of them alive at once (`memory_together`) for bench's
    interleaved decode."""
    per_mode = [estimate_memory(model.shape, model.weights_bytes, tokens, s, kv_bits, prefill_step) for s in modes]
    if not together:
        return max(per_mode, key=lambda estimate: estimate.total)
    return memory_together(per_mode)


def memory_together(estimates: list, extra_kv_bytes: int = 0) -> MemoryEstimate:
    """The memory of runs of one model kept alive at once (bench's modes, the server's batch):
    the weights once, every KV cache (and `extra_kv_bytes` of cached prompts) added up, and the
    largest prefill step, since runs are prefilled one at a time."""
    return MemoryEstimate(
        weights=estimates[0].weights,
        kv_cache=sum(estimate.kv_cache for estimate in estimates) + extra_kv_bytes,
        prefill=max(estimate.prefill for estimate in estimates),
        machine=estimates[0].machine,
    )


def bench_settings(limits: ModelLimits, lengths: list, group_size=None, window=None) -> Settings:
    """The SelfExtend settings a benchmark measures: planning's for the longest length, or the
    registry's G when the lengths fit the model (plain attention there would measure nothing
    new). Refused when they would be the plain model at every length."""
    settings = choose_settings(limits, max(lengths), group_size=group_size, window=window)
    if settings.plain:
        settings = choose_settings(limits, None, group_size=group_size, window=window)
    if settings.plain:
        raise SettingsError("group size G=1 is the plain model; give -G 2 or more (or --modes plain)")
    if settings.window >= min(lengths):
        raise SettingsError(
            f"window W={settings.window} is not below the shortest length {min(lengths)}: SelfExtend would be the "
            "plain model there; give a smaller -W or longer --lengths"
        )
    return settings
