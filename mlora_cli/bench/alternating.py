"""Two passes timed alternately, for fusion efficiency: a ratio that the machine's drift does not move.

The machine's speed drifts (here up to 2x within minutes), so each figure is read from pairs: one run of
each, back to back, their order swapped every pair (so neither always runs on the other's leftovers).
The ratio is the median over the pairs of first / second, each pair's two runs taken in the same state
of the machine; the seconds are each side's median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple


class Alternated(NamedTuple):
    first_seconds: float  # median
    second_seconds: float  # median
    ratio: float  # median over pairs of first / second


def timed_alternately(first: Callable[[], Any], second: Callable[[], Any], pairs: int,
                      sync: Callable[[], None] = lambda: None) -> Alternated:
    """`pairs` runs of each after one warm-up run of each (module doc); `sync` waits for queued device work."""

    def seconds(run: Callable[[], Any]) -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    first(), second()  # warm up
    timings: list[tuple[float, float]] = []
    for pair in range(pairs):
        if pair % 2:
            after = seconds(second)
            timings.append((seconds(first), after))
        else:
            before = seconds(first)
            timings.append((before, seconds(second)))
    return Alternated(statistics.median(a for a, _ in timings), statistics.median(b for _, b in timings),
                      statistics.median(a / b for a, b in timings))
