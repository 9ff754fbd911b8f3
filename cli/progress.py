"""Reading progress on stderr: the bar, and the model of what the rest will cost behind its
time left."""

import sys
from typing import Optional

RECENT_STEPS = 3  # the fewest latest steps whose own fit is worth showing beside the whole one
RANGE_SPREAD = 1.25  # estimates this close are shown as one figure


def progress_bar(label: str, quiet: bool, progress: bool = True):
    """The prefill progress callback for a run, or None when stderr should stay quiet."""
    return ProgressBar(label) if progress and not quiet else None


class ProgressBar:
    """Reading progress on stderr: tokens done, tokens per second, time left.

    A terminal gets a bar redrawn in place; a log gets the start, a line every 10% and the end.
    Time left is estimated from the steps so far with a cost per token that grows with its
    position (attention over every earlier token), fitted to the measured step times: a rate
    averaged over the short first steps promises far too early an end for a long document.
    The same fit over the latest steps alone follows a machine that got slower or faster
    (other work starting or ending); when the two disagree the line shows both, as a range,
    rather than one figure that swings.
    """

    def __init__(self, label: str = "reading", width: int = 24, min_tokens: int = 256, growing: bool = True):
        self.label, self.width, self.min_tokens, self.growing = label, width, min_tokens, growing
        self.interactive = sys.stderr.isatty()
        self.steps: list[tuple[int, float]] = []  # (tokens done, seconds) after each step
        self.logged = -1  # the last tenth written to a log
        self.skipped = 0  # tokens counted done that took no computing

    def __call__(self, done: int, total: int, elapsed: float, skipped: int = 0) -> None:
        """`skipped`: how many of the `done` tokens took no computing (reused or left out): the
        bar counts them, the rate and the time left do not."""
        if total < self.min_tokens or total <= 0:  # a question's few tokens take no visible time
            return
        if done == 0:
            self.steps, self.logged, self.skipped = [], -1, 0
        elif done - skipped > (self.steps[-1][0] if self.steps else 0):  # a step that computed
            self.steps.append((done - skipped, elapsed))
        self.skipped = skipped
        finished = done >= total
        if self.interactive:
            sys.stderr.write(f"\r\x1b[2K{self.line(done, total, elapsed)}" + ("\n" if finished else ""))
        else:
            tenth = 10 * done // total
            if tenth > self.logged or finished:
                self.logged = tenth
                sys.stderr.write(self.line(done, total, elapsed) + "\n")
        sys.stderr.flush()

    def line(self, done: int, total: int, elapsed: float) -> str:
        filled = int(self.width * min(done, total) / total)
        bar = "#" * filled + "." * (self.width - filled)
        finished = done >= total
        rate = self.rate(elapsed, finished)
        left = None if finished else self.time_left_range(total)
        if finished:
            timing = f"done in {duration(elapsed)}"
        elif left is None:
            timing = "estimating time left"
        elif left[1] <= RANGE_SPREAD * left[0] or duration(left[0]) == duration(left[1]):
            timing = f"about {duration(sum(left) / 2)} left"
        else:
            timing = f"{duration(left[0])} to {duration(left[1])} left"
        speed = f"  {rate:,.0f} tok/s" if rate else ""
        return f"{self.label} [{bar}] {done:,}/{total:,} tokens{speed}  {timing}"

    def rate(self, elapsed: float, finished: bool) -> float:
        """Tokens per second: of the whole read once it is done, else of the latest step; over
        many prompts (not `growing`), of all the computed ones so far, since a step there can be
        one prompt's last token, read with its whole answer."""
        if not self.steps:
            return 0.0
        if finished or len(self.steps) == 1 or not self.growing:
            done, seconds = self.steps[-1]
            return done / seconds if seconds > 0 else 0.0
        (d0, t0), (d1, t1) = self.steps[-2], self.steps[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def seconds_left(self, total: int, recent: int = 0) -> Optional[float]:
        """The time the remaining tokens should take by the fit over all steps so far (or the
        latest `recent` of them), or None before the first step is timed."""
        if not self.steps:
            return None
        done = self.steps[-1][0]
        total -= self.skipped  # the tokens still to compute, counted like the steps
        if recent:
            start, steps = self.steps[-recent - 1], self.steps[-recent:]
            per_token, per_position = fit_step_costs(steps, self.growing, start)
        else:
            per_token, per_position = fit_step_costs(self.steps, self.growing)
        return per_token * (total - done) + per_position * (total * total - done * done) / 2

    def time_left_range(self, total: int) -> Optional[tuple[float, float]]:
        """(lowest, highest) of the estimates from all steps and from the latest ones alone."""
        whole = self.seconds_left(total)
        if whole is None:
            return None
        recent = max(RECENT_STEPS, len(self.steps) // 3)  # the latest third, at least a few steps
        latest = self.seconds_left(total, recent) if len(self.steps) >= recent + 2 else whole
        return min(whole, latest), max(whole, latest)


def fit_step_costs(steps: list, growing: bool = True, start: tuple = (0, 0.0)) -> tuple[float, float]:
    """(a, b) such that the token at position p costs about a + b * p seconds, fitted by least
    squares to the steps' times [(tokens done, seconds so far), ...] after `start`. The first
    step of a read carries its start-up (lazy weights, first graphs): it is left out once there
    are three or more."""
    spans, previous = [], start
    for done, seconds in steps:
        spans.append((done - previous[0], (done * done - previous[0] ** 2) / 2, seconds - previous[1]))
        previous = (done, seconds)
    if len(spans) >= 3 and start[0] == 0:
        spans = spans[1:]
    tokens = sum(n for n, _, _ in spans)
    seconds = sum(t for _, _, t in spans)
    flat = (max(seconds, 0.0) / tokens if tokens else 0.0), 0.0
    if not growing or len(spans) < 2:
        return flat
    # normal equations of  t = a * n + b * x  over the spans
    snn = sum(n * n for n, _, _ in spans)
    sxx = sum(x * x for _, x, _ in spans)
    snx = sum(n * x for n, x, _ in spans)
    snt = sum(n * t for n, _, t in spans)
    sxt = sum(x * t for _, x, t in spans)
    det = snn * sxx - snx * snx
    if det <= 0:
        return flat
    a, b = (snt * sxx - sxt * snx) / det, (snn * sxt - snx * snt) / det
    if b < 0:  # noise: no visible growth
        return flat
    if a < 0:  # all of it grows with the position
        return 0.0, max(sxt / sxx, 0.0)
    return a, b


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
