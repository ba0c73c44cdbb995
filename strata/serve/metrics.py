"""/metrics: the engine's counters, gauges and latency histograms, and the HTTP responses by path
and status, in Prometheus' text format."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from strata.serve.engine import Engine

# Seconds: from a fast CPU's first token to a long generation's end.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Observations counted in cumulative buckets (``le``), with their sum, as Prometheus reads a
    histogram; observed on the engine's thread, read on the server's."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bucket
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def samples(self, name: str) -> list[tuple[str, float]]:
        """(name and labels, value) of every bucket, the sum and the count."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        samples, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += count
            samples.append((f'{name}_bucket{{le="{bound}"}}', running))
        return [*samples, (f"{name}_sum", total), (f"{name}_count", running)]


def prometheus_text(engine: Engine, responses: Counter) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP strata_{name} {help_text}", f"# TYPE strata_{name} {kind}"])
        lines.extend(f"strata_{name}{labels} {value}" for labels, value in samples)

    def histogram(name: str, help_text: str, observed: Histogram) -> None:
        lines.extend([f"# HELP strata_{name} {help_text}", f"# TYPE strata_{name} histogram"])
        lines.extend(f"strata_{sample} {value}" for sample, value in observed.samples(name))

    counters, gauges = dict(engine.counters), engine.gauges()
    metric("requests_total", "counter", "Prompts admitted to the engine.", [("", counters["requests"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [("", counters["prompt_tokens"])])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", counters["generated_tokens"])])
    metric("prefix_hits_total", "counter", "Prompts that reused a cached prefix (of strata_requests_total, each looked up).", [("", counters["prefix_hits"])])
    metric("prefix_hit_tokens_total", "counter", "Prompt tokens restored from the prefix cache.",
           [("", counters["prefix_hit_tokens"])])
    metric("decode_steps_total", "counter", "Decoding steps of the batch.", [("", counters["decode_steps"])])
    metric("decoded_rows_total", "counter", "Continuations advanced, summed over decoding steps (over the steps: the mean "
           "batch).", [("", counters["decoded_rows"])])
    metric("engine_failures_total", "counter", "Engine steps that failed (their requests got an error).",
           [("", counters["failed"])])
    metric("queue_length", "gauge", "Requests waiting for a slot.", [("", gauges["queue_length"])])
    metric("batch_size", "gauge", "Continuations in the decoding batch.", [("", gauges["batch_size"])])
    metric("prefilling", "gauge", "Requests whose prompt is being read.", [("", gauges["prefilling"])])
    metric("cache_bytes", "gauge", "Bytes of the decoding and prefill caches.", [("", gauges["cache_bytes"])])
    metric("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [("", gauges["prefix_cache_bytes"])])
    metric("prefix_cache_blocks", "gauge", "Blocks held by the prefix cache.", [("", gauges["prefix_cache_blocks"])])
    histogram("time_to_first_token_seconds", "From a request's arrival to its first token (queue and prefill).",
              engine.latency["time_to_first_token"])
    histogram("request_duration_seconds", "From a request's arrival to its last token.", engine.latency["request_duration"])
    metric("http_responses_total", "counter", "HTTP responses by path and status.",
           [(f'{{path="{path}",status="{status}"}}', count) for (path, status), count in sorted(responses.items())])
    return "\n".join(lines) + "\n"
