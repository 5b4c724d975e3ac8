"""What `llamette serve` counts, in Prometheus' text exposition format (GET /metrics): requests
by endpoint and status, tokens in and out, and the latencies users feel (time to the first token,
time between tokens). Updated from the event loop and the engine's thread alike."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

# Latency buckets in seconds, from a fast decode step to a long prefill.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Observations counted into cumulative buckets (upper bounds), with their sum."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        lines, total = [], 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*lines, f"{name}_sum {self.sum!r}", f"{name}_count {total}"]


class Metrics:
    """The server's counters and histograms; `render` adds the gauges of the moment."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (path, status)
        self.prompt_tokens = 0
        self.reused_prompt_tokens = 0
        self.completion_tokens = 0
        self.preemptions = 0
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram()

    def answered(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[path, status] += 1

    def admitted(self, prompt_tokens: int, reused: int) -> None:
        """A request got its slot: its prompt (once for all its choices), `reused` of it cached."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.reused_prompt_tokens += reused

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.inter_token_latency.observe(seconds)

    def preempted(self) -> None:
        """A request gave back its KV memory, to be fed again when there is room."""
        with self._lock:
            self.preemptions += 1

    def finished(self, completion_tokens: int) -> None:
        """A choice ended with these tokens (as its usage counts them)."""
        with self._lock:
            self.completion_tokens += completion_tokens

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text: these counters and histograms, and `gauges` (name: help, value)."""

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]

        with self._lock:
            requests = [f'llamette_requests_total{{path="{path}",status="{status}"}} {count}'
                        for (path, status), count in sorted(self.requests.items())]  # fmt: skip
            lines = [
                *family("llamette_requests_total", "counter",
                        "HTTP requests answered, by path and status.", requests),
                *family("llamette_prompt_tokens_total", "counter",
                        "Prompt tokens of the requests admitted (once for all their choices).",
                        [f"llamette_prompt_tokens_total {self.prompt_tokens}"]),
                *family("llamette_prompt_tokens_reused_total", "counter",
                        "Prompt tokens whose KV rows a slot held already (the prompt cache).",
                        [f"llamette_prompt_tokens_reused_total {self.reused_prompt_tokens}"]),
                *family("llamette_completion_tokens_total", "counter", "Tokens generated.",
                        [f"llamette_completion_tokens_total {self.completion_tokens}"]),
                *family("llamette_preemptions_total", "counter",
                        "Requests that gave back their KV memory to wait for room (each resumes "
                        "with the same tokens).",
                        [f"llamette_preemptions_total {self.preemptions}"]),
                *family("llamette_time_to_first_token_seconds", "histogram",
                        "From a request's arrival to its first token.",
                        self.time_to_first_token.lines("llamette_time_to_first_token_seconds")),
                *family("llamette_inter_token_latency_seconds", "histogram",
                        "Between a request's consecutive tokens.",
                        self.inter_token_latency.lines("llamette_inter_token_latency_seconds")),
            ]  # fmt: skip
        for name, (help_text, value) in gauges.items():
            lines += family(name, "gauge", help_text, [f"{name} {value}"])
        return "\n".join(lines) + "\n"
