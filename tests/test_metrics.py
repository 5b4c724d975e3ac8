"""Serving metrics as Prometheus' own parser reads them."""

import pytest

from llamette.metrics import Histogram, Metrics


def test_a_histogram_counts_cumulatively_into_its_buckets():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.lines("x") == [
        'x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4',
        "x_sum 3.65", "x_count 4",
    ]  # fmt: skip


def test_the_exposition_parses_with_prometheus_client():
    parser = pytest.importorskip("prometheus_client.parser", reason="a test dependency")
    metrics = Metrics()
    metrics.answered("/v1/completions", 200)
    metrics.answered("/v1/completions", 200)
    metrics.answered("/v1/completions", 400)
    metrics.admitted(prompt_tokens=12, reused=4)
    metrics.first_token(0.3)
    metrics.next_token(0.02)
    metrics.finished(completion_tokens=2)
    text = metrics.render({"llamette_requests_running": ("Requests decoding now.", 1)})
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    requests = {(s.labels["status"], s.value) for s in families["llamette_requests"].samples}
    assert requests == {("200", 2.0), ("400", 1.0)}
    assert families["llamette_prompt_tokens"].samples[0].value == 12
    assert families["llamette_completion_tokens"].samples[0].value == 2
    assert families["llamette_prompt_tokens_reused"].samples[0].value == 4
    ttft = {s.name: s.value for s in families["llamette_time_to_first_token_seconds"].samples
            if s.labels.get("le") in (None, "+Inf")}  # fmt: skip
    assert ttft["llamette_time_to_first_token_seconds_count"] == 1
    assert families["llamette_requests_running"].type == "gauge"
