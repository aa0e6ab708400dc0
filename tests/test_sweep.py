"""Sweep expansion: order, names and resolved configs of grid, zip, list and seeds, and their errors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mlora_cli.errors import ConfigError
from mlora_cli.spec.schema import AdapterConfig, SweepConfig, SweepSpec, TaskConfig, TrainConfig
from mlora_cli.spec.sweep import AdapterSpec, check_sweep, expand, format_value

TASKS = (TaskConfig(name="a", source="builtin:copy"), TaskConfig(name="b", source="builtin:reverse", steps=7))


def make_spec(**sweep: Any) -> SweepSpec:
    return SweepSpec(
        name="t",
        tasks=TASKS,
        adapter=AdapterConfig(rank=8, alpha=16.0, lr=2e-3),
        train=TrainConfig(batch_size=4),
        sweep=SweepConfig(**sweep),
    )


def names(adapters: list[AdapterSpec]) -> list[str]:
    return [a.name for a in adapters]


def problems(**sweep: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        expand(make_spec(**sweep))
    assert check_sweep(SweepConfig(**sweep)) == info.value.problems  # validate reports what expand raises
    return info.value.problems


def test_no_sweep_is_one_default_adapter() -> None:
    [adapter] = expand(make_spec())
    assert adapter == AdapterSpec(
        "default", 0, AdapterConfig(rank=8, alpha=16.0, lr=2e-3), TrainConfig(batch_size=4), {}
    )


def test_grid_is_cartesian_last_key_fastest() -> None:
    adapters = expand(make_spec(grid={"adapter.rank": [4, 8], "adapter.lr": [1e-3, 3e-3, 1e-2]}))
    assert [(a.adapter.rank, a.adapter.lr) for a in adapters] == [
        (4, 1e-3), (4, 3e-3), (4, 1e-2), (8, 1e-3), (8, 3e-3), (8, 1e-2),
    ]  # fmt: skip
    assert names(adapters) == ["r4-lr1e-3", "r4-lr3e-3", "r4-lr1e-2", "r8-lr1e-3", "r8-lr3e-3", "r8-lr1e-2"]


def test_grid_dotted_and_nested_keys_are_the_same() -> None:
    dotted = expand(make_spec(grid={"adapter.rank": [4, 8], "train.batch_size": [2, 4]}))
    nested = expand(make_spec(grid={"adapter": {"rank": [4, 8]}, "train": {"batch_size": [2, 4]}}))
    assert dotted == nested
    assert names(dotted) == ["r4-bs2", "r4-bs4", "r8-bs2", "r8-bs4"]


def test_zip_advances_together() -> None:
    adapters = expand(make_spec(zip={"adapter.rank": [4, 8, 16], "adapter.alpha": [8, 16, 32]}))
    assert [(a.adapter.rank, a.adapter.alpha) for a in adapters] == [(4, 8.0), (8, 16.0), (16, 32.0)]
    assert names(adapters) == ["r4-a8", "r8-a16", "r16-a32"]
    assert {a.adapter.scale for a in adapters} == {2.0}


def test_list_entries_and_explicit_names() -> None:
    adapters = expand(
        make_spec(
            list=({"adapter.rank": 4}, {"name": "wide", "adapter": {"rank": 64, "alpha": 128}}, {"train.batch_size": 2})
        )
    )
    assert names(adapters) == ["r4", "wide", "bs2"]
    assert [(a.adapter.rank, a.adapter.alpha, a.train.batch_size) for a in adapters] == [
        (4, 16.0, 4), (64, 128.0, 4), (8, 16.0, 2),
    ]  # fmt: skip
    assert adapters[1].varied == {"adapter.rank": 64, "adapter.alpha": 128.0}  # `name` is not a setting


def test_grid_zip_list_combine_in_that_order() -> None:
    adapters = expand(
        make_spec(
            grid={"adapter.rank": [4, 8]},
            zip={"adapter.lr": [1e-3, 3e-3], "adapter.dropout": [0.0, 0.1]},
            list=({"train.batch_size": 2}, {"train.batch_size": 8}),
        )
    )
    assert len(adapters) == 2 * 2 * 2
    settings = [(a.adapter.rank, a.adapter.lr, a.adapter.dropout, a.train.batch_size) for a in adapters]
    assert settings == [
        (4, 1e-3, 0.0, 2), (4, 1e-3, 0.0, 8), (4, 3e-3, 0.1, 2), (4, 3e-3, 0.1, 8),
        (8, 1e-3, 0.0, 2), (8, 1e-3, 0.0, 8), (8, 3e-3, 0.1, 2), (8, 3e-3, 0.1, 8),
    ]  # fmt: skip
    assert adapters[2].name == "r4-lr3e-3-do0.1-bs2"


def test_explicit_names_combine_with_grid() -> None:
    # An explicit name stands for its list entry; the grid still tells the adapters apart.
    adapters = expand(make_spec(grid={"adapter.rank": [4, 8]}, list=({"name": "x", "adapter.lr": 1e-3}, {"name": "y"})))
    assert names(adapters) == ["r4-x", "r4-y", "r8-x", "r8-y"]
    assert [a.adapter.lr for a in adapters] == [1e-3, 2e-3, 1e-3, 2e-3]


def test_seeds_repeat_every_configuration() -> None:
    adapters = expand(make_spec(grid={"adapter.rank": [4, 8]}, seeds=(1, 2, 3)))
    assert names(adapters) == ["r4-s1", "r4-s2", "r4-s3", "r8-s1", "r8-s2", "r8-s3"]
    assert [a.seed for a in adapters] == [1, 2, 3] * 2
    [single] = expand(make_spec(seeds=(5,)))
    assert (single.name, single.seed) == ("default-s5", 5)


def test_without_seeds_adapters_use_the_sweep_seed() -> None:
    spec = dataclasses.replace(make_spec(grid={"adapter.rank": [4, 8]}), seed=7)
    assert [(a.name, a.seed) for a in expand(spec)] == [("r4", 7), ("r8", 7)]


def test_only_varying_keys_name_adapters() -> None:
    # lr is set for every adapter but never varies, so it is not part of any name.
    adapters = expand(make_spec(grid={"adapter.rank": [4, 8], "adapter.lr": [3e-3]}))
    assert names(adapters) == ["r4", "r8"]
    assert {a.adapter.lr for a in adapters} == {3e-3}


def test_names_are_deterministic_and_unique() -> None:
    sweep = {"grid": {"adapter.rank": [4, 8], "train.steps_per_task": [10, 20]}, "seeds": (0, 1)}
    first, second = expand(make_spec(**sweep)), expand(make_spec(**sweep))
    assert first == second
    assert len(set(names(first))) == len(first)


def test_name_collisions_are_disambiguated() -> None:
    # Two lrs that print alike; list entries equal to each other (nothing varies: "default").
    adapters = expand(make_spec(grid={"adapter.lr": [0.123451, 0.123452]}))
    assert names(adapters) == ["lr0.1235", "lr0.1235-2"]
    same = ({"adapter.rank": 4}, {"adapter.rank": 4}, {"adapter.rank": 16})
    assert names(expand(make_spec(list=same))) == ["r4", "r4-2", "r16"]
    assert names(expand(make_spec(list=({}, {}, {})))) == ["default", "default-2", "default-3"]


def test_explicit_names_win_over_generated_ones() -> None:
    adapters = expand(make_spec(list=({"adapter.rank": 4}, {"name": "r4", "adapter.rank": 16})))
    assert [(a.name, a.adapter.rank) for a in adapters] == [("r4-2", 4), ("r4", 16)]
    # A suffix never takes a name that is already in use.
    adapters = expand(make_spec(list=({"adapter.rank": 4}, {"adapter.rank": 4}, {"name": "r4-2", "adapter.rank": 8})))
    assert names(adapters) == ["r4", "r4-3", "r4-2"]


def test_adapters_are_fully_resolved() -> None:
    adapters = expand(make_spec(grid={"adapter.rank": [4], "train.warmup_steps": [3, 5]}))
    for adapter, warmup in zip(adapters, (3, 5), strict=True):
        assert adapter.adapter == AdapterConfig(rank=4, alpha=16.0, lr=2e-3)
        assert adapter.train == TrainConfig(batch_size=4, warmup_steps=warmup)
        assert adapter.varied == {"adapter.rank": 4, "train.warmup_steps": warmup}
        assert adapter.total_steps([t.steps for t in TASKS]) == TrainConfig().steps_per_task + 7


def test_values_are_converted_like_the_fields() -> None:
    [adapter] = expand(make_spec(grid={"adapter.alpha": [32], "adapter.target_modules": [["q_proj", "v_proj"]]}))
    assert adapter.adapter.alpha == 32.0 and isinstance(adapter.adapter.alpha, float)
    assert adapter.adapter.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("value", "text"),
    [(3e-3, "3e-3"), (1e-3, "1e-3"), (2.5e-4, "2.5e-4"), (0.5, "0.5"), (16.0, "16"), (8, "8"), (True, "true"),
     (["q_proj", "v_proj"], "q_proj+v_proj"), ("a/b c", "a_b_c")],
)  # fmt: skip
def test_format_value(value: Any, text: str) -> None:
    assert format_value(value) == text


# ---------------------------------------------------------------------------------------
# Errors: every problem, each with its full key path


def test_per_value_errors_name_the_index() -> None:
    assert problems(grid={"adapter.rank": [4, "x", -1], "adapter.dropout": [0.0, 1.0]}) == [
        "sweep.grid.adapter.rank[1]: expected an integer, got 'x'",
        "sweep.grid.adapter.rank[2]: must be > 0",
        "sweep.grid.adapter.dropout[1]: must be in [0, 1)",
    ]
    assert problems(zip={"adapter.lr": [1e-3, 0]}) == ["sweep.zip.adapter.lr[1]: must be > 0"]
    assert problems(list=({"adapter.rank": 4}, {"adapter": {"alpha": 0}})) == [
        "sweep.list[1].adapter.alpha: must be > 0"
    ]


def test_unknown_keys() -> None:
    [problem] = problems(grid={"adapter.rnak": [4]})
    assert problem == "sweep.grid.adapter.rnak: unknown key 'adapter.rnak' (did you mean 'rank'?)"
    [problem] = problems(grid={"train.lr": [1e-3]})
    assert problem == "sweep.grid.train.lr: unknown key 'train.lr' (did you mean 'adapter.lr'?)"
    [problem] = problems(zip={"eval.batch_size": [4]})
    assert problem.startswith("sweep.zip.eval.batch_size: unknown key 'eval.batch_size'; a sweep varies adapter.*")
    [problem] = problems(list=({"seed": 3},))
    assert problem.startswith("sweep.list[0].seed: unknown key 'seed'")


def test_grid_needs_non_empty_lists() -> None:
    assert problems(grid={"adapter.rank": 4, "adapter.lr": []}) == [
        "sweep.grid.adapter.rank: expected a non-empty list of values",
        "sweep.grid.adapter.lr: expected a non-empty list of values",
    ]


def test_zip_lengths_must_match() -> None:
    assert problems(zip={"adapter.rank": [4, 8], "adapter.lr": [1e-3]}) == [
        "sweep.zip: lists must have equal length (adapter.rank: 2, adapter.lr: 1)"
    ]


def test_a_key_is_varied_in_one_place_only() -> None:
    assert problems(grid={"adapter.rank": [4, 8]}, list=({"adapter.rank": 16},)) == [
        "sweep.list[0].adapter.rank: 'adapter.rank' is also varied by sweep.grid; vary each key in one place"
    ]
    assert problems(grid={"adapter.lr": [1e-3]}, zip={"adapter.lr": [1e-3]}) == [
        "sweep.zip.adapter.lr: 'adapter.lr' is also varied by sweep.grid; vary each key in one place"
    ]


def test_duplicate_explicit_names_and_seeds() -> None:
    assert problems(list=({"name": "x"}, {"name": "y"}, {"name": "x"})) == [
        "sweep.list[2].name: duplicate adapter name 'x' (also sweep.list[0])"
    ]
    assert problems(list=({"name": "a b"},)) == [
        "sweep.list[0].name: a name uses letters, digits, '-', '_', '+' and '.' only"
    ]
    assert problems(seeds=(1, 2, 1)) == ["sweep.seeds[2]: duplicate seed 1"]


def test_size_limit() -> None:
    hundred = list(range(1, 101))
    # The limit itself expands, instantly (a non-varying key once made naming quadratic: ~20 s here).
    adapters = expand(make_spec(grid={"adapter.rank": hundred, "train.batch_size": hundred, "adapter.lr": [1e-3]}))
    assert len(adapters) == 10_000
    assert (adapters[0].name, adapters[-1].name) == ("r1-bs1", "r100-bs100")
    assert problems(grid={"adapter.rank": hundred, "train.batch_size": hundred}, seeds=(0, 1)) == [
        "sweep: expands to 20,000 adapters, more than the limit of 10,000"
    ]
