"""Timing shared by the benchmarks: alternate the contenders so machine drift hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(measures: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """What each callable returns (a duration it measured itself) in each of ``repeats`` rounds,
    every round calling all of them in turn.

    The order reverses every round (A B, B A, ...): whichever runs first in a round measured
    2-4 % slower on this CPU, which a fixed order would charge to one side. Round r of A and
    round r of B ran seconds apart, so their ratio is steadier than a ratio of medians when the
    machine's speed drifts.
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
    return samples


def measure_alternating(measures: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """The median over rounds of each callable's measurement (see ``alternate``)."""
    return {name: statistics.median(values) for name, values in alternate(measures, repeats, warmup).items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of the per-round ratios numerator[r] / denominator[r]."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]


def timed(step: Callable[[], object]) -> Callable[[], float]:
    """A callable that runs ``step`` and returns its wall-clock seconds (for ``alternate``)."""

    def measure() -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return measure


def time_alternating(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall-clock seconds per call of each callable, timed in alternation."""
    return measure_alternating({name: timed(step) for name, step in steps.items()}, repeats, warmup)
