"""Timing shared by the benchmarks: alternate the contenders so machine drift hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def measure_alternating(measures: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median of what each callable returns (a duration it measured itself), calling them in turn
    ``repeats`` times.

    The order reverses every round (A B, B A, ...): whichever runs first in a round measured
    2-4 % slower on this CPU, which a fixed order would charge to one side.
    """
    for measure in measures.values():
        for _ in range(warmup):
            measure()
    samples = {name: [] for name in measures}
    order = list(measures.items())
    for _ in range(repeats):
        for name, measure in order:
            samples[name].append(measure())
        order.reverse()
    return {name: statistics.median(values) for name, values in samples.items()}


def time_alternating(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall-clock seconds per call of each callable, timed in alternation."""

    def timed(step):
        def measure() -> float:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start

        return measure

    return measure_alternating({name: timed(step) for name, step in steps.items()}, repeats, warmup)
