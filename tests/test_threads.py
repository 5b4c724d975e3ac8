"""The choice of thread counts from measured pass times (llamette.threads)."""

import subprocess
import sys
import time

import pytest

from llamette.threads import RETRY, TRY_ROWS, ThreadChooser, first_count, others_running


def run(chooser: ThreadChooser, seconds_with, passes: int) -> tuple[float, dict[int, int]]:
    """Passes whose times `seconds_with(threads, pass)` gives: (total time, passes per count)."""
    total, counts = 0.0, {}
    for i in range(passes):
        threads = chooser.choose()
        seconds = seconds_with(threads, i)
        chooser.record(threads, seconds)
        total += seconds
        counts[threads] = counts.get(threads, 0) + 1
    return total, counts


def test_a_quiet_machine_runs_on_every_core_and_rarely_tries_one():
    total, counts = run(ThreadChooser(4), lambda n, i: 1.0 / n, 10_000)
    assert counts[1] < 10_000 / RETRY / 3  # one thread is 4 times slower: tried 1 / (4 RETRY)
    assert total < 1.02 * 10_000 / 4


def test_beside_a_busy_program_one_thread_wins_and_every_core_is_rarely_tried():
    busy = {1: 0.2e-3, 2: 30e-3}  # a decode step alone, and waiting on a shared core
    total, counts = run(ThreadChooser(2), lambda n, i: busy[n], 10_000)
    assert counts[2] <= 3 and total < 1.05 * 10_000 * busy[1]


def test_the_choice_follows_the_load_as_it_changes():
    def seconds(n, i):  # busy for the first half, then quiet, where two threads are faster
        return {1: 0.2e-3, 2: 30e-3}[n] if i < 5_000 else {1: 0.2e-3, 2: 0.12e-3}[n]

    chooser = ThreadChooser(2)
    run(chooser, seconds, 10_000)
    assert chooser.choose() == 2


def test_the_first_count_is_tried_first_and_one_by_default():
    assert ThreadChooser(2, first=2).choose() == 2
    assert ThreadChooser(2).choose() == 1


def test_long_passes_take_the_best_count_known_and_are_never_trials():
    chooser = ThreadChooser(2, first=2)
    long_pass = TRY_ROWS + 1
    assert chooser.choose(long_pass) == 2  # nothing measured yet: the first count
    chooser.record(2, 1e-3)
    assert chooser.choose(long_pass) == 2  # one thread untried: not on a long pass
    assert chooser.choose(TRY_ROWS) == 1  # ...but on a short one
    chooser.record(1, 0.5e-3)
    assert chooser.choose(long_pass) == 1  # the faster, once known
    for _ in range(10 * RETRY):  # two threads are due for a retry long before this
        assert chooser.choose(long_pass) == 1


def test_beside_a_busy_program_the_first_count_is_one():
    if others_running() is None:
        pytest.skip("this system does not say how many threads run (no /proc/stat)")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert first_count(2) == 1
    finally:
        busy.kill()
        busy.wait()
    assert first_count(1) == 1


def test_others_running_is_read_from_the_kernels_count(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nprocs_running 3\nprocs_blocked 0\n")
    assert others_running(str(stat)) == 2  # beside the thread reading it
    assert others_running(str(tmp_path / "absent")) is None
