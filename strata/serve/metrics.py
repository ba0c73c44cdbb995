"""/metrics: the engine's counters and gauges, and the HTTP responses by path and status, in
Prometheus' text format."""

from __future__ import annotations

from collections import Counter

from strata.serve.engine import Engine


def prometheus_text(engine: Engine, responses: Counter) -> str:
    lines = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP strata_{name} {help_text}", f"# TYPE strata_{name} {kind}"])
        lines.extend(f"strata_{name}{labels} {value}" for labels, value in samples)

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
    metric("http_responses_total", "counter", "HTTP responses by path and status.",
           [(f'{{path="{path}",status="{status}"}}', count) for (path, status), count in sorted(responses.items())])
    return "\n".join(lines) + "\n"
