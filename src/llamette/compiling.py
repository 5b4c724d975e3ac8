"""Saying what the compiler does: the first run on a machine compiles llamette's kernels for its
CPU (later runs load them from the cache, see kernels.cache), which takes long enough that a
silent program looks hung.

Numba announces each compile (a cache miss) as a `numba:compile` event; a warm run has none, and
prints nothing.
"""

from __future__ import annotations

import logging
import sys
import time

from numba.core import event

log = logging.getLogger("llamette")


class CompileReport(event.Listener):
    """On the llamette logger: at the first compile, that the kernels are being compiled for this
    CPU, once; a count as they complete (a bar on a terminal); and, as each compile that the
    program asked for ends, what it was, how many functions it took and how long."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.depth = 0  # compiles in progress: one asked for and those it set off
        self.functions = 0
        self.started = 0.0
        self.announced = False
        self.bar = None

    def on_start(self, event: event.Event) -> None:
        if self.depth == 0:
            if not self.announced:
                log.info(
                    "compiling kernels for this CPU (once: later runs load them from the cache)"
                )
                self.announced = True
            self.functions, self.started = 0, time.perf_counter()
            if self.progress:
                from tqdm import tqdm

                self.bar = tqdm(desc="compiling", unit=" functions", leave=False)
        self.depth += 1

    def on_end(self, event: event.Event) -> None:
        self.depth -= 1
        self.functions += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.depth == 0:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            name = event.data["dispatcher"].py_func.__name__
            log.info(
                f"compiled {name} ({self.functions} functions) in "
                f"{time.perf_counter() - self.started:.1f} s"
            )


_installed: list[CompileReport] = []  # at most one listener, however often install is called


def report_compiles(progress: bool | None = None) -> None:
    """Say on the llamette logger when and what Numba compiles (see CompileReport); `progress`
    (default: stderr is a terminal) shows a bar."""
    if _installed:
        return
    report = CompileReport(sys.stderr.isatty() if progress is None else progress)
    event.register("numba:compile", report)
    _installed.append(report)


def report_to_stderr() -> None:
    """Notes and timings from the llamette logger go to stderr as "llamette: ..." lines, and
    what the compiler does among them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llamette: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    report_compiles()
