"""planning.py: each rule pinned by a table of cases (the one home of G/W, reach, KV bytes, memory)."""

import pytest
from tiny_models import random_tokens, tiny_model

from selfextend_mlx import make_cache
from selfextend_mlx.core.cache import cache_nbytes
from selfextend_mlx.core.patch import use_selfextend
from selfextend_mlx.core.prefill import prefill
from selfextend_mlx.errors import InputTooLongError, SelfExtendError, SettingsError
from selfextend_mlx.loading.load import model_shape
from selfextend_mlx.loading.registry import registry_entry
from selfextend_mlx.planning import (
    DEFAULT_GROUP_SIZE,
    EXTENDS,
    FITS,
    FULL,
    GIVEN,
    LARGEST,
    MAP_REDUCE,
    RETRIEVAL,
    UNKNOWN_LENGTH,
    MemoryEstimate,
    ModelLimits,
    Settings,
    choose_settings,
    choose_strategy,
    fill_reach,
    kv_cache_bytes,
    kv_group_size,
    largest_reach,
    max_length,
    memory_together,
    parse_size,
    smallest_group_size,
    summary_reach,
)

UNKNOWN_4K = ModelLimits(4096)  # a model the registry does not know: W = 1024, G at most 16
SMOLLM2 = ModelLimits(8192, effective_context=5120, group_size=4, window=1024, max_group_size=8)


def test_reach_formula():
    assert max_length(4096, 4, 1024) == (4096 - 1024) * 4 + 1024 == 13312
    assert max_length(4096, 1, 1024) == 4096  # plain attention: the context itself
    with pytest.raises(SettingsError):
        max_length(4096, 4, 4096)


@pytest.mark.parametrize(
    "context, window, tokens, expected",
    [
        (4096, 1024, 4096, 1),  # fits
        (4096, 1024, 4097, 2),
        (4096, 1024, 7168, 2),  # exactly the reach of G=2
        (4096, 1024, 7169, 3),
        (5120, 1024, 10_000, 3),  # (5120 - 1024) * 3 + 1024 = 13312
    ],
)
def test_smallest_group_size(context, window, tokens, expected):
    assert smallest_group_size(context, window, tokens) == expected
    assert max_length(context, expected, window) >= tokens
    assert expected == 1 or max_length(context, expected - 1, window) < tokens


# limits, tokens, given (G, W), expected (G, W, reason, reach)
CASES = [
    # Inside the model's own context: plain attention, whatever the registry's G.
    (UNKNOWN_4K, 3000, (None, None), (1, 1024, FITS, 4096)),
    (SMOLLM2, 5120, (None, None), (1, 1024, FITS, 5120)),  # effective context, not L
    # Just past it: the smallest G, grouped positions kept within the effective context.
    (UNKNOWN_4K, 4097, (None, None), (2, 1024, EXTENDS, 7168)),
    (SMOLLM2, 5121, (None, None), (2, 1024, EXTENDS, 9216)),
    (SMOLLM2, 10_000, (None, None), (3, 1024, EXTENDS, 13312)),
    (SMOLLM2, 33_792, (None, None), (8, 1024, EXTENDS, 33_792)),
    # Past the comfortable range, within the hard one of L: the largest G.
    (SMOLLM2, 40_000, (None, None), (8, 1024, LARGEST, 58_368)),
    # A given W: G planned on it; a W past the effective context: only L bounds it.
    (UNKNOWN_4K, 16_000, (None, 512), (5, 512, EXTENDS, 18_432)),
    (SMOLLM2, 20_000, (None, 6144), (7, 6144, EXTENDS, 20_480)),
    # Given G (and W): used as given, even where plain would do.
    (SMOLLM2, 1000, (4, None), (4, 1024, GIVEN, 29_696)),
    (UNKNOWN_4K, 1000, (2, 256), (2, 256, GIVEN, 7936)),
    (UNKNOWN_4K, 1000, (1, None), (1, 1024, GIVEN, 4096)),
    # No length to plan for (load() without tokens): the registry's G, else 4.
    (SMOLLM2, None, (None, None), (4, 1024, UNKNOWN_LENGTH, 29_696)),
    (UNKNOWN_4K, None, (None, None), (4, 1024, UNKNOWN_LENGTH, 13_312)),
]


@pytest.mark.parametrize("limits, tokens, given, expected", CASES)
def test_settings_rule(limits, tokens, given, expected):
    settings = choose_settings(limits, tokens, group_size=given[0], window=given[1])
    assert (settings.group_size, settings.window, settings.reason, settings.reach) == expected
    assert settings.plain == (expected[0] == 1)
    assert (settings.config() is None) == settings.plain
    # the scoreboard has no case for another method: plain where it fits, SelfExtend past it
    assert settings.method == ("plain" if settings.plain else "selfextend")
    if tokens is not None:
        assert settings.reach >= tokens


def test_registry_entries_feed_the_rule():
    entry = registry_entry("SmolLM2-135M-Instruct")
    assert entry.limits == SMOLLM2
    llama2 = registry_entry("Llama-2-7b-chat").limits
    assert choose_settings(llama2, 16_000).group_size == 5  # (4096 - 1024) * 5 + 1024 >= 16000


@pytest.mark.parametrize(
    "limits, tokens, given, message",
    [
        (UNKNOWN_4K, 300_000, (None, None), "it would need G=98"),
        (SMOLLM2, 60_000, (None, None), "N_max 58368, beyond this model's reach"),
        (SMOLLM2, 1000, (None, 8192), "--window 8192 must be smaller than the model's trained context 8192"),
        (SMOLLM2, 1000, (9, None), "--group-size 9 is above this model's largest useful G (8)"),
        (SMOLLM2, 1000, (0, None), "--group-size must be a positive integer"),
    ],
)
def test_settings_refusals(limits, tokens, given, message):
    with pytest.raises(SelfExtendError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_settings(limits, tokens, group_size=given[0], window=given[1])


def test_too_long_names_the_numbers():
    with pytest.raises(InputTooLongError) as caught:
        choose_settings(ModelLimits(512), 10_000, window=128, answer_tokens=500)
    message = str(caught.value)
    assert message.startswith("input too long: 9500 prompt tokens + 500 answer tokens = 10000 > N_max 6272")
    assert "G=16, the most this model allows" in message and "it would need G=26" in message


@pytest.mark.parametrize(
    "task, tokens, expected",
    [
        ("ask", 58_368, FULL),
        ("chat", 58_368, FULL),
        ("ask", 58_369, RETRIEVAL),
        ("summarize", 17_408, FULL),  # a summary reads at most the reach of the registry's G = 4
        ("summarize", 17_409, MAP_REDUCE),
        ("summarize", 250_000, MAP_REDUCE),
    ],
)
def test_strategy_past_the_largest_reach(task, tokens, expected):
    assert largest_reach(SMOLLM2) == 58_368
    assert choose_strategy(task, SMOLLM2, tokens) == expected


@pytest.mark.parametrize(
    "limits, expected",
    [
        (SMOLLM2, (5120 - 1024) * 4 + 1024),  # the registry's G, within the effective context
        (ModelLimits(512), (512 - 128) * DEFAULT_GROUP_SIZE + 128),  # unknown model: W = L/4
        (ModelLimits(4096, group_size=8, max_group_size=4), (4096 - 1024) * 4 + 1024),  # never past the largest G
        (ModelLimits(4096, group_size=1), 4096),  # a model that is not extended: its own context
    ],
)
def test_a_summary_reads_at_most_the_reach_of_the_usual_group_size(limits, expected):
    assert summary_reach(limits) == expected
    assert summary_reach(limits) <= fill_reach(limits) <= largest_reach(limits)


def test_a_chat_past_the_largest_reach_points_to_ask_and_summarize():
    with pytest.raises(InputTooLongError, match="use `selfextend ask`.*or `selfextend summarize`"):
        choose_strategy("chat", SMOLLM2, 70_000)


@pytest.mark.parametrize(
    "name, settings, tokens",
    [
        ("llama", Settings(1, 16, FITS, 64), 50),  # plain: mlx-lm's KVCache
        ("llama", Settings(2, 16, EXTENDS, 112), 100),
        ("llama", Settings(4, 24, EXTENDS, 184), 700),
        ("qwen3", Settings(3, 20, EXTENDS, 152), 300),
    ],
)
def test_kv_bytes_match_the_real_cache(name, settings, tokens):
    model = tiny_model(name)
    use_selfextend(model, settings.config())
    cache = make_cache(model)
    prefill(model, cache, random_tokens(tokens), step=64)
    for _ in range(3):  # and a few decode steps
        model(random_tokens(1)[None], cache=cache)
    shape = model_shape(vars(model.args))
    estimate = kv_cache_bytes(shape, tokens + 3, settings)
    assert 0.9 <= estimate / cache_nbytes(cache) <= 1.1


def test_kv_group_size_for_small_heads():
    assert kv_group_size(64, 8) == 64 and kv_group_size(96, 4) == 32 and kv_group_size(8, None) == 64
    with pytest.raises(SettingsError, match="divisible by 32"):
        kv_group_size(8, 4)


@pytest.mark.parametrize("text, value", [("8GB", 8_000_000_000), ("512m", 512_000_000), ("1000", 1000), ("1.5k", 1500)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-5GB", "inf", "nan", "0", ""])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(SelfExtendError, match="is not a size"):
        parse_size(text, "SELFEXTEND_MAX_MEMORY")


def test_every_reach_is_shown_with_the_context_it_is_over():
    """One definition: N_max = (C - W) * G + W, C the effective context where the tool chose G
    inside it, the trained L for a given G, no known length or the largest G (issue 27)."""
    cases = [
        (SMOLLM2, 10_000, None, 5120),  # chosen G: grouped positions within the effective 5,120
        (SMOLLM2, 40_000, None, 8192),  # the largest G: only L bounds it
        (SMOLLM2, 1000, 4, 8192),  # a given G
        (SMOLLM2, None, None, 8192),  # no length known
    ]
    for limits, tokens, group, context in cases:
        settings = choose_settings(limits, tokens, group_size=group)
        assert settings.context == context
        assert settings.reach == max_length(context, settings.group_size, settings.window)
        parts = f"({context:,} - {settings.window:,}) x {settings.group_size} + {settings.window:,}"
        assert settings.formula() == f"{settings.reach:,} = {parts}"
    assert choose_settings(SMOLLM2, 3000).formula() == "5,120"  # plain: the context itself


def test_memory_together_counts_weights_once_and_every_kv_cache():
    """Runs alive at once (the server's batch, bench's modes) share the weights, keep a KV cache
    each and are prefilled one at a time; the prompts cached beside them add to the caches."""
    small = MemoryEstimate(weights=100, kv_cache=10, prefill=7, machine=1000)
    large = MemoryEstimate(weights=100, kv_cache=30, prefill=3, machine=1000)
    both = memory_together([small, large], extra_kv_bytes=5)
    assert (both.weights, both.kv_cache, both.prefill, both.machine) == (100, 45, 7, 1000)
    assert memory_together([small]) == small
