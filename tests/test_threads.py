"""The choice of thread counts from measured pass times (llamette.threads)."""

from llamette.threads import RETRY, ThreadChooser


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
