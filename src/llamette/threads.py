"""How many threads a forward pass runs with, chosen by the passes' own times.

Every core is fastest on a quiet machine, but the kernels' threads meet at a barrier after each
parallel loop: when another process holds a core, the thread that shares it makes every other
wait for its turn on that core, and a decode step that takes 0.2 ms alone takes tens of
milliseconds. Fewer threads than cores then win by far. Which count is faster changes with the
machine's load, so the choice is remade from measured times as the passes go.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

RETRY = 50  # a slower count is retried after RETRY times as many passes as it is slower
SAMPLES = 3  # recent times per count whose median stands for it
# Passes of more rows (long prompts) take the best count known and are never a trial: a whole
# prompt on the slower count would cost up to the cores' speed-up (a second chat turn's prompt on
# one thread of two, twice as long).
TRY_ROWS = 32


class ThreadChooser:
    """The thread count for the next pass of one kind (decode steps, or batches): the count
    whose recent passes were fastest (median of the last SAMPLES), the others retried now and
    then, the more rarely the slower they were, so that retrying costs at most about 1 / RETRY
    of the time. Counts: one and every core (`most`), `first` tried first (see first_count);
    trials only on passes of at most TRY_ROWS rows."""

    def __init__(self, most: int, first: int = 1):
        self.counts = [1, most] if most > 1 else [1]
        if first in self.counts:
            self.counts.sort(key=lambda n: n != first)
        self.times = {n: deque(maxlen=SAMPLES) for n in self.counts}
        self.medians: dict[int, float] = {}  # of each count's recent times, kept by record
        self.retry_at: dict[int, float] = {}  # the pass at which to try a slower count again
        self.passes = 0

    def choose(self, rows: int = 1) -> int:
        """The count for the next pass, of `rows` rows."""
        self.passes += 1
        medians = self.medians
        if rows > TRY_ROWS:
            measured = [n for n in self.counts if n in medians]
            return min(measured, key=medians.__getitem__) if measured else self.counts[0]
        for n in self.counts:
            if n not in medians:
                return n
        best = min(self.counts, key=medians.__getitem__)
        for n in self.counts:
            if n == best:
                continue
            due = self.retry_at.get(n)
            if due is None or self.passes >= due:
                self.retry_at[n] = self.passes + RETRY * medians[n] / max(medians[best], 1e-9)
                if due is not None:
                    return n
        return best

    def record(self, threads: int, seconds: float) -> None:
        """The time a pass with `threads` threads took (per row, for batches)."""
        fastest = min(self.medians.values(), default=0.0)
        if self.medians.get(threads, 0.0) > fastest > seconds:  # a slower count is faster now
            self.retry_at[threads] = self.passes + 1  # confirm it at once
        self.times[threads].append(seconds)
        self.medians[threads] = statistics.median(self.times[threads])


def first_count(most: int, looks: int = 3) -> int:
    """The count to try first: every core if none looks taken by another program now, else one.
    A pass on every core beside a busy program can cost a hundred times a pass on one, and one
    thread on a quiet machine costs the cores' speed-up (a whole prompt, in a one-off run)."""
    if most <= 1:
        return 1
    others = [others_running()]
    for _ in range(looks - 1):  # the fewest of a few looks: others' short tasks come and go
        time.sleep(1e-3)
        others.append(others_running())
    return most if None not in others and min(others) == 0 else 1


def others_running(stat_path: str = "/proc/stat") -> int | None:
    """Threads running or ready to run now, beside the calling one (Linux's procs_running), or
    None where the system does not say."""
    try:
        with open(stat_path, "rb") as f:
            for line in f:
                if line.startswith(b"procs_running "):
                    return max(int(line.split()[1]) - 1, 0)
    except (OSError, ValueError):
        pass
    return None
