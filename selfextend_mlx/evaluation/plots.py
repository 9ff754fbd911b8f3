"""PNG plots of evaluation results (matplotlib, no display needed)."""

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: CI and ssh sessions have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from ..errors import EvaluationError  # noqa: E402
from .results import shared_model  # noqa: E402

DEFAULT_SIZE = (800, 500)  # pixels
_DPI = 100


def _figure(size, ncols=1):
    width, height = size
    if width < 100 or height < 100:
        raise EvaluationError(f"a plot must be at least 100x100 pixels, got {width}x{height}")
    return plt.subplots(1, ncols, figsize=(width / _DPI, height / _DPI), dpi=_DPI, squeeze=False)


def _save(fig, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        plt.close(fig)
        raise EvaluationError(f"plots are written as PNG: give a file ending in .png, not {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": it would change the pixel size the caller asked for.
    fig.savefig(path, dpi=_DPI, format="png")
    plt.close(fig)
    return path


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers (6, 20, 1,000), not 6x10^0: perplexities often span
    less than a decade, where matplotlib labels the minor ticks in scientific notation."""

    def __call__(self, x, pos=None):
        if not super().__call__(x, pos):  # LogFormatter decides which ticks get a label
            return ""
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


LINE_STYLES = ("-", "--", "-.", ":")


def titled_legend(title: str, labels) -> tuple:
    """(the title, the legend's labels): a model common to every label named once, in the title."""
    head, short = shared_model(labels)
    return (f"{title}: {head}" if head else title), short


def plot_perplexity(
    series: Mapping[str, Sequence[Mapping]],
    path,
    trained_context: Optional[int] = None,
    title: str = "Perplexity by position",
    size=DEFAULT_SIZE,
) -> Path:
    """One curve per label; each bucket ({'start', 'end', 'ppl'}) drawn flat over its range."""
    fig, axes = _figure(size)
    ax = axes[0][0]
    title, labels = titled_legend(title, series)
    for index, (label, buckets) in enumerate(zip(labels, series.values())):
        xs, ys = [], []
        for bucket in buckets:
            if bucket["ppl"] is not None and math.isfinite(bucket["ppl"]):
                xs += [bucket["start"], bucket["end"]]
                ys += [bucket["ppl"], bucket["ppl"]]
        # methods equal to plain draw the same curve: dashes keep the one underneath visible
        ax.plot(xs, ys, label=label, linewidth=2, linestyle=LINE_STYLES[index % len(LINE_STYLES)])
    if trained_context:
        ax.axvline(trained_context, color="grey", linestyle="--", label=f"trained context ({trained_context})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_grid(
    panels: Mapping[str, Mapping], path, title: str = "Retrieval accuracy", size=DEFAULT_SIZE
) -> Path:
    """A depth x length heatmap per panel; panel = {'lengths', 'depths', 'correct', 'trials'} (grids by depth row)."""
    fig, axes = _figure(size, ncols=len(panels))
    image = None
    fig.subplots_adjust(top=0.82, wspace=0.25)
    for index, (ax, (label, panel)) in enumerate(zip(axes[0], panels.items())):
        lengths, depths = panel["lengths"], panel["depths"]
        grid = [
            [c / t if t else float("nan") for c, t in zip(crow, trow)]
            for crow, trow in zip(panel["correct"], panel["trials"])
        ]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for row in range(len(depths)):
            for col, _ in enumerate(lengths):
                ax.text(
                    col,
                    row,
                    f"{panel['correct'][row][col]}/{panel['trials'][row][col]}",
                    ha="center",
                    va="center",
                    fontsize=8,
                )
        ax.set_xticks(range(len(lengths)), [_short(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        if index == 0:
            ax.set_ylabel("depth")
        ax.set_title(textwrap.fill(label, 28), fontsize=10)  # run labels are long: keep panels apart
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="accuracy")
    return _save(fig, path)


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


NUDGE = 0.012  # vertical offset between lines of an accuracy plot
NUDGE_SPREAD = 0.09  # at most this far apart, the lowest line to the highest


def plot_accuracy_by_length(
    series: Mapping[str, Mapping[int, tuple]],
    path,
    trained_context: Optional[int] = None,
    title: str = "Retrieval accuracy by length",
    size=DEFAULT_SIZE,
) -> Path:
    """Accuracy against prompt length, one line per label; `series[label]` = {length: (correct, trials)}."""
    fig, axes = _figure(size)
    ax = axes[0][0]
    lengths = sorted({length for points in series.values() for length in points})
    title, labels = titled_legend(title, series)
    step = min(NUDGE, NUDGE_SPREAD / max(1, len(series) - 1))  # equal accuracies would hide each other's lines
    for index, points in enumerate(series.values()):
        xs = [n for n in sorted(points) if points[n][1]]
        nudge = (index - (len(series) - 1) / 2) * step
        ys = [points[n][0] / points[n][1] + nudge for n in xs]
        ax.plot(xs, ys, marker="o", linewidth=2, label=labels[index], linestyle="-" if index == 0 else "--")
    if trained_context:
        ax.axvline(trained_context, color="grey", linestyle=":", label=f"trained context ({_short(trained_context)})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [_short(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(-0.08, 1.08)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(
        "accuracy (all depths and trials; lines nudged apart)"
        if len(series) > 1
        else "accuracy (all depths and trials)"
    )
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_bench(rows: Sequence[Mapping], path, title: str = "Prefill and decode time", size=(900, 420)) -> Path:
    """`selfextend bench --json` rows: the prefill time of the whole input and one decode
    step's time, against the input's length, one line per mode."""
    fig, axes = _figure(size, ncols=2)
    prefill, decode = axes[0]
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    for mode in modes:
        mine = sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["length"])
        xs = [row["length"] for row in mine]
        prefill.plot(xs, [row["length"] / row["prefill_tps"] for row in mine], marker="o", label=mode)
        decode.plot(xs, [1000 / row["decode_tps"] for row in mine], marker="o", label=mode)
    lengths = sorted({row["length"] for row in rows})
    for ax, label in ((prefill, "prefill of the whole input (s)"), (decode, "one decode step (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_short(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
