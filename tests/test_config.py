"""Loading sweep files: YAML -> interpolation and overrides -> a frozen, validated SweepSpec."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from helpers import MINIMAL_SWEEP, REPO, write_sweep

from mlora_cli.errors import ConfigError
from mlora_cli.spec.convert import to_plain
from mlora_cli.spec.load import load_sweep, parse_spec
from mlora_cli.spec.schema import AdapterConfig, EvalConfig, SweepConfig, SweepSpec, TaskConfig, TrainConfig
from mlora_cli.spec.sweep import expand

SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))


def load_problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_sweep(path, overrides)
    return info.value.problems


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_sweep_loads(path: Path) -> None:
    spec, resolved = load_sweep(path)
    assert expand(spec)
    assert path.read_text().startswith("#"), "a sweep file starts with a header comment"
    assert re.search(rf"mlora (run|bench) sweeps/{re.escape(path.name)}",
                     path.read_text()), "the header shows its command"
    assert parse_spec(resolved) == spec


def test_quickstart() -> None:
    spec, _ = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert (spec.name, len(spec.tasks), len(expand(spec))) == ("quickstart", 3, 8)
    assert [t.name for t in spec.tasks] == ["copy", "reverse", "sort"]
    assert spec.adapter.lr == 2e-3 and isinstance(spec.adapter.lr, float)  # YAML 1.1 would read "2e-3" as text


def test_defaults_fill_missing_sections(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP))
    assert (spec.adapter, spec.train, spec.eval, spec.sweep) == (
        AdapterConfig(),
        TrainConfig(),
        EvalConfig(),
        SweepConfig(),
    )
    assert spec.tasks[0] == TaskConfig(name="a", source="builtin:copy", train_examples=16, eval_examples=4)
    assert (spec.base_model, spec.devices, spec.seed) == ("builtin:tiny", "auto", 0)


def test_config_is_frozen(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.adapter.rank = 4  # type: ignore[misc]


def test_lists_become_tuples(tmp_path: Path) -> None:
    spec, _ = load_sweep(
        write_sweep(tmp_path, MINIMAL_SWEEP + "devices: [cpu, cpu:2]\nadapter: {target_modules: [q_proj]}\n")
    )
    assert spec.devices == ("cpu", "cpu:2")
    assert spec.adapter.target_modules == ("q_proj",)


def test_interpolation(tmp_path: Path) -> None:
    text = MINIMAL_SWEEP + (
        "adapter:\n  rank: 4\n  alpha: ${adapter.rank}\n"
        "train:\n  batch_size: 16\n  max_seq_len: 32\n"
        "eval:\n  batch_size: ${train.batch_size}\n"
        "sweep:\n  grid:\n    train.max_seq_len: ['${train.max_seq_len}', 64]\n"
    )
    spec, resolved = load_sweep(write_sweep(tmp_path, text))
    assert (spec.adapter.alpha, spec.eval.batch_size) == (4.0, 16)
    assert resolved["eval"]["batch_size"] == 16  # the saved config holds values, not `${...}`
    assert [a.train.max_seq_len for a in expand(spec)] == [32, 64]


def test_interpolation_follows_overrides(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, MINIMAL_SWEEP + "adapter:\n  rank: 4\n  alpha: ${adapter.rank}\n")
    spec, _ = load_sweep(path, ["adapter.rank=32"])
    assert (spec.adapter.rank, spec.adapter.alpha) == (32, 32.0)


def test_overrides(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {lr: 2e-3}\n")
    spec, resolved = load_sweep(path, ["adapter.lr=3e-3", "train.batch_size=2", "tasks.1.train_examples=32", "name=x"])
    assert (spec.adapter.lr, spec.train.batch_size, spec.tasks[1].train_examples, spec.name) == (3e-3, 2, 32, "x")
    assert resolved["adapter"]["lr"] == 3e-3


def test_quickstart_overrides() -> None:
    spec, _ = load_sweep(REPO / "sweeps" / "quickstart.yaml", ["adapter.lr=3e-3", "sweep.grid.adapter.rank=[4,8]"])
    adapters = expand(spec)
    assert [a.name for a in adapters] == ["r4-lr1e-3", "r4-lr3e-3", "r8-lr1e-3", "r8-lr3e-3"]
    assert spec.adapter.lr == 3e-3  # the default moved; the grid still sets each adapter's lr


@pytest.mark.parametrize(
    "grid",
    [
        "sweep:\n  grid:\n    adapter.rank: [4, 8, 16]\n    adapter.lr: [1e-3, 3e-3]\n",
        "sweep:\n  grid:\n    adapter:\n      rank: [4, 8, 16]\n      lr: [1e-3, 3e-3]\n",
        "sweep: {grid: {adapter.rank: [4, 8, 16], adapter: {lr: [1e-3, 3e-3]}}}\n",
    ],
    ids=["dotted", "nested", "mixed"],
)
def test_grid_spellings_mean_the_same(tmp_path: Path, grid: str) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP + grid))
    assert spec.sweep.grid == {"adapter": {"rank": [4, 8, 16], "lr": [1e-3, 3e-3]}}
    overridden, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP + grid), ["sweep.grid.adapter.rank=[4,8]"])
    assert overridden.sweep.grid == {"adapter": {"rank": [4, 8], "lr": [1e-3, 3e-3]}}
    assert len(expand(overridden)) == 4


def test_override_adds_a_sweep(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP), ["sweep.seeds=[1,2]", "sweep.zip.adapter.rank=[4,8]"])
    assert [a.name for a in expand(spec)] == ["r4-s1", "r4-s2", "r8-s1", "r8-s2"]


def test_numbers_convert_to_the_field_type(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {alpha: 16, lr: '1e-3'}\n"))
    assert spec.adapter.alpha == 16.0 and isinstance(spec.adapter.alpha, float)
    assert spec.adapter.lr == 1e-3
    assert load_problems(write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {lr: .nan}\n")) == [
        "adapter.lr: expected a number, got nan"
    ]
    assert load_problems(write_sweep(tmp_path, MINIMAL_SWEEP + "train: {steps_per_task: 2.5}\n")) == [
        "train.steps_per_task: expected an integer, got 2.5"
    ]


def test_nullable_fields(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, MINIMAL_SWEEP + "train: {max_grad_norm: null}\nmax_concurrent: 2\n"))
    assert (spec.train.max_grad_norm, spec.max_concurrent) == (None, 2)
    assert load_problems(write_sweep(tmp_path, MINIMAL_SWEEP + "train: {max_grad_norm: 0}\nmax_concurrent: 0\n")) == [
        "train.max_grad_norm: must be > 0",
        "max_concurrent: must be > 0",
    ]


def test_all_problems_in_one_error(tmp_path: Path) -> None:
    text = "name: 'bad name'\ntasks: [{name: a, source: 'builtin:copy', min_len: 9, max_len: 3}]\nadapter: {rank: 0}\n"
    assert load_problems(write_sweep(tmp_path, text)) == [
        "adapter.rank: must be > 0",
        "name: use letters, digits, '-', '_' and '.' only (it names the run folder)",
        "tasks[0].min_len: must be <= max_len (9 > 3)",
    ]


def test_data_files_are_relative_to_the_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qa.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    spec, _ = load_sweep(write_sweep(tmp_path, "name: t\ntasks:\n  - {name: qa, source: 'jsonl:data/qa.jsonl'}\n"))
    assert spec.tasks[0].source == "jsonl:data/qa.jsonl"


def test_every_field_has_help() -> None:
    for cls in (SweepSpec, AdapterConfig, TrainConfig, EvalConfig, TaskConfig, SweepConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_to_plain_round_trips() -> None:
    spec, _ = load_sweep(REPO / "sweeps" / "smoke.yaml")
    plain = to_plain(spec)
    assert plain["tasks"][0]["name"] == "copy" and isinstance(plain["adapter"]["target_modules"], list)
    assert parse_spec(plain) == spec


def test_train_lr_is_an_alias_of_adapter_lr() -> None:
    spec, resolved = load_sweep(REPO / "sweeps" / "quickstart.yaml", ["train.lr=3e-3", "sweep.grid.adapter.rank=[4,8]"])
    assert spec.adapter.lr == 3e-3 and "lr" not in resolved["train"] and resolved["adapter"]["lr"] == 3e-3


def test_sweep_reference_page_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_reference", REPO / "scripts" / "sweep_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (REPO / "docs" / "sweep-reference.md").read_text()
    assert module.START in page and module.END in page
    assert module.updated_page(page) == page, "run: python scripts/sweep_reference.py --write"


def test_peft_spellings_are_accepted(tmp_path: Path) -> None:
    """`target_modules` as one string, and PEFT's r / lora_alpha / lora_dropout, wherever an adapter key goes."""
    path = write_sweep(tmp_path, MINIMAL_SWEEP + """\
adapter: {r: 4, lora_alpha: 8, lora_dropout: 0.05, target_modules: all-linear}
sweep:
  grid: {adapter.r: [4, 8]}
  list: [{adapter.lora_alpha: 2}, {adapter: {lora_dropout: 0.1, target_modules: q_proj}}]
""")
    spec, _ = load_sweep(path)
    assert (spec.adapter.rank, spec.adapter.alpha, spec.adapter.dropout) == (4, 8.0, 0.05)
    assert spec.adapter.target_modules == ("all-linear",)
    adapters = expand(spec)
    assert [(a.adapter.rank, a.adapter.alpha, a.adapter.dropout, a.adapter.target_modules) for a in adapters] == [
        (4, 2.0, 0.05, ("all-linear",)), (4, 8.0, 0.1, ("q_proj",)),
        (8, 2.0, 0.05, ("all-linear",)), (8, 8.0, 0.1, ("q_proj",)),
    ]


def test_an_override_in_either_spelling_replaces_the_key_in_the_other(tmp_path: Path) -> None:
    """`adapter.r=16` on the command line over a file's `rank` (or `rank=` over `r`) replaces it, in the adapter
    section and in a grid: it is one key, not two spellings set at once."""
    ours = write_sweep(tmp_path / "ours", MINIMAL_SWEEP + "adapter: {rank: 4, alpha: 8}\n"
                                                          "sweep:\n  grid: {adapter.rank: [4, 8]}\n")
    peft = write_sweep(tmp_path / "peft", MINIMAL_SWEEP + "adapter: {r: 4, lora_alpha: 8}\n"
                                                          "sweep:\n  grid: {adapter.r: [4, 8]}\n")
    for path, overrides in ((ours, ["adapter.r=16", "adapter.lora_alpha=32", "sweep.grid.adapter.r=[2,16]"]),
                            (peft, ["adapter.rank=16", "adapter.alpha=32", "sweep.grid.adapter.rank=[2,16]"]),
                            (peft, ["adapter.r=16", "adapter.lora_alpha=32", "sweep.grid.adapter.r=[2,16]"])):
        spec, resolved = load_sweep(path, overrides)
        assert (spec.adapter.rank, spec.adapter.alpha) == (16, 32.0), overrides
        assert [a.adapter.rank for a in expand(spec)] == [2, 16] and resolved["sweep"]["grid"] == {
            "adapter": {"rank": [2, 16]}}, overrides


def test_peft_spelling_next_to_ours_and_regex_targets_are_errors(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {r: 4, rank: 8, target_modules: '.*proj'}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert error.value.problems == [
        "adapter.r: PEFT's name for adapter.rank, which is also set; keep one",
    ]
    path = write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {target_modules: '.*proj'}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert error.value.problems == [
        "adapter.target_modules: '.*proj' looks like a regex; list the module names instead "
        "(suffix match, or all-linear)",
    ]
