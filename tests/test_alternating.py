"""Fusion efficiency's timing (`bench.alternating`): pairs in swapped order, the ratio read within each pair."""

from __future__ import annotations

import pytest

from mlora_cli.bench import alternating


def test_the_ratio_is_read_within_pairs_so_a_drifting_machine_does_not_move_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The second pass costs twice the first at any speed, and the machine runs at a third of its speed from the
    middle of the second pair to the middle of the fifth: the pairs that straddle a change aside, every pair reads
    0.5, so their median does; the medians of each side's times land on different speeds (3.0 / 2.0 = 1.5, the
    pass that costs twice reading as faster)."""
    clock = [0.0]
    order: list[str] = []
    slow_runs = range(3, 10)  # runs after the warm-up, counted from 0

    def run(name: str, cost: float):
        def step() -> None:
            order.append(name)
            clock[0] += cost * (3.0 if len(order) - 3 in slow_runs else 1.0)
        return step

    monkeypatch.setattr(alternating.time, "perf_counter", lambda: clock[0])
    timed = alternating.timed_alternately(run("first", 1.0), run("second", 2.0), pairs=7)
    assert timed.ratio == 0.5
    assert timed.first_seconds / timed.second_seconds == 1.5
    assert order[:2] == ["first", "second"]  # the warm-up
    pairs = [tuple(order[i : i + 2]) for i in range(2, len(order), 2)]
    assert pairs == [("first", "second"), ("second", "first")] * 3 + [("first", "second")]
