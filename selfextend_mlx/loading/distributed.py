"""One command over several Macs (or processes): mx.distributed with mlx-lm's tensor parallelism.

`mlx.launch` starts the same command on every rank (the ring backend locally or over
Ethernet/Thunderbolt; JACCL or MPI where they are set up). `load_sharded` loads the model on
each rank and shards it with mlx-lm's own `model.shard(group)`: every rank keeps 1/N of the
attention heads (so 1/N of the SelfExtend KV cache) and of the MLP; the output projections sum
over the ranks. SelfExtend needs nothing more: the attention patch reads the head counts from
the sharded module (`n_heads`, `n_kv_heads`, which `shard` divides), and each head's attention
is computed whole on one rank, so a sharded run is the single-process model up to the order
of the final sums. Every rank samples the same tokens (the same seed) and only rank 0 writes.
Every rank meets the same errors: the others give rank 0 time to report its line first.
MLX is imported where a group is needed, so the CLI asks about ranks without loading it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Optional

from ..errors import UnsupportedModelError

# Environment variables the launchers set on every rank: mlx.launch (ring, JACCL), mpirun.
LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# How long a rank other than 0 waits before it exits on an error: the launcher stops every rank
# as soon as one exits, so the first to exit is the one whose error line the user reads.
PRIMARY_REPORT_WAIT = 10.0  # seconds

if TYPE_CHECKING:
    import mlx.core as mx


def launched() -> bool:
    """Whether this process was started by a distributed launcher."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def launcher_rank() -> int:
    """This process's rank as its launcher set it (0 when not launched)."""
    for name in LAUNCH_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


def let_the_primary_report(wait: float = PRIMARY_REPORT_WAIT) -> None:
    """On a failing rank other than 0, wait (at most `wait` seconds) before exiting: rank 0
    meets the same error, prints its one line and exits, and the launcher then stops this rank.
    Without the wait, whichever rank exits first ends the run, often with no line shown."""
    if launcher_rank() == 0:
        return
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop ends this rank quietly
    except ValueError:  # not the main thread
        pass
    time.sleep(wait)


@lru_cache(maxsize=1)
def world() -> Optional[mx.distributed.Group]:
    """The group of every rank when launched with more than one, else None (no backend is
    touched in an ordinary run)."""
    if not launched():
        return None
    import mlx.core as mx

    group = mx.distributed.init()
    return group if group.size() > 1 else None


def ranks() -> int:
    group = world()
    return 1 if group is None else group.size()


def is_primary() -> bool:
    """Rank 0, or any process that is not part of a distributed run: the one that writes."""
    group = world()
    return group is None or group.rank() == 0


def ranks_of(model) -> int:
    """How many ranks `model` is sharded over (1 for a model loaded whole)."""
    group = getattr(model, "tensor_group", None)
    return 1 if group is None else group.size()


def check_shardable(model, n_ranks: int) -> None:
    """One UnsupportedModelError line unless mlx-lm can shard `model` over `n_ranks` ranks so
    that every rank holds whole attention heads."""
    info = getattr(model, "model_info", None)
    name = info.model_id if info is not None else type(model).__module__
    family = info.family if info is not None else "this"
    if not callable(getattr(model, "shard", None)):
        raise UnsupportedModelError(
            f"{name}: mlx-lm has no tensor parallelism for {family} models, so it cannot be split over "
            f"{n_ranks} ranks; run it on one machine"
        )
    if not hasattr(model.layers[0].self_attn, "n_kv_heads"):
        raise UnsupportedModelError(f"{name}: SelfExtend cannot split {family} attention over ranks")
    heads, kv_heads = _head_counts(model)
    if heads % n_ranks or kv_heads % n_ranks:
        fits = [n for n in range(2, math.gcd(heads, kv_heads) + 1) if heads % n == 0 and kv_heads % n == 0]
        hint = f"use {' or '.join(map(str, fits))} ranks" if fits else "run it on one machine"
        raise UnsupportedModelError(
            f"{name}: its {heads} attention heads and {kv_heads} KV heads do not split evenly over "
            f"{n_ranks} ranks (each rank needs whole heads): {hint}"
        )
    mlp = getattr(model.layers[0], "mlp", None)
    hidden = getattr(getattr(mlp, "gate_proj", None), "weight", None)
    if hidden is not None and hidden.shape[0] % n_ranks:
        raise UnsupportedModelError(
            f"{name}: its MLP width {hidden.shape[0]} does not split evenly over {n_ranks} ranks; "
            "run it with a number of ranks that divides it"
        )


def _head_counts(model):
    """The query and KV head counts mlx-lm's `shard` divides (the attention patch reads them)."""
    attention = model.layers[0].self_attn
    return attention.n_heads, attention.n_kv_heads


def load_sharded(model_ref=None, group: Optional[mx.distributed.Group] = None, **load_options):
    """`load(model_ref, selfextend=False, **load_options)` on every rank of `group` (default:
    the launched world), then shard with mlx-lm's tensor parallelism. The model's `model_info`
    describes one rank's share (its heads, so its KV cache and memory), `model.tensor_group`
    is the group. On a GPU the weights are still lazy when sharded, so each rank reads only
    its share into memory, as mlx-lm's `sharded_load` does."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .load import load

    group = group or world()
    model, tokenizer = load(model_ref, selfextend=False, **load_options)
    if group is None or group.size() == 1:
        return model, tokenizer
    n = group.size()
    check_shardable(model, n)
    model.shard(group)
    mx.eval(model.parameters())
    info = model.model_info
    shape = replace(info.shape, heads=info.shape.heads // n, kv_heads=info.shape.kv_heads // n)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    model.model_info = replace(info, shape=shape, weights_bytes=weights)
    model.tensor_group = group
    synchronize_seed(group)
    return model, tokenizer


def synchronize_seed(group) -> int:
    """Give every rank rank 0's random seed, so unseeded sampling picks the same tokens on all
    of them (each rank runs the whole generation loop). Also a barrier after loading."""
    import mlx.core as mx

    mine = time.time_ns() % (2**31) if group.rank() == 0 else 0
    seed = int(mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group, stream=mx.cpu).item())
    mx.random.seed(seed)
    return seed


def quiet_unless_primary() -> None:
    """On ranks other than 0, send stdout and stderr nowhere: every rank runs the same command,
    and one answer (one progress bar, one error line) is what the user reads."""
    if not is_primary():
        sink = open(os.devnull, "w")  # noqa: SIM115 (kept open for the rest of the process)
        sys.stdout = sys.stderr = sink
