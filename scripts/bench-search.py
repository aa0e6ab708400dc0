"""Time-to-target of an adaptive search (TPE + ASHA in one warm engine) against the full grid and one process per trial.

    python scripts/bench-search.py                      # sweeps/search.yaml, results in bench/search-<time>/
    python scripts/bench-search.py --target-pp 1 --max-process-trials 32 --out bench/search
    python scripts/bench-search.py --set devices=cuda:0 --set base_model=builtin:small   # overrides for all runs
    python scripts/bench-search.py --sweep sweeps/search-bench.yaml --grid-set max_concurrent=8   # the benchmark
    python scripts/bench-search.py --sweep sweeps/search-bench.yaml --set devices=cuda:0 --set max_concurrent=8 \
        --time-limit-s 240        # on a GPU within a time limit (scripts/gpu_check.sh): then the replay

Three ways to find a good configuration among the 32 of sweeps/search.yaml (4 ranks x 8 learning rates):

1. the full grid co-trained in mlora: every configuration trained to the end, at once (one `mlora run`);
   its best ACC sets the target: within `--target-pp` percentage points of it;
2. the sweep as written: Optuna's TPE asks a trial whenever a slot of the warm engine frees, ASHA prunes at the
   rungs; time to target = when the first finished trial reaching the target ended (its `finished_after_s`);
3. Optuna driving one fresh process per trial: a study with the same TPE sampler and space asks a trial,
   `mlora run` trains that one adapter in a new process, its ACC is told; one trial after another until one
   reaches the target (or `--max-process-trials`). A process of its own cannot be pruned mid-run by the driver,
   so this baseline trains every trial to the end, as a script around Optuna's ask-and-tell would. Both skip a
   suggestion already tried, telling Optuna its earlier value (Optuna's FAQ way).

Wall times are measured around each command, process start and base load included. Run it on an otherwise idle
machine; it writes bench-search.json with every number and prints the comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def mlora_run(sweep: Path, output_dir: Path, *overrides: str) -> tuple[float, dict[str, Any]]:
    """`mlora run SWEEP` in a fresh process: its wall seconds and results.json."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "mlora_cli", "run", str(sweep), f"output_dir={output_dir}", *overrides,
               "--no-plots"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    runs = sorted(output_dir.glob("*/results.json"))
    if not runs:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return wall, json.loads(runs[-1].read_text())


def final_objective(spec: Any, entry: dict[str, Any]) -> float | None:
    """A finished adapter's final objective as its search reports it (the metric over the tasks `over` names: ACC
    for seen and all, the last task for current); None for one that did not finish."""
    from mlora_cli.run.search import objective

    return objective(spec, entry["final"], len(spec.tasks) - 1) if entry["status"] == "done" else None


def reaches(spec: Any, target: float) -> Callable[[float | None], bool]:
    """Whether a final objective (None: the adapter did not finish) reaches `target`, in the search's direction."""
    from mlora_cli.bench import search_replay

    better = search_replay.reaches(spec, target)
    return lambda value: value is not None and better(value)


def per_process_search(out: Path, spec: Any, data: dict[str, Any], target: float, max_trials: int,
                       overrides: list[str], deadline: float = float("inf"),
                       after_trial: Callable[[dict[str, Any]], None] = lambda so_far: None) -> dict[str, Any]:
    """Optuna's TPE driving one `mlora run` of a one-adapter sweep per trial, until a trial reaches `target`.

    `spec` is the sweep as the search ran it, `data` its resolved form: the same space (its grid, zip, list keys and
    distributions, as mlora's search asks them), metric, direction and seed. With a `deadline` (a
    time.perf_counter() value), no trial is started after it, nor one that would end after it at the mean trial
    wall so far: a bounded sample of trial walls for scripts/search-replay.py. `after_trial` is given the result
    so far after each trial (bench-search.json is rewritten with it: a kill loses no trial)."""
    import optuna

    from mlora_cli.run.search import distribution, minimize
    from mlora_cli.spec.convert import to_plain
    from mlora_cli.spec.sweep import expand, search_space, trial_adapter

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {key: distribution(optuna, d) for key, d in search_space(spec).items()}
    study = optuna.create_study(direction="minimize" if minimize(spec) else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=spec.seed))
    slot, better = expand(spec)[0], reaches(spec, target)
    # The trial's sweep file holds its settings whole: the process runs get no sweep.* override.
    overrides = [o for o in overrides if not o.startswith("sweep.")]
    started, trials, reached_at = time.perf_counter(), [], None

    def so_far() -> dict[str, Any]:
        return {"trials": trials, "time_to_target_s": reached_at, "wall_s": time.perf_counter() - started,
                "mean_trial_wall_s": sum(t["wall_s"] for t in trials) / len(trials) if trials else None}

    for number in range(max_trials):
        if time.perf_counter() + (so_far()["mean_trial_wall_s"] or 0.0) > deadline:
            print(f"  stopped before trial {number}: the time limit", flush=True)
            break
        trial, repeats = study.ask(distributions), 0
        while (earlier := next((t for t in trials if t["params"] == trial.params), None)) and repeats < 100:
            # a repeat is not trained again: told the earlier value (Optuna's FAQ way), as mlora does it
            failed = optuna.trial.TrialState.FAIL if earlier["acc"] is None else None
            study.tell(trial, earlier["acc"], state=failed)
            trial, repeats = study.ask(distributions), repeats + 1
        settings = trial_adapter(spec, slot, trial.params)
        one = {**data, "name": f"trial-{number}", "sweep": {},
               "adapter": to_plain(settings.adapter), "train": to_plain(settings.train)}
        path = out / "process" / f"trial-{number}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(one, sort_keys=False))
        wall, results = mlora_run(path, out / "process" / f"trial-{number}", *overrides)
        value = final_objective(spec, next(iter(results["adapters"].values())))
        failed = optuna.trial.TrialState.FAIL if value is None else None
        study.tell(trial, value, state=failed)
        elapsed = time.perf_counter() - started
        trials.append({"number": number, "params": trial.params, "acc": value, "wall_s": wall, "ended_s": elapsed})
        shown = "failed" if value is None else f"{value:.4f}"
        print(f"  process trial {number}: {trial.params} {spec.sweep.search.metric} {shown} in {wall:.1f} s",
              flush=True)
        if better(value):
            reached_at = elapsed
        after_trial(so_far())
        if reached_at is not None:
            break
    return so_far()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "search.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / f"search-{datetime.now():%Y%m%d-%H%M%S}")
    parser.add_argument("--target-pp", type=float, default=1.0, help="within this many points of the grid's best")
    parser.add_argument("--max-process-trials", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run (the grid, the search, each process), e.g. devices=cuda:0")
    parser.add_argument("--grid-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for the grid alone, after --set: run it at its fastest, e.g. "
                             "max_concurrent=8 when the search runs fewer slots")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no process-per-trial trial after this many seconds of the whole benchmark, "
                             "nor one that would end after them; the replay then uses their mean wall")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.time_limit_s if args.time_limit_s is not None else float("inf")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from mlora_cli.bench.search_replay import GRID_OVERRIDES, target_of
    from mlora_cli.errors import ConfigError
    from mlora_cli.run.search import minimize
    from mlora_cli.spec.load import load_sweep

    try:  # the sweep as the search runs it: with the --set overrides (metric, space, seed and all)
        spec, data = load_sweep(args.sweep, args.set)
    except ConfigError as exc:
        raise SystemExit("\n".join(f"bench-search.py: {problem}" for problem in exc.problems)) from None
    if spec.sweep.search.method == "grid" or spec.sweep.seeds:
        raise SystemExit("bench-search.py: the benchmark compares one run of each configuration of a random or tpe "
                         "search (sweep.search.method random | tpe, no sweep.seeds)")
    metric, lower = spec.sweep.search.metric, minimize(spec)
    direction = -1 if lower else 1  # a loss is better lower

    print("1/3 the full grid, co-trained in one mlora run", flush=True)
    grid_wall, grid = mlora_run(args.sweep, out / "grid", *GRID_OVERRIDES, *args.set, *args.grid_set)
    scores = {name: final_objective(spec, entry) for name, entry in grid["adapters"].items()}
    finished = [name for name in scores if scores[name] is not None]
    if not finished:
        raise SystemExit(f"bench-search.py: no configuration of the grid finished ({out / 'grid'}): no target")
    best_name = max(finished, key=lambda name: direction * scores[name])  # type: ignore[operator]
    best = scores[best_name]
    target = target_of(spec, best, args.target_pp)
    better = reaches(spec, target)
    print(f"  {len(scores)} configurations in {grid_wall:.1f} s; best {best_name} {metric} {best:.4f}; "
          f"target {'<=' if lower else '>='} {target:.4f}", flush=True)

    report: dict[str, Any] = {
        "sweep": str(args.sweep), "overrides": args.set, "grid_overrides": args.grid_set, "metric": metric,
        "target_pp": args.target_pp, "target": target,
        "grid": {"wall_s": grid_wall, "best": best, "best_adapter": best_name, "acc": scores,
                 "steps": sum(e["steps"] for e in grid["adapters"].values())},
        "search": None, "process_per_trial": None,
    }
    # Written after each part: a run stopped by a time limit keeps what it measured.
    (out / "bench-search.json").write_text(json.dumps(report, indent=2))

    print("2/3 the search: TPE trials asked as slots free, ASHA pruning, one warm engine", flush=True)
    search_wall, found = mlora_run(args.sweep, out / "search", *args.set)
    entries = found["adapters"].values()
    reaching = [e for e in entries if better(final_objective(spec, e))]
    search_to_target = min((e["finished_after_s"] for e in reaching), default=None)
    steps = sum(e["steps"] for e in entries)
    values = [value for e in entries if (value := final_objective(spec, e)) is not None]
    searched_best = max(values, key=lambda value: direction * value) if values else None
    reached = "not reached" if search_to_target is None else f"reached at {search_to_target:.1f} s"
    searched = "none" if searched_best is None else f"{searched_best:.4f}"
    print(f"  {len(found['adapters'])} trials ({sum(e['status'] == 'pruned' for e in entries)} pruned, {steps} "
          f"steps) in {search_wall:.1f} s; best {metric} {searched}; target {reached}", flush=True)

    report["search"] = {"wall_s": search_wall, "time_to_target_s": search_to_target, "best": searched_best,
                        "steps": steps, "pruned": sum(e["status"] == "pruned" for e in entries),
                        "trials": {e["name"]: {**e["trial"], "status": e["status"], "finished_after_s":
                                               e["finished_after_s"]} for e in entries}}
    (out / "bench-search.json").write_text(json.dumps(report, indent=2))

    print("3/3 Optuna driving one fresh mlora process per trial", flush=True)

    def save_trials(so_far: dict[str, Any]) -> None:
        report["process_per_trial"] = so_far
        (out / "bench-search.json").write_text(json.dumps(report, indent=2))

    process = per_process_search(out, spec, data, target, args.max_process_trials, args.set, deadline, save_trials)
    report["process_per_trial"] = process
    reached, ran = process["time_to_target_s"], bool(process["trials"])
    if search_to_target:
        report["speedup_vs_grid"] = grid_wall / search_to_target
        if ran:  # none ran when the grid and the search used the whole time limit
            report["speedup_vs_process_per_trial"] = (reached or process["wall_s"]) / search_to_target
            report["process_per_trial_reached_target"] = reached is not None
    (out / "bench-search.json").write_text(json.dumps(report, indent=2))
    print(f"\ntarget: {metric} {'<=' if lower else '>='} {target:.4f} (grid best {best:.4f} "
          f"{'+' if lower else '-'} {args.target_pp / 100:g})")
    print(f"full grid, co-trained:       {grid_wall:8.1f} s (all {len(scores)} configurations)")
    print("search, TPE + ASHA, mlora:   "
          + (f"{search_to_target:8.1f} s to target" if search_to_target else "     not reaching the target")
          + f" ({search_wall:.1f} s for all {len(found['adapters'])} trials)")
    if not ran:
        print("one process per trial:       not run (the time limit)")
    else:
        print(f"one process per trial:       {reached or process['wall_s']:8.1f} s "
              + (f"to target ({len(process['trials'])} trials)" if reached else
                 f"without reaching it ({len(process['trials'])} trials)"))
    if search_to_target:
        print(f"speedup: {report['speedup_vs_grid']:.2f}x vs the grid"
              + (f", {report['speedup_vs_process_per_trial']:.2f}x vs one process per trial" if ran else "")
              + ("" if reached or not ran else " (at least: the baseline never reached the target)"))
    print(f"bench-search.json: {out / 'bench-search.json'}")


if __name__ == "__main__":
    main()
