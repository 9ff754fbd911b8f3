"""Beyond one machine: the model sharded over ranks with mlx-lm's tensor parallelism.

Two ranks of `mlx.launch --backend ring` on this machine stand in for two Macs: SelfExtend's
logits and `selfextend ask`'s greedy answer must be the single-process ones. The checks that
need no second rank (what can be split, the one error line) run in this process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import tiny_model

from selfextend_mlx import SelfExtendConfig
from selfextend_mlx.errors import UnsupportedModelError
from selfextend_mlx.loading import distributed
from selfextend_mlx.loading.load import load

HERE = Path(__file__).resolve().parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
SELFEXTEND = Path(sys.executable).parent / "selfextend"


def launch(ranks: int, *command, timeout=300):
    """`mlx.launch -n RANKS --backend ring -- COMMAND` (after `--`, the command's own -n and
    friends are not taken for the launcher's)."""
    if not LAUNCH.exists():
        pytest.skip(f"{LAUNCH} is missing (mlx without its launcher)")
    args = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "--", *map(str, command)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


# -- in this process --------------------------------------------------------------------------


@pytest.mark.parametrize("rank, waits", [(None, False), ("0", False), ("1", True), ("2", True)])
def test_a_failing_rank_other_than_0_lets_rank_0_report_first(monkeypatch, capsys, rank, waits):
    # mlx.launch stops every rank once one exits: were rank 1 to exit first, no line would show.
    from selfextend_cli import main

    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if rank is not None:
        monkeypatch.setenv("MLX_RANK", rank)
    events = []
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: events.append(f"wait {seconds:g}"))
    monkeypatch.setattr(distributed.signal, "signal", lambda *args: None)  # this process's own handlers stay
    main._error("its 8 attention heads do not split evenly over 3 ranks")
    events.append(capsys.readouterr().err.strip())
    line = "error: its 8 attention heads do not split evenly over 3 ranks"
    assert events == ([f"wait {distributed.PRIMARY_REPORT_WAIT:g}", line] if waits else [line])
    main._error("interrupted", prefix="")  # a stop is not an error: nothing to wait for
    assert len(events) == (2 if waits else 1) and capsys.readouterr().err.strip() == "interrupted"


def test_a_single_process_is_one_rank_and_touches_no_backend(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    distributed.world.cache_clear()
    assert not distributed.launched() and distributed.world() is None
    assert distributed.ranks() == 1 and distributed.is_primary()
    assert distributed.ranks_of(tiny_model("llama")) == 1


@pytest.mark.parametrize(
    "family,overrides,ranks,message",
    [
        ("llama", {}, 3, "its 4 attention heads and 2 KV heads do not split evenly over 3 ranks"),
        ("llama", {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 72}, 2, "use 3 ranks"),
        ("llama", {"num_attention_heads": 6, "num_key_value_heads": 1, "hidden_size": 72}, 2, "run it on one machine"),
        ("llama", {"intermediate_size": 97}, 2, "its MLP width 97 does not split evenly over 2 ranks"),
        ("phi3", {}, 2, "mlx-lm has no tensor parallelism for"),
        ("gemma2", {}, 2, "mlx-lm has no tensor parallelism for"),
    ],
)
def test_what_cannot_be_split_gets_one_clear_error(family, overrides, ranks, message):
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(")) as error:
        distributed.check_shardable(tiny_model(family, **overrides), ranks)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family,ranks", [("llama", 2), ("qwen2", 2), ("qwen3", 2), ("llama", 1)])
def test_what_can_be_split_passes(family, ranks):
    distributed.check_shardable(tiny_model(family), ranks)


def test_load_sharded_refuses_before_communicating(stories_dir):
    class ThreeRanks:  # a group that must not be used for anything but its size
        def size(self):
            return 3

        def rank(self):
            return 0

    with pytest.raises(UnsupportedModelError, match="8 attention heads and 4 KV heads do not split evenly over 3"):
        distributed.load_sharded(str(stories_dir), group=ThreeRanks())


# -- two ranks ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_selfextend_computes_the_single_process_logits(stories_dir, tmp_path):
    sys.path.insert(0, str(HERE))
    from distributed_worker import run

    G, W, n = 4, 64, 700  # 700 tokens on a 512-token model: grouped keys, band and window
    result = launch(2, sys.executable, HERE / "distributed_worker.py", stories_dir, tmp_path, G, W, n)
    assert result.returncode == 0, result.stderr[-2000:]
    model, _ = load(str(stories_dir), selfextend=False)
    tokens = mx.random.randint(0, model.model_info.shape.vocab, (n,), key=mx.random.key(0))
    expected = np.array(run(model, tokens, SelfExtendConfig(group_size=G, window=W)))
    draws = set()
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npy")
        assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()  # the sums' order differs
        # each rank: sharded over 2, holding half of stories260K's 8 heads and 4 KV heads
        sharded, heads, kv_heads, draw = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert (sharded, heads, kv_heads) == ("2", "4", "2")
        draws.add(draw)
    assert len(draws) == 1  # seeded apart before loading, the same random stream after it
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


@pytest.mark.slow
def test_ask_under_mlx_launch_gives_the_single_process_answer(stories_dir, tmp_path):
    text = (Path(stories_dir).parents[1] / "text" / "tinystories_sample.txt").read_text()[:4000]
    document = tmp_path / "story.txt"
    document.write_text(text)  # ~2.1k tokens: past stories260K's 512, so SelfExtend runs
    ask = [SELFEXTEND, "ask", document, "-q", "Who is Lily?", "-m", stories_dir, "-n", "16", "--json", "--no-cache"]
    single = subprocess.run(list(map(str, ask)), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    two = launch(2, *ask)
    assert two.returncode == 0, two.stderr[-2000:]
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1, two.stdout  # one answer: rank 0's
    alone, sharded = json.loads(single.stdout), json.loads(lines[0])
    assert sharded["answer"] == alone["answer"] and sharded["answer"].strip()
    assert (alone["ranks"], sharded["ranks"]) == (1, 2)
    assert sharded["group_size"] == alone["group_size"] > 1  # SelfExtend, not plain attention
    assert sharded["document_cache"] == "off"  # a rank's cache holds only its heads
    assert sharded["estimated_memory_bytes"] < alone["estimated_memory_bytes"]  # one rank's share


@pytest.mark.slow
def test_a_model_that_cannot_be_split_is_one_error_line_under_mlx_launch(stories_dir, tmp_path):
    document = tmp_path / "note.txt"
    document.write_text("Tom has a red ball. " * 10)
    result = launch(3, SELFEXTEND, "ask", document, "-q", "What?", "-m", stories_dir, "-n", "4", "--no-cache")
    # mlx.launch itself exits 0 whatever its ranks do; it reports each rank's exit code
    assert "exited with code 1" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {stories_dir}: its 8 attention heads and 4 KV heads do not split evenly over 3 ranks "
        "(each rank needs whole heads): use 2 or 4 ranks"
    ], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_launcher_is_installed():
    assert LAUNCH.exists() or shutil.which("mlx.launch"), "mlx.launch comes with mlx"


def test_standard_input_is_refused_under_a_launcher(monkeypatch):
    """mlx.launch does not pass standard input on to the ranks: a document given as - would wait forever."""
    from selfextend_cli.common import UsageProblem, files_or_stdin

    assert files_or_stdin(["-"], "ask") == ["-"]
    monkeypatch.setenv("MLX_RANK", "0")
    with pytest.raises(UsageProblem, match="standard input does not reach the ranks"):
        files_or_stdin(["-"], "ask")
    assert files_or_stdin(["notes.txt"], "ask") == ["notes.txt"]
