"""What the commands' options accept: argparse types that name the bad value, and weight dtypes."""

from __future__ import annotations

import argparse

# --dtype choices: floating weights of a loaded model.
DTYPES = ("float32", "bfloat16", "float16")


def whole_number(low: int):
    """An argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


positive_int = whole_number(1)


def bounded_float(low: float, high: float = float("inf"), low_inclusive: bool = True, high_inclusive: bool = True):
    """An argparse type: a number in [low, high] (or (low, ... without ``low_inclusive``, ..., high)
    without ``high_inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= low if low_inclusive else value > low) or not (value <= high if high_inclusive else value < high):
            bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {value:g}")
        return value

    return parse
