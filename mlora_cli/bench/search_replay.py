"""Replay adaptive searches against a co-trained grid's results: the time to target over many sampler seeds.

`scripts/search-replay.py` runs it (docs/search.md). One run of `scripts/bench-search.py` is one draw: when TPE
happens to ask the best configuration decides its time to target. An adapter's results depend on its settings and
seed, so the full grid's run (every configuration of the space trained to the end, evaluated at the search's
measuring steps) holds the values any search of that space would be told, up to rounding: a trial that starts
beside neighbours at other steps gets other padded batches, which round differently in the last bit, and training
amplifies that (docs/design.md#exactness; on sweeps/search-bench.yaml, 3 of the 9 configurations its search
trained to the end ended up to 2 pp of final ACC away from the grid's). This replays, for many sampler seeds:

- mlora's own search: `run.search.Search` as a worker drives it (Optuna's sampler through ask-and-tell, the
  sweep's pruner, a repeated suggestion told and not trained), slots refilled as in `run.worker`, time advanced
  by a cost model measured on SEARCH_RUN (a real run of the same sweep): a fused step with n adapters costs
  a + b x n seconds (least squares over its metrics.jsonl), an adapter's evaluation its mean eval seconds (the
  base evaluated once, as a worker keeps its scores for every later adapter: eval.base_rows), and
  the process start the part of SEARCH_RUN's wall the steps and evaluations do not explain;
- Optuna driving one fresh process per trial: TPE asked one trial after another (the same space, repeats told
  their earlier value), each trial costing `--process-trial-seconds` (bench-search.json's mean trial wall).

Sampler seed 0 is the search as `mlora run` draws it: the replay must ask the trials SEARCH_RUN asked, prune the
ones it pruned, and its modelled times should sit near the measured ones (both are printed: check them first).
Every other seed k draws the sampler from (run seed, k, configuration). What it prints are distributions (median,
quartiles, how often 3x / 8x), for the search as written and for the variants given (`--variant` overrides of
the sweep such as max_concurrent or the pruner's; `--sampler` another Optuna sampler or TPE's options;
`--promoted-first`). Times are
modelled, not measured: the real benchmark stays bench-search.py. `--cost` replaces the measured cost model by
another machine's (a model, not a measurement), the grid's wall then modelled too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

import mlora_cli.run.search as search_module
from mlora_cli.contract import MAX_REPEATS
from mlora_cli.spec.load import load_sweep
from mlora_cli.spec.plan import WorkerPlan
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.space import Dimension, measuring_steps
from mlora_cli.spec.sweep import expand, search_space

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler", "qmc": "QMCSampler"}


def label_key(varied: dict[str, Any]) -> tuple:
    """A configuration's identity: its varied keys and their values as Optuna's labels."""
    return tuple(sorted((k, Dimension("choice", choices=(v,)).labels[0]) for k, v in varied.items()))


def task_ends(spec: SweepSpec) -> set[int]:
    """The steps (over the sequence) at which the sweep's adapters end a task, its defaults' task lengths."""
    lengths = expand(spec)[0].task_steps([t.steps for t in spec.tasks])
    return {sum(lengths[:k + 1]) for k in range(len(lengths))}


def reaches(spec: SweepSpec, target: float) -> Callable[[float], bool]:
    """Whether an objective value reaches `target` in the search's direction."""
    return (lambda v: v <= target) if search_module.minimize(spec) else (lambda v: v >= target)


def target_of(spec: SweepSpec, best: float, target_pp: float) -> float:
    """Within `target_pp` points of the grid's `best`: below it, or above it for a loss (0.01 x target_pp)."""
    return best - target_pp / 100 * (-1 if search_module.minimize(spec) else 1)


class Landscape:
    """Every configuration's objective (per seed) at every step it was evaluated, read from the grid run."""

    def __init__(self, spec: SweepSpec, grid_run: Path):
        summary = json.loads((grid_run / "results.json").read_text())
        results = summary["adapters"]
        self.spec = spec
        self.values: dict[tuple, dict[int, float]] = {}  # (seed, label_key) -> {step: objective}
        last = len(spec.tasks) - 1
        for entry in results.values():
            if entry["status"] != "done":
                continue
            by_step = {point["step"]: search_module.objective(spec, point["scores"], point["task_index"])
                       for point in entry["curve"] if point["step"]}
            by_step[entry["steps"]] = search_module.objective(spec, entry["final"], last)
            self.values[(entry["seed"], label_key(entry["varied"]))] = by_step
        self.total_steps = max(max(v) for v in self.values.values())
        ends = task_ends(spec)
        # Its own wall is the grid's only when it evaluated at the task ends alone (as the grid runs it).
        self.evaluated_inside_tasks = any(step not in ends for v in self.values.values() for step in v)
        self.grid_wall = summary["run"]["wall_seconds"]
        sign = 1 if search_module.minimize(spec) else -1
        self.best = min(v[self.total_steps] * sign for v in self.values.values()) * sign

    def value(self, seed: int, varied: dict[str, Any], step: int) -> float:
        found = self.values.get((seed, label_key(varied)))
        if found is None:
            raise ValueError(f"the grid run has no configuration {varied} with seed {seed}: give the grid of the "
                             "same space and seeds")
        if step not in found:
            raise ValueError(f"the grid run did not evaluate {varied} at step {step}: run it with eval.every_steps "
                             "dividing the search's measuring steps")
        return found[step]


class CostModel:
    """Seconds of the search engine, fitted on a real run of the searched sweep (see the module doc)."""

    def __init__(self, search_run: Path):
        # One fused step is the run of consecutive records with the same `seconds` (the launcher writes a step's
        # records together, with the step's unrounded seconds), no adapter twice (a resumed run drops lines).
        steps: list[tuple[int, float]] = []
        previous, names = None, set()
        for line in (search_run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "seconds" not in record or "loss" not in record:
                continue
            if record["seconds"] != previous or record["adapter"] in names:
                if previous is not None:
                    steps.append((len(names), previous))
                previous, names = record["seconds"], set()
            names.add(record["adapter"])
        if previous is None:
            raise ValueError(f"{search_run / 'metrics.jsonl'} holds no training step")
        steps.append((len(names), previous))
        mean_n = statistics.fmean(n for n, _ in steps)
        mean_s = statistics.fmean(s for _, s in steps)
        spread = sum((n - mean_n) ** 2 for n, _ in steps)
        self.per_adapter = sum((n - mean_n) * (s - mean_s) for n, s in steps) / spread if spread else mean_s / mean_n
        self.fixed = mean_s - self.per_adapter * mean_n
        results = json.loads((search_run / "results.json").read_text())
        entries = results["adapters"].values()
        # An adapter's eval seconds are its shares of the batched passes it was in. Every point of its curve was
        # evaluated but the first (the base before its first step), which the worker evaluates once per distinct
        # eval data, i.e. per seed and max_seq_len (eval.base_rows): an evaluation is the mean over those.
        bases = {(e["seed"], e["config"]["train"]["max_seq_len"]) for e in entries if e["curve"]}
        evaluations = sum(max(0, len(e["curve"]) - 1) for e in entries) + len(bases)
        self.per_eval = sum(e["eval_seconds"] for e in entries) / evaluations
        self.explained = sum(s for _, s in steps) + sum(e["eval_seconds"] for e in entries)
        self.wall = results["run"]["wall_seconds"]
        self.start = max(0.0, self.wall - self.explained)
        self.measured = {e["name"]: (e["status"], label_key(e["varied"]), e["finished_after_s"],
                                     (e.get("trial") or {}).get("objective")) for e in entries}

    def measured_wall(self, wall: float) -> None:
        """The search's wall as measured around its process (bench-search.json): the start is what it adds."""
        self.wall, self.start = wall, max(0.0, wall - self.explained)

    def step(self, adapters: int) -> float:
        return self.fixed + self.per_adapter * adapters


@contextlib.contextmanager
def sampler_variant(replay_seed: int, sampler: str | None) -> Iterator[None]:
    """mlora's sampler seeds for seed 0, else mixed with `replay_seed`; the sweep's sampler, or `sampler`:
    `NAME[:OPTION=VALUE,...]` with NAME one of SAMPLERS (`tpe:n_startup_trials=4`, `gp`)."""
    import optuna

    original_seed, original_make = search_module.sampler_seed, search_module.make_sampler

    def seeded(seed: int, configuration: int) -> int:
        return original_seed(seed if not replay_seed else seed * 7919 + replay_seed * 104729, configuration)

    def make(optuna_module: Any, spec: SweepSpec, seed: int) -> Any:
        if sampler is None:
            return original_make(optuna_module, spec, seed)
        name, _, options = sampler.partition(":")
        settings = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in options.split(",") if o)}
        return getattr(optuna.samplers, SAMPLERS[name])(seed=seed, **settings)

    search_module.sampler_seed, search_module.make_sampler = seeded, make
    try:
        yield
    finally:
        search_module.sampler_seed, search_module.make_sampler = original_seed, original_make


def replay_search(spec: SweepSpec, land: Landscape, cost: CostModel, slots: int, target: float,
                  promoted_first: bool = False) -> dict[str, Any]:
    """One search as a worker runs it, on the grid's values and the cost model: when the target was first reached.

    promoted_first (a scheduler mlora does not have, modelled to see what it would give): while any trial has
    passed a rung, only such trials step; the others wait in their slots.
    """
    search = search_module.Search(spec, None)
    queue = list(expand(spec))
    total = land.total_steps
    measure = set(measuring_steps(spec, total))
    ends = task_ends(spec)
    # The base is evaluated once, when the first adapters start: it is every later adapter's row before training.
    clock, active, trials, reached = cost.start + cost.per_eval, [], [], None
    better = reaches(spec, target)
    while queue or active:
        while queue and len(active) < slots:
            slot = queue.pop(0)
            adapter = search.begin(slot)
            active.append({"name": slot.name, "seed": slot.seed, "varied": adapter.varied, "step": 0})
        promoted = [t for t in active if any(t["step"] >= m for m in measure)]
        stepping = promoted if promoted_first and promoted else list(active)
        clock += cost.step(len(stepping))
        for trial in stepping:
            trial["step"] += 1
            step = trial["step"]
            if step not in measure and step not in ends:
                continue
            clock += cost.per_eval
            value = land.value(trial["seed"], trial["varied"], step)
            pruned = search.judge(trial["name"], step, value) if step in measure and step < total else None
            if pruned or step == total:
                status = "pruned" if pruned else "done"
                search.close(trial["name"], status, value)
                active.remove(trial)
                trials.append({"name": trial["name"], "status": status, "step": step, "value": value, "at": clock,
                               "params": trial["varied"]})
                if status == "done" and reached is None and better(value):
                    reached = clock
    return {"time_to_target": reached, "wall": clock, "trials": trials}


# What makes a search sweep its full grid (scripts/bench-search.py's GRID).
GRID_OVERRIDES = ("sweep.search.method=grid", "sweep.search.trials=null", "sweep.prune.method=none")


def modelled_grid(spec: SweepSpec, land: Landscape, cost: CostModel, slots: int) -> float:
    """The full grid's wall in the cost model: rounds of `slots` configurations trained to the end together, each
    evaluated after every task, the base once before them all."""
    rounds = -(-len(land.values) // slots)
    width = min(slots, len(land.values))
    return cost.start + cost.per_eval + rounds * (land.total_steps * cost.step(width)
                                                  + len(spec.tasks) * width * cost.per_eval)


def worker_slots(spec: SweepSpec) -> int:
    """The slots of the one worker the replay models, as the run's plan gives them."""
    devices = spec.devices
    if not (devices in ("cpu", "cuda") or (isinstance(devices, str) and devices.startswith("cuda:"))
            or (isinstance(devices, tuple) and len(devices) == 1)):
        raise ValueError(f"devices: the replay models one worker (cpu, or one GPU); got {devices!r}")
    return WorkerPlan("cpu", tuple(expand(spec)), None, spec.max_concurrent).slots


def replay_process_per_trial(spec: SweepSpec, land: Landscape, seconds: float, target: float, seed: int) -> float:
    """Optuna's TPE asking one trial after another, each a fresh process of `seconds`: the time to target."""
    import optuna

    grid = {key: search_module.distribution(optuna, d) for key, d in search_space(spec).items()}
    study = optuna.create_study(direction="minimize" if search_module.minimize(spec) else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    tried: dict[tuple, float] = {}
    better = reaches(spec, target)
    for number in range(1, 10 * len(land.values)):
        trial, repeats = study.ask(grid), 0
        while label_key(trial.params) in tried and repeats < MAX_REPEATS:
            study.tell(trial, tried[label_key(trial.params)])
            trial, repeats = study.ask(grid), repeats + 1
        value = land.value(spec.seed, trial.params, land.total_steps)
        tried[label_key(trial.params)] = value
        study.tell(trial, value)
        if better(value):
            return number * seconds
    raise ValueError("the per-process replay never reached the target")


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"median {statistics.median(values):6.1f} (quartiles {q[0]:.1f}-{q[2]:.1f})"


def replay_report(sweep: Path, grid_run: Path, search_run: Path, *, seeds: int = 20, target_pp: float = 1.0,
                  process_trial_seconds: float | None = None, variants: tuple[str, ...] = (),
                  samplers: tuple[str, ...] = (), promoted_first: bool = False, cost_override: str = "",
                  grid_wall: float | None = None, overrides: tuple[str, ...] = (), say: Any = print) -> dict[str, Any]:
    """The replays the module doc describes, said line by line; returns every time to target by variant.

    The sweep is read with the overrides bench-search.py ran it with (its bench-search.json's `--set`s, when
    beside the runs), then `overrides`; variants apply theirs on top. The target is the grid's best minus
    `target_pp` / 100 (plus, for loss: an absolute 0.01 x target_pp)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for sampler in samplers:
        if sampler.partition(":")[0] not in SAMPLERS:
            raise ValueError(f"--sampler {sampler}: one of {', '.join(SAMPLERS)}, with options NAME:KEY=VALUE,...")
    bench = search_run.parent.parent / "bench-search.json"  # beside the runs when bench-search.py made them
    report = json.loads(bench.read_text()) if bench.is_file() else None
    # The replay models one worker wherever it ran: a run's devices (a GPU this machine may lack) are not read.
    ran_with = [o for o in [*(report or {}).get("overrides", []), *overrides] if not o.startswith("devices=")]
    spec, _ = load_sweep(sweep, ran_with)
    if spec.sweep.seeds:
        raise ValueError("sweep.seeds: the replay compares one run of each configuration; run it without seeds")
    # The grid as bench-search.py ran it: its own overrides (--grid-set max_concurrent=8) on top.
    grid_spec, _ = load_sweep(sweep, [*ran_with, *(o for o in (report or {}).get("grid_overrides", [])
                                                   if not o.startswith("devices=")), *GRID_OVERRIDES])
    runs = [("as written" + (f" with {' '.join(ran_with)}" if ran_with else ""), spec, None, False)]
    # every variant read before anything is replayed
    runs += [(variant, load_sweep(sweep, [*ran_with, *variant.split()])[0], None, False) for variant in variants]
    runs += [(f"sampler {s}", spec, s, False) for s in samplers]
    if promoted_first:
        runs.append(("promoted trials first", spec, None, True))
    land = Landscape(spec, grid_run)
    measured_cost = CostModel(search_run)
    cost = copy.copy(measured_cost)
    if cost_override:
        try:
            fixed_ms, per_adapter_ms, cost.per_eval, cost.start = map(float, cost_override.split(","))
        except ValueError:
            raise ValueError(f"--cost: FIXED_MS,PER_ADAPTER_MS,EVAL_S,START_S (four numbers), got {cost_override!r}") \
                from None
        cost.fixed, cost.per_adapter = fixed_ms / 1e3, per_adapter_ms / 1e3
    target = target_of(spec, land.best, target_pp)
    if report is not None:  # the walls it measured around the processes, start-up included
        land.grid_wall = report["grid"]["wall_s"]
        if not cost_override and report.get("search"):
            cost.measured_wall(report["search"]["wall_s"])
    elif land.evaluated_inside_tasks and grid_wall is None:
        raise ValueError(f"{grid_run} evaluated inside tasks (eval.every_steps), so its wall is not the grid's: "
                         f"give --grid-wall, or runs of scripts/bench-search.py (no {bench})")
    if grid_wall is not None:
        land.grid_wall = grid_wall
    per_trial = process_trial_seconds
    if per_trial is None:
        per_trial = ((report or {}).get("process_per_trial") or {}).get("mean_trial_wall_s")
        if per_trial is None:
            raise ValueError(f"{bench} has no process-per-trial walls (or is missing): give --process-trial-seconds")
    measured_grid = land.grid_wall
    slots, grid_slots = worker_slots(spec), worker_slots(grid_spec)
    if cost_override:  # another machine: the grid's wall is modelled too
        land.grid_wall = modelled_grid(spec, land, cost, grid_slots)
    say(f"grid: {len(land.values)} configurations, best {land.best:.4f}, target {target:.4f}, wall "
        f"{land.grid_wall:.1f} s ({'modelled' if cost_override else 'measured'}; modelled with SEARCH_RUN's costs: "
        f"{modelled_grid(spec, land, measured_cost, grid_slots):.1f} s, measured {measured_grid:.1f} s; "
        f"{grid_slots} at a time)")
    say(f"cost model: a step {cost.fixed * 1e3:.1f} ms + {cost.per_adapter * 1e3:.1f} ms per adapter, an evaluation "
        f"{cost.per_eval:.2f} s, start {cost.start:.1f} s; one process per trial {per_trial:.1f} s a trial")

    with sampler_variant(0, None):
        check = replay_search(spec, land, cost, slots, target)
    agree = sum(cost.measured.get(t["name"], ("?", None))[:2] == (t["status"], label_key(t["params"]))
                for t in check["trials"])
    better = reaches(spec, target)
    measured_to_target = min((at for status, _, at, value in cost.measured.values()
                              if status == "done" and value is not None and better(value)), default=None)
    say(f"seed 0 replayed: {agree}/{len(check['trials'])} trials end as measured, with the same parameters; time "
        f"to target modelled {check['time_to_target'] or float('nan'):.1f} s, measured "
        f"{measured_to_target or float('nan'):.1f} s")

    process = [replay_process_per_trial(spec, land, per_trial, target, seed) for seed in range(seeds)]
    say(f"\none process per trial: {quartiles(process)} s to target")
    summary: dict[str, Any] = {"seed_0": {"agree": agree, "trials": len(check["trials"]),
                                          "time_to_target": check["time_to_target"],
                                          "measured_time_to_target": measured_to_target},
                               "process_per_trial": process, "grid_wall": land.grid_wall, "variants": {}}
    for name, variant, sampler, first in runs:
        times = []
        for seed in range(seeds):
            with sampler_variant(seed, sampler):
                replayed = replay_search(variant, land, cost, worker_slots(variant), target, first)
                times.append(replayed["time_to_target"] or float("inf"))
        vs_grid = [land.grid_wall / t for t in times]
        vs_process = [p / t for p, t in zip(process, times)]
        say(f"{name:24s} {quartiles(times)} s to target; vs grid {quartiles(vs_grid)}x "
            f"(>= 3x in {sum(r >= 3 for r in vs_grid)}/{len(times)}); vs one process per trial "
            f"{quartiles(vs_process)}x (>= 8x in {sum(r >= 8 for r in vs_process)}/{len(times)})")
        summary["variants"][name] = times
    return summary
