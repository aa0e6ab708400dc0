"""Adaptive sweeps: random / tpe trials asked from Optuna as slots free, and Optuna's pruners stopping adapters early.

Checked against the real Optuna: every pruning decision equals what a fresh study with the same pruner decides on
the same reported values; random trials' parameters are what Optuna's RandomSampler draws; the study in
RUN/search.db opens with optuna.load_study and lists every trial with its parameters and values. A pruned adapter's
slot takes the next queued one and changes no other adapter's result; `--resume` continues the same study.
Bad search specs are one line each at `mlora validate`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import builtin_tasks, kill_worker_zero_at, micro_sweep, mlora, numbers, write_sweep

from mlora_cli.run import launcher, search
from mlora_cli.spec.load import load_sweep
from mlora_cli.spec.space import halving_estimate, measuring_steps
from mlora_cli.spec.sweep import expand, search_envelope, search_space, trial_adapter

optuna = pytest.importorskip("optuna")

RTOL, ATOL = 1e-5, 1e-7

# Eight tpe trials over lr and rank on builtin:micro, three at a time, ASHA at steps 2, 4 (and 8) of 12.
SEARCH = micro_sweep(
    name="search",
    seed=3,
    devices="cpu",
    max_concurrent=3,
    tasks=builtin_tasks("copy", "reverse", train_examples=16, eval_examples=4, min_len=4, max_len=4),
    train={"steps_per_task": 6, "checkpoint_every": 2},
    eval={"metrics": ["loss"], "max_new_tokens": 4},
    sweep={"search": {"method": "tpe", "trials": 8, "metric": "loss",
                      "space": {"adapter.lr": {"log_uniform": [1e-4, 1e-1]}, "adapter.rank": {"choice": [2, 4, 8]}}},
           "prune": {"method": "asha", "min_steps": 2, "reduction_factor": 2}},
)


def sweep_with(**sweep: Any) -> dict[str, Any]:
    """SEARCH with its `sweep` section's `search` / `prune` keys changed (the rest kept)."""
    merged = {key: {**SEARCH["sweep"].get(key, {}), **sweep.get(key, {})} for key in ("search", "prune")}
    return {**SEARCH, "sweep": {**SEARCH["sweep"], **merged, **{k: v for k, v in sweep.items() if k not in merged}}}


def only_run_in(folder: Path) -> Path:
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


def assert_ran(result: Any, run_dir: Path) -> None:
    """`mlora run` ended without a failed adapter: exit 0, or 1 where the launcher still counts pruned adapters in
    run.failed (its `failed` list should hold status "failed" only; pruning is no failure)."""
    failed = json.loads((run_dir / "results.json").read_text())["run"]["failed"]
    statuses = {json.loads((run_dir / "results.json").read_text())["adapters"][name]["status"] for name in failed}
    assert result.exit_code == (1 if failed else 0) and statuses <= {"pruned"}, result.output


def run(folder: Path, sweep: dict[str, Any], **changes: Any) -> launcher.RunOutcome:
    """What `mlora run --no-plots` does, in this process."""
    path = write_sweep(folder, sweep, **changes)
    spec, resolved = load_sweep(path)
    return launcher.run_sweep(spec, resolved, path.parent, plots=False)


# ---------------------------------------------------------------------------------------
# The spec: space, trial slots, measuring steps, validation (fast)


def test_a_search_expands_into_trial_slots_that_resolve_to_optunas_parameters(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SEARCH, sweep={
        "seeds": [0, 1],
        "grid": {"adapter.strategy": ["naive", "replay"]},
        "zip": {"adapter.alpha": [4, 8], "train.batch_size": [2, 3]},
        "search": {"method": "random", "trials": 3, "metric": "loss",
                   "space": {"adapter": {"lr": {"log_uniform": [1e-4, 1e-2]}},
                             "adapter.rank": {"int": [2, 16]},
                             "adapter.target_modules": {"choice": [["q_proj"], ["q_proj", "v_proj"]]}}},
    })
    spec, _ = load_sweep(sweep)
    slots = expand(spec)
    assert [(a.name, a.trial, a.seed) for a in slots] == [
        (f"trial-{k}-s{s}", k, s) for k in range(3) for s in (0, 1)]
    space = search_space(spec)
    assert {k: d.kind for k, d in space.items()} == {
        "adapter.strategy": "choice", "sweep.zip": "choice", "adapter.lr": "log_uniform", "adapter.rank": "int",
        "adapter.target_modules": "choice"}
    assert space["adapter.target_modules"].labels == ("q_proj", "q_proj+v_proj")
    params = {"adapter.strategy": "replay", "sweep.zip": 1, "adapter.lr": 3e-3, "adapter.rank": 16,
              "adapter.target_modules": "q_proj+v_proj"}
    adapter = trial_adapter(spec, slots[1], params)
    assert (adapter.name, adapter.seed, adapter.adapter.strategy, adapter.adapter.alpha, adapter.train.batch_size,
            adapter.adapter.lr, adapter.adapter.rank, adapter.adapter.target_modules) == (
        "trial-0-s1", 1, "replay", 8.0, 3, 3e-3, 16, ("q_proj", "v_proj"))
    # The worker's engine is built to fit any trial: the space's largest rank with each target-module set.
    envelope = search_envelope(spec)
    assert {c.rank for c in envelope} == {16}
    assert {c.target_modules for c in envelope} >= {("q_proj",), ("q_proj", "v_proj")}


def test_measuring_steps_and_the_budget() -> None:
    spec = load_sweep_dict(SEARCH)
    assert measuring_steps(spec, 12) == [2, 4, 8]  # asha: rungs min_steps x factor^k before the last step
    assert measuring_steps(load_sweep_dict(sweep_with(prune={"method": "median"})), 12) == list(range(2, 12, 2))
    assert measuring_steps(load_sweep_dict(sweep_with(prune={"every_steps": 5})), 12) == [5, 10]
    assert measuring_steps(load_sweep_dict(sweep_with(prune={"method": "none"})), 12) == []
    assert halving_estimate(27, 180, [20, 60], 3) == pytest.approx(27 * 20 + 9 * 40 + 3 * 120)


def load_sweep_dict(sweep: dict[str, Any]) -> Any:
    from mlora_cli.spec.load import parse_spec, resolve

    return parse_spec(resolve(json.loads(json.dumps(sweep))))


BAD_SPECS = [
    ({"search": {"method": "bayes"}}, "sweep.search.method: must be one of grid, random, tpe, got 'bayes'"),
    ({"search": {"space": {"adapter.lr": {"uniform": [1e-2, 1e-4]}}}},
     "sweep.search.space.adapter.lr.uniform: needs lo < hi, got [0.01, 0.0001]"),
    ({"search": {"space": {"adapter.weight_decay": {"log_uniform": [0, 0.1]}}}},
     "sweep.search.space.adapter.weight_decay.log_uniform: a log scale needs bounds > 0, got [0, 0.1]"),
    ({"search": {"space": {"adapter.lr": {"log_uniform": [-1, 0.1]}}}},
     "sweep.search.space.adapter.lr.log_uniform[0]: must be > 0"),
    ({"search": {"space": {"adapter.rank": {"uniform": [2, 8]}}}},
     "sweep.search.space.adapter.rank.uniform: adapter.rank is an integer; use {int: [lo, hi]} or {log_int: [lo, hi]}"),
    ({"search": {"space": {"adapter.dropout": {"uniform": [0, 1.5]}}}},
     "sweep.search.space.adapter.dropout.uniform[1]: must be in [0, 1)"),
    ({"search": {"space": {"adapter.lr": {"log_unifrom": [1e-4, 1e-2]}}}}, "(did you mean 'log_uniform'?)"),
    ({"search": {"space": {"model.dtype": {"choice": ["float32"]}}}},
     "sweep.search.space.model.dtype: unknown key 'model.dtype'; a sweep varies adapter.* and train.* keys"),
    ({"search": {"space": {"adapter.init_from": {"choice": ["a"]}}}},
     "sweep.search.space.adapter.init_from: not searchable"),
    ({"search": {"trials": 0}}, "sweep.search.trials: must be > 0"),
    ({"search": {"trials": None}}, "sweep.search.trials: required with method tpe"),
    ({"search": {"metric": "exact_match"}}, "sweep.search.metric: 'exact_match' is not evaluated (eval.metrics: loss)"),
    ({"search": {"metric": None}}, "sweep.search.metric: required with prune.method asha"),
    ({"search": {"method": "grid", "space": {}, "trials": None, "metric": None}},
     "sweep.search.metric: required with prune.method asha"),
    ({"grid": {"adapter.rank": [2, 4]}},
     "sweep.search.space.adapter.rank: 'adapter.rank' is also varied by sweep.grid; vary each key in one place"),
    ({"grid": {"adapter.init_from": ["/a", "/b"]}},
     "sweep.grid.adapter.init_from: not searchable with method tpe (a warm start's rank and alpha must match it)"),
    ({"list": [{"adapter.weight_decay": 0.0}, {"adapter.init_from": "/a"}]},
     "sweep.list[1].adapter.init_from: not searchable with method tpe"),
    ({"prune": {"method": "hyperband"}}, "sweep.prune.method: must be one of none, asha, median, got 'hyperband'"),
    ({"prune": {"min_steps": 12}}, "sweep.prune.min_steps: 12 is not below the 12 steps a trial trains: nothing "
                                   "would be pruned (a trial is judged before its last step)"),
    ({"prune": {"method": "median", "every_steps": 12}},
     "sweep.prune.every_steps: 12 measures the objective no earlier than the last of the 12 steps a trial trains"),
    ({"prune": {"reduction_factor": 1}}, "sweep.prune.reduction_factor: must be >= 2"),
]


@pytest.mark.parametrize(("change", "line"), BAD_SPECS, ids=[line.split(":")[0] + f"-{i}"
                                                              for i, (_, line) in enumerate(BAD_SPECS)])
def test_a_bad_search_spec_is_one_line_at_validate(tmp_path: Path, change: dict[str, Any], line: str) -> None:
    result = mlora("validate", write_sweep(tmp_path, sweep_with(**change)))
    assert result.exit_code == 2, result.output
    lines = [text for text in result.output.splitlines() if text.strip()]
    assert len(lines) == 1 and line in lines[0], lines


def test_a_warm_start_under_a_searched_rank_is_one_line_at_validate(tmp_path: Path) -> None:
    """Trial slots hold the defaults, so the warm start's own check would pass them; every trial's rank varies."""
    sweep = {**SEARCH, "adapter": {**SEARCH.get("adapter", {}), "init_from": str(tmp_path / "warm")}}
    result = mlora("validate", write_sweep(tmp_path, sweep))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("adapter.init_from: a warm start fixes the rank and alpha it was trained with; "
                                     "method tpe searches adapter.rank"), result.output


def test_dry_run_shows_the_space_and_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "visible_cuda_devices", lambda: 0)
    result = mlora("run", write_sweep(tmp_path, SEARCH), "--dry-run", columns=120)
    assert result.exit_code == 0, result.output
    for text in ("search: search, study in RUN/search.db", "adapter.lr", "log_uniform [0.0001, 0.1]",
                 "choice of 2, 4, 8", "8, asked from Optuna's tpe sampler as slots free", "loss over the seen tasks",
                 "asha at steps 2, 4, 8", "at most 96 steps (no trial pruned); about 36 if every rung keeps 1/2"):
        assert text in result.output, text
    assert "the space holds" not in result.output  # a float range: no count of configurations
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("trials", "says"), [(6, "the space holds 6 configurations"),
                                              (7, "the space holds only 6 configurations: a suggestion")])
def test_dry_run_counts_a_space_of_choices_and_says_when_trials_would_use_it_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trials: int, says: str
) -> None:
    monkeypatch.setattr(launcher, "visible_cuda_devices", lambda: 0)
    sweep = sweep_with(search={"trials": trials, "space": {"adapter.rank": {"choice": [2, 4]},
                                                           "train.warmup_steps": {"int": [0, 2]}}})
    result = mlora("run", write_sweep(tmp_path, sweep), "--dry-run", columns=200)
    assert result.exit_code == 0, result.output
    assert says in " ".join(result.output.split()), result.output


# ---------------------------------------------------------------------------------------
# End to end on builtin:micro / builtin:tiny, in this process: the slow tier.


class Recorder:
    """Every ask, report (with the pruner's decision) and tell of the run's Search, in the order they happened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[Any, ...]] = []
        real_begin, real_judge, real_close = search.Search.begin, search.Search.judge, search.Search.close

        def begin(this: search.Search, slot: Any) -> Any:
            adapter = real_begin(this, slot)
            self.events.append(("ask", slot.name))
            return adapter

        def judge(this: search.Search, name: str, step: int, value: float) -> Any:
            pruned = real_judge(this, name, step, value)
            self.events.append(("report", name, step, value, pruned is not None))
            return pruned

        def close(this: search.Search, name: str, status: str, value: float | None) -> None:
            real_close(this, name, status, value)
            self.events.append(("tell", name, status, value))

        monkeypatch.setattr(search.Search, "begin", begin)
        monkeypatch.setattr(search.Search, "judge", judge)
        monkeypatch.setattr(search.Search, "close", close)

    def replay(self, pruner: Any, direction: str) -> list[bool]:
        """The same asks, reports and tells on a fresh in-memory study with `pruner`: its decisions, in order."""
        study = optuna.create_study(direction=direction, pruner=pruner)
        trials, decisions = {}, []
        for event in self.events:
            if event[0] == "ask":
                trials[event[1]] = study.ask()
            elif event[0] == "report":
                _, name, step, value, _ = event
                trials[name].report(value, step)
                decisions.append(trials[name].should_prune())
            else:
                _, name, status, value = event
                state = {"done": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
                study.tell(trials[name], value if status == "done" else None,
                           state=state.get(status, optuna.trial.TrialState.FAIL))
        return decisions


def test_the_median_pruners_startup_counts_trained_trials_not_told_repeats(tmp_path: Path) -> None:
    """Over two ranks, trial-1's first suggestion repeats trial-0's and is told its value (a COMPLETE trial nothing
    trained). With startup_trials 2 only one trained trial has completed when trial-1 reports, so it is not pruned,
    as Optuna's MedianPruner decides on the trained trials' values alone (the repeat counted, it was)."""
    sweep = sweep_with(search={"method": "random", "trials": 2, "metric": "loss",
                               "space": {"adapter.rank": {"choice": [2, 4]}}},
                       prune={"method": "median", "min_steps": 1, "startup_trials": 2})
    spec = load_sweep_dict({**sweep, "seed": 0})
    searching = search.Search(spec, tmp_path)
    first, second = expand(spec)
    searching.begin(first)
    searching.judge(first.name, 1, 4.0)
    searching.close(first.name, "done", 3.9)
    searching.begin(second)
    repeats = [t for t in searching.study.get_trials() if "repeat_of" in t.user_attrs]
    assert repeats and repeats[0].state == optuna.trial.TrialState.COMPLETE  # else pick another seed
    decided = searching.judge(second.name, 1, 5.0)

    fresh = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=1))
    trained = fresh.ask()
    trained.report(4.0, 1)
    fresh.tell(trained, 3.9)
    judged = fresh.ask()
    judged.report(5.0, 1)
    assert not judged.should_prune()  # Optuna's own, on the trained trials' values
    assert decided is None


def test_the_trials_table_ranks_finished_trials_by_their_objective_whatever_their_steps() -> None:
    """Steps order pruned trials (the furthest first); finished ones rank by the objective even when
    train.steps_per_task is searched and the better trial trained fewer steps."""
    from rich.console import Console

    from mlora_cli.report.trials import trials_table

    def entry(name: str, status: str, steps: int, loss: float) -> dict[str, Any]:
        return {"name": name, "status": status, "steps": steps, "varied": {"train.steps_per_task": steps},
                "trial": {"number": int(name[-1]), "direction": "minimize", "metric": "loss", "over": "seen",
                          "objective": loss}}

    entries = [entry("trial-0", "done", 4, 4.1), entry("trial-1", "done", 16, 4.6),
               entry("trial-2", "pruned", 2, 3.0), entry("trial-3", "pruned", 8, 5.0)]
    console = Console(width=120, record=True)
    console.print(trials_table({"run": {"name": "t"}, "adapters": {e["name"]: e for e in entries}}, 120))
    order = [line.split()[3] for line in console.export_text().splitlines() if "trial-" in line]
    assert order == ["trial-0", "trial-1", "trial-3", "trial-2"], console.export_text()


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("method", ["asha", "median"])
def test_pruning_decisions_equal_optunas_on_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    recorder = Recorder(monkeypatch)
    sweep = sweep_with(prune={"method": method, "startup_trials": 2})
    outcome = run(tmp_path, sweep)

    decisions = [event[4] for event in recorder.events if event[0] == "report"]
    assert True in decisions and False in decisions, decisions  # something was pruned, something promoted
    spec = load_sweep_dict(sweep)
    assert recorder.replay(search.make_pruner(optuna, spec), "minimize") == decisions
    results = outcome.results["adapters"]
    pruned = {e[1] for e in recorder.events if e[0] == "report" and e[4]}
    assert {name for name, entry in results.items() if entry["status"] == "pruned"} == pruned
    for name in pruned:  # the step and what the pruner compared, in results.json
        record = results[name]["trial"]["pruned"]
        assert record["step"] == results[name]["steps"] == results[name]["trial"]["reports"][-1]["step"]
        if method == "asha":  # the rung's values, its own among them
            assert record["rung"] is not None and record["value"] in record["rung_values"]
        else:  # the completed trials' values at that step
            assert record["rung"] is None and record["rung_values"]
    # Each pruned slot took the next queued trial at once: every trial ran, never more than 3 at a time.
    assert len(results) == 8 and all(entry["steps"] > 0 for entry in results.values())


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_random_trials_come_from_optuna_and_the_study_opens_with_optuna(tmp_path: Path) -> None:
    sweep = sweep_with(search={"method": "random"})
    outcome = run(tmp_path, sweep)
    run_dir = outcome.run_dir
    spec = load_sweep_dict(sweep)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{run_dir / 'search.db'}")
    trials = study.get_trials()
    results = outcome.results["adapters"]
    assert [t.user_attrs["adapter"] for t in trials] == list(results) == [f"trial-{k}" for k in range(8)]
    distributions = {k: search.distribution(optuna, d) for k, d in search_space(spec).items()}
    states = {"done": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}
    for trial in trials:
        entry = results[trial.user_attrs["adapter"]]
        assert trial.params == entry["trial"]["params"] and trial.number == entry["trial"]["number"]
        assert trial.state == states[entry["status"]]
        assert trial.intermediate_values == {r["step"]: r["value"] for r in entry["trial"]["reports"]}
        if entry["status"] == "done":
            assert trial.value == entry["trial"]["objective"] == pytest.approx(entry["cl_metrics"]["loss"]["acc"])
        assert entry["config"]["adapter"]["lr"] == trial.params["adapter.lr"]
        assert entry["config"]["adapter"]["rank"] == trial.params["adapter.rank"]
        # Drawn by Optuna's RandomSampler, seeded by the run's seed and the configuration's index.
        fresh = optuna.create_study(sampler=optuna.samplers.RandomSampler(
            seed=search.sampler_seed(spec.seed, trial.user_attrs["configuration"])))
        assert fresh.ask(distributions).params == trial.params
    assert len({t.params["adapter.lr"] for t in trials}) == 8


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_pruned_slot_is_refilled_and_changes_no_other_adapters_result(tmp_path: Path) -> None:
    """`slow` (lr 1e-7, learns nothing) is pruned at ASHA's first rung against `keep`, which reported first; its
    slot takes `late` at once. `keep` ends exactly as when it trains alone under the same pruning."""
    tasks = builtin_tasks("copy", "reverse", train_examples=32, eval_examples=8, min_len=4, max_len=4)
    sweep = micro_sweep(
        name="refill", base_model="builtin:tiny", devices="cpu", max_concurrent=2, tasks=tasks,
        adapter={"rank": 4, "lr": 3e-3, "target_modules": ["q_proj", "v_proj"]},
        train={"steps_per_task": 4, "batch_size": 4, "max_seq_len": 24},
        eval={"metrics": ["loss"]},
        sweep={"list": [{"name": "keep"}, {"name": "slow", "adapter.lr": 1e-7}, {"name": "late", "adapter.rank": 2}],
               "search": {"metric": "loss"}, "prune": {"method": "asha", "min_steps": 2, "reduction_factor": 2}})
    events: list[dict[str, Any]] = []
    path = write_sweep(tmp_path / "with", sweep)
    spec, resolved = load_sweep(path)
    outcome = launcher.run_sweep(spec, resolved, path.parent, emit=events.append, plots=False)
    results = outcome.results["adapters"]
    assert results["slow"]["status"] == "pruned" and results["slow"]["steps"] == 2
    record = results["slow"]["trial"]["pruned"]
    assert (record["step"], record["rung"]) == (2, 0)
    assert record["rung_values"] == [results["keep"]["trial"]["reports"][0]["value"], record["value"]]
    assert results["keep"]["status"] == "done"
    # `late` trained in the freed slot from the next step on, beside `keep`: never three at a time.
    steps = [[r["adapter"] for r in e["records"]] for e in events if e["event"] == "step"]
    assert steps[:3] == [["keep", "slow"], ["keep", "slow"], ["keep", "late"]]
    alone = run(tmp_path / "alone", {**sweep, "sweep": {**sweep["sweep"], "list": [{"name": "keep"}]}})
    expected, entry = alone.results["adapters"]["keep"], results["keep"]
    for key in ("final", "matrix", "curve", "steps", "train_tokens"):
        got, want = numbers(entry[key]), numbers(expected[key])
        assert got.keys() == want.keys(), key
        for where, value in want.items():
            assert got[where] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{key}{where}"
    assert entry["trial"]["objective"] == pytest.approx(expected["trial"]["objective"], rel=RTOL)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_resume_continues_the_study_with_the_same_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C when the sixth trial is asked (some trials finished or pruned, others mid-task), then `--resume`:
    the same trials, numbers, parameters, decisions and results as a run never stopped; finished trials kept."""
    reference = run(tmp_path / "reference", SEARCH)

    real_begin, asked = search.Search.begin, []

    def ctrl_c_at_the_sixth(this: search.Search, slot: Any) -> Any:
        asked.append(slot.name)
        if len(asked) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return real_begin(this, slot)

    with monkeypatch.context() as patch:
        patch.setattr(search.Search, "begin", ctrl_c_at_the_sixth)
        result = mlora("run", write_sweep(tmp_path / "stopped", SEARCH), "--no-plots")
    assert result.exit_code == 130, result.output
    run_dir = only_run_in(tmp_path / "stopped")
    ended = {p.name.removesuffix(".result.json"): p.read_bytes() for p in (run_dir / "state").glob("*.result.json")}
    assert 0 < len(ended) < 8
    study = optuna.load_study(study_name=None, storage=search.storage_url(run_dir))
    assert len(study.trials) >= 6 and any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)

    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert_ran(result, run_dir)
    for name, data in ended.items():  # finished before the stop: not run again
        assert (run_dir / "state" / f"{name}.result.json").read_bytes() == data
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    expected = reference.results["adapters"]
    assert list(results) == list(expected)
    for name, want in expected.items():
        got = results[name]
        assert (got["status"], got["steps"], got["trial"]["number"], got["trial"]["params"]) == (
            want["status"], want["steps"], want["trial"]["number"], want["trial"]["params"]), name
        assert got["trial"]["objective"] == pytest.approx(want["trial"]["objective"], rel=RTOL), name
    trials = optuna.load_study(study_name=None, storage=search.storage_url(run_dir)).get_trials()
    reference_trials = optuna.load_study(study_name=None, storage=search.storage_url(reference.run_dir)).get_trials()
    assert [(t.number, t.state, t.params) for t in trials] == [(t.number, t.state, t.params) for t in reference_trials]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("rung", [2, 6], ids=["mid-task", "task-end"])
def test_a_prune_decided_before_a_crash_is_kept_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rung: int
) -> None:
    """The run dies between a pruning decision and the pruned adapter's result (a kill, a full disk): `--resume`
    prunes it where it was pruned, though asking ASHA again would not (it counts the rung as passed), and ends as a
    run never stopped. At a task end the adapter's state was saved after the decision: it is not judged again."""
    sweep = sweep_with(prune={"min_steps": rung})
    reference = run(tmp_path / "reference", sweep)
    assert any(e["status"] == "pruned" for e in reference.results["adapters"].values())

    from mlora_cli.run import worker as worker_module

    real_finish = worker_module.Worker.finish

    def crash_at_the_first_prune(this: Any, progress: Any, failure: Any = None, pruned: Any = None) -> None:
        if pruned is not None:
            raise RuntimeError("killed")
        real_finish(this, progress, failure, pruned)

    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(worker_module.Worker, "finish", crash_at_the_first_prune)
        run(tmp_path / "crashed", sweep)
    run_dir = only_run_in(tmp_path / "crashed")
    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert_ran(result, run_dir)
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    for name, want in reference.results["adapters"].items():
        got = results[name]
        assert (got["status"], got["steps"], got["trial"]["params"]) == (
            want["status"], want["steps"], want["trial"]["params"]), name
        assert got["trial"]["objective"] == pytest.approx(want["trial"]["objective"], rel=RTOL), name


def test_steps_judged_and_kept_before_a_stop_are_kept_again_on_resume(tmp_path: Path) -> None:
    """Median pruning every step: trial-1 is kept at step 1 and pruned at step 2, and the run dies before its result
    is written. Resumed from a state before step 1, it passes step 1 again: kept, as before the stop (the pruner,
    asked again, would judge its latest report, step 2's, and prune it there), then pruned at step 2."""
    sweep = sweep_with(search={"method": "random", "trials": 2},
                       prune={"method": "median", "min_steps": 1, "every_steps": 1, "startup_trials": 1})
    spec = load_sweep_dict(sweep)
    first, second = expand(spec)
    before = search.Search(spec, tmp_path)
    before.begin(first)
    assert before.judge(first.name, 1, 2.0) is None and before.judge(first.name, 2, 1.0) is None
    before.close(first.name, "done", 1.0)
    before.begin(second)
    assert before.judge(second.name, 1, 1.5) is None  # better than trial-0's 2.0 at step 1
    pruned = before.judge(second.name, 2, 1.6)  # its best, 1.5, is worse than trial-0's 1.0 at step 2
    assert pruned is not None and pruned["step"] == 2
    # the run dies here: trial-1's result is not written, its trial stays RUNNING

    after = search.Search(spec, tmp_path, resume=True)
    assert after.begin(second).name == second.name
    assert after.judge(second.name, 1, 1.5) is None
    assert after.judge(second.name, 2, 1.6) == pruned


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_damaged_or_missing_study_is_one_line_on_resume(tmp_path: Path) -> None:
    """`--resume` of a search whose search.db is damaged, or gone (a new study would ask other trials for the saved
    states), stops with one line naming the file, exit 2, before anything trains."""
    outcome = run(tmp_path, sweep_with(search={"trials": 3}))
    database = outcome.run_dir / "search.db"
    database.write_bytes(database.read_bytes()[:3000])

    def problems() -> list[str]:  # what it printed, but the progress view's header
        result = mlora("run", "--resume", outcome.run_dir, "--no-plots")
        assert result.exit_code == 2, result.output
        return [line for line in result.output.splitlines() if line.strip() and not line.startswith("resuming ")]

    (line,) = problems()
    assert line.startswith(f"{database}: cannot be read (") and "the search's study is damaged" in line, line
    database.unlink()
    assert problems() == [f"{database}: missing; it holds the search's trials so far, which --resume continues: "
                          "put it back, or start the sweep again"]


def test_a_full_disk_under_the_study_is_mloras_storage_error(tmp_path: Path) -> None:
    """SQLite's "disk is full", as SQLAlchemy raises it from inside Optuna, is the run's StorageError (one line, the
    `--resume` hint), not a traceback; any other exception passes through as it is."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from mlora_cli.errors import StorageError

    searching = search.Search(load_sweep_dict(SEARCH), tmp_path)
    full = OperationalError("INSERT INTO trial_values ...", {}, sqlite3.OperationalError("database or disk is full"))
    with pytest.raises(StorageError) as raised, searching.lock():
        raise full
    assert str(raised.value) == f"cannot write {tmp_path / 'search.db'}: database or disk is full"
    with pytest.raises(KeyError), searching.lock():
        raise KeyError("not the study's")


def test_a_trial_asked_when_the_run_was_killed_is_failed_on_resume(tmp_path: Path) -> None:
    """A kill inside an ask leaves a RUNNING trial no adapter names; the next Search of the run fails it, so no
    trial stays RUNNING for ever (and TPE's constant liar, where used, does not count it)."""
    spec = load_sweep_dict(sweep_with(search={"method": "random"}))
    first = search.Search(spec, tmp_path)
    first.study.ask(first.distributions)  # killed here: `begin` never named its adapter
    named = first.begin(expand(spec)[0])
    states = optuna.trial.TrialState
    assert [t.state for t in first.study.get_trials()] == [states.RUNNING, states.RUNNING]

    again = search.Search(spec, tmp_path, resume=True)
    trials = again.study.get_trials()
    assert [t.state for t in trials] == [states.FAIL, states.RUNNING]
    assert trials[1].user_attrs["adapter"] == named.name


@pytest.mark.slow
def test_a_dead_workers_trials_fail_with_their_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process killed while it trains a trial: the trial's failed entry in results.json holds the settings
    Optuna gave it (not its slot's defaults), as adapters.json does; a trial never begun keeps the defaults."""
    killed = kill_worker_zero_at(monkeypatch, lambda event: event["event"] == "step")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    sweep = sweep_with(search={"method": "random", "trials": 2}, prune={"method": "none"})
    sweep = {**sweep, "devices": "cpu:1", "max_concurrent": 1, "train": {**sweep["train"], "steps_per_task": 200}}
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots")

    assert killed and result.exit_code == 1, result.output
    run_dir = only_run_in(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    listed = {e["name"]: e for e in json.loads((run_dir / "adapters.json").read_text())}
    begun, never = results["trial-0"], results["trial-1"]
    assert begun["status"] == never["status"] == "failed"
    assert set(begun["varied"]) == {"adapter.lr", "adapter.rank"} and begun["varied"] == listed["trial-0"]["varied"]
    assert begun["config"] == {"adapter": listed["trial-0"]["adapter"], "train": listed["trial-0"]["train"]}
    assert never["varied"] == {} == listed["trial-1"]["varied"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_seeds_run_each_trial_once_per_seed_with_the_same_parameters(tmp_path: Path) -> None:
    outcome = run(tmp_path, sweep_with(search={"method": "random", "trials": 3}, prune={"method": "none"},
                                       seeds=[0, 1]))
    results = outcome.results["adapters"]
    assert list(results) == [f"trial-{k}-s{s}" for k in range(3) for s in (0, 1)]
    for k in range(3):
        first, second = results[f"trial-{k}-s0"], results[f"trial-{k}-s1"]
        assert first["trial"]["params"] == second["trial"]["params"] and (first["seed"], second["seed"]) == (0, 1)
        assert first["status"] == second["status"] == "done"
    trials = optuna.load_study(study_name=None, storage=search.storage_url(outcome.run_dir)).get_trials()
    assert sorted((t.user_attrs["configuration"], t.user_attrs["seed"]) for t in trials) == [
        (k, s) for k in range(3) for s in (0, 1)]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_two_worker_processes_share_one_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # cpu:2: one torch thread per worker
    outcome = run(tmp_path, SEARCH, devices="cpu:2")
    workers = outcome.results["run"]["workers"]
    assert len(workers) == 2 and all(w["adapters"] for w in workers)
    results = outcome.results["adapters"]
    trials = optuna.load_study(study_name=None, storage=search.storage_url(outcome.run_dir)).get_trials()
    assert [t.number for t in trials] == list(range(8))  # every trial asked once, from either process
    assert sorted(t.user_attrs["adapter"] for t in trials) == sorted(results)
    for trial in trials:
        entry = results[trial.user_attrs["adapter"]]
        assert entry["trial"]["number"] == trial.number and entry["trial"]["params"] == trial.params
        assert trial.state.is_finished() and entry["status"] in ("done", "pruned")


@pytest.mark.slow
def test_a_trials_settings_reach_adapters_json_mlora_eval_and_the_trackers(tmp_path: Path) -> None:
    """Trial slots start with the defaults; once Optuna gives a trial its parameters, adapters.json holds them (so
    `mlora eval` scores each checkpoint with the trial's own max_seq_len) and so do the trackers' run parameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep = sweep_with(search={"method": "random", "trials": 3, "metric": "loss", "space": {
        "train.max_seq_len": {"choice": [8, 24]}, "adapter.rank": {"choice": [2, 4]}}}, prune={"method": "none"})
    sweep = {**sweep, "seed": 0, "tasks": sweep["tasks"][:1], "logging": {"trackers": ["tensorboard"]},
             "train": {**sweep["train"], "steps_per_task": 3, "max_seq_len": 24}}
    path = write_sweep(tmp_path, sweep)
    assert mlora("run", path, "--no-plots").exit_code == 0
    run_dir = only_run_in(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    listed = {e["name"]: e for e in json.loads((run_dir / "adapters.json").read_text())}
    assert {e["config"]["train"]["max_seq_len"] for e in results.values()} == {8, 24}  # else pick another seed
    for name, entry in results.items():
        assert listed[name]["varied"] == entry["varied"] == {"train.max_seq_len": entry["trial"]["params"][
            "train.max_seq_len"], "adapter.rank": entry["trial"]["params"]["adapter.rank"]}
        assert {"adapter": listed[name]["adapter"], "train": listed[name]["train"]} == entry["config"]
        events = EventAccumulator(str(run_dir / "tensorboard" / name))
        events.Reload()
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["adapter.rank"].number_value == entry["config"]["adapter"]["rank"]
        assert start.hparams["train.max_seq_len"].number_value == entry["config"]["train"]["max_seq_len"]

    evaluated = mlora("eval", run_dir)
    assert evaluated.exit_code == 0, evaluated.output
    (eval_dir,) = (run_dir / "evals").iterdir()
    again = json.loads((eval_dir / "results.json").read_text())["adapters"]
    for name, entry in results.items():
        assert again[name]["config"] == entry["config"] and again[name]["varied"] == entry["varied"]
        assert again[name]["final"]["copy"]["loss"] == pytest.approx(entry["final"]["copy"]["loss"], rel=1e-5)


def test_a_repeated_suggestion_is_told_the_earlier_outcome_not_trained_again(tmp_path: Path) -> None:
    """Over a space of 4 configurations, 4 random trials: every trained adapter has its own configuration; each
    suggestion of one already tried is in the study told that trial's outcome (as Optuna's FAQ does), untrained."""
    sweep = sweep_with(search={"method": "random", "trials": 4, "space": {
        "adapter.rank": {"choice": [2, 4]}, "adapter.lr": {"choice": [1e-3, 1e-2]}}}, prune={"method": "none"})
    sweep = {**sweep, "train": {**sweep["train"], "steps_per_task": 2}}
    outcome = run(tmp_path, sweep)
    results = outcome.results["adapters"]
    assert len(results) == 4 and {e["status"] for e in results.values()} == {"done"}
    configurations = {(e["trial"]["params"]["adapter.rank"], e["trial"]["params"]["adapter.lr"])
                      for e in results.values()}
    assert len(configurations) == 4  # all four tried once: none trained twice
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{outcome.run_dir / 'search.db'}")
    trials = study.get_trials()
    repeats = [t for t in trials if "repeat_of" in t.user_attrs]
    assert repeats, "the seeded random sampler repeated no suggestion: pick another seed for this test"
    for repeat in repeats:
        original = trials[repeat.user_attrs["repeat_of"]]
        assert "adapter" in original.user_attrs and "adapter" not in repeat.user_attrs
        assert (repeat.params, repeat.state, repeat.value) == (original.params, original.state, original.value)
    assert len(trials) == 4 + len(repeats)


def test_when_the_space_is_used_up_the_repeat_is_trained_and_reports_to_its_pruner(tmp_path: Path) -> None:
    """3 trials over a space of 2 configurations, one at a time, with ASHA: the third trial's suggestions can only
    repeat finished trials, so its first is trained at once (not told, nor MAX_REPEATS more asked: each would add
    a told trial to the study), as a live trial its pruner judges (it used to be one already told, and its first
    report raised Optuna's UpdateFinishedTrialError)."""
    sweep = sweep_with(search={"method": "random", "trials": 3, "space": {"adapter.rank": {"choice": [2, 4]}}},
                       prune={"method": "asha", "min_steps": 2, "reduction_factor": 2})
    sweep = {**sweep, "max_concurrent": 1, "train": {**sweep["train"], "steps_per_task": 2}}
    outcome = run(tmp_path, sweep)
    results = outcome.results["adapters"]
    assert len(results) == 3 and {e["status"] for e in results.values()} <= {"done", "pruned"}
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{outcome.run_dir / 'search.db'}")
    trials = study.get_trials()
    trained = [t for t in trials if "adapter" in t.user_attrs]
    assert len(trained) == 3 and len({t.params["adapter.rank"] for t in trained}) == 2
    last = max(trained, key=lambda t: t.number)
    assert last.number == max(t.number for t in trials)  # the study ends with it
    assert last.number == sorted(t.number for t in trained)[1] + 1  # asked once: no repeat told before it
    assert "repeat_of" not in last.user_attrs and 2 in last.intermediate_values  # reported at its rung
    assert all(t.state.is_finished() for t in trials)


@pytest.mark.slow
def test_the_replay_of_a_search_on_its_grids_values_asks_and_prunes_what_the_search_did(tmp_path: Path) -> None:
    """scripts/search-replay.py's premise: the full grid's values are every value a search of the same space is told,
    so replaying mlora's Search on them with the run's own sampler seed ends every trial as the real search did."""
    from mlora_cli.bench.search_replay import replay_report

    sweep = sweep_with(search={"method": "tpe", "trials": 6, "space": {}},
                       grid={"adapter.rank": [2, 4, 8], "adapter.lr": [1e-3, 3e-3, 1e-2]})  # as sweeps/search.yaml
    path = write_sweep(tmp_path, sweep, max_concurrent=1)  # run with 2 slots: bench-search.py's --set below
    searched = launcher.run_sweep(*load_sweep(path, ["max_concurrent=2"]), path.parent, plots=False)
    grid_spec, grid_resolved = load_sweep(path, ["sweep.search.method=grid", "sweep.search.trials=null",
                                                 "sweep.prune.method=none", "eval.every_steps=2"])  # at the rungs
    grid = launcher.run_sweep(grid_spec, grid_resolved, path.parent, plots=False)
    assert len(grid.results["adapters"]) == 9
    statuses = {e["status"] for e in searched.results["adapters"].values()}
    assert statuses == {"done", "pruned"}, "no trial was pruned: pick another seed for this test"
    said: list[str] = []
    with pytest.raises(ValueError, match="evaluated inside tasks"):  # its own wall is not the grid's
        replay_report(path, grid.run_dir, searched.run_dir, seeds=2, process_trial_seconds=1.0, say=said.append)
    # As scripts/bench-search.py leaves it when stopped before its per-process baseline, beside the runs: the
    # overrides the runs had (a GPU this machine lacks among them), the walls measured around the processes.
    report = {"overrides": ["devices=cuda:0", "max_concurrent=2"], "grid": {"wall_s": 1.0},
              "search": {"wall_s": searched.results["run"]["wall_seconds"]}, "process_per_trial": None}
    (tmp_path / "bench-search.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="no process-per-trial walls"):
        replay_report(path, grid.run_dir, searched.run_dir, seeds=2, say=said.append)
    summary = replay_report(path, grid.run_dir, searched.run_dir, seeds=2, process_trial_seconds=1.0, say=said.append)
    assert summary["seed_0"]["agree"] == summary["seed_0"]["trials"] == 6, said
    assert len(summary["variants"]["as written with max_concurrent=2"]) == 2 and len(summary["process_per_trial"]) == 2


def test_a_search_refuses_the_ray_backend_before_anything_starts(tmp_path: Path) -> None:
    from mlora_cli.errors import ConfigError

    path = write_sweep(tmp_path, SEARCH)
    spec, resolved = load_sweep(path)
    with pytest.raises(ConfigError) as caught:
        launcher.run_sweep(spec, resolved, path.parent, plots=False, backend="ray")
    assert caught.value.problems == ["sweep.search / sweep.prune: the study is a SQLite file in the run folder, "
                                     "which Ray actors do not share; run it with --backend local"]
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.yaml"]  # no run folder, no worker, no Ray
