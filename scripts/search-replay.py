"""Replay adaptive searches against a co-trained grid's results: the time to target over many sampler seeds.

    python scripts/search-replay.py bench/search-X/grid/*/ bench/search-X/search/*/   # GRID_RUN SEARCH_RUN
    python scripts/search-replay.py GRID_RUN SEARCH_RUN --seeds 30 --variant max_concurrent=4 --sampler gp

GRID_RUN and SEARCH_RUN are the run folders `scripts/bench-search.py` wrote (its full grid and its search) for the
same sweep; what is replayed and how is in mlora_cli/bench/search_replay.py. Writes SEARCH_RUN/search-replay.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlora_cli.bench.search_replay import replay_report
from mlora_cli.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid_run", type=Path)
    parser.add_argument("search_run", type=Path)
    parser.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "search.yaml")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--target-pp", type=float, default=1.0,
                        help="within this many points of the grid's best (loss: an absolute 0.01 x this)")
    parser.add_argument("--grid-wall", type=float, default=None,
                        help="the full grid's wall (default: bench-search.json's beside the runs, else GRID_RUN's own)")
    parser.add_argument("--process-trial-seconds", type=float, default=None,
                        help="one process per trial: seconds a trial (default: bench-search.json's mean beside runs)")
    parser.add_argument("--variant", action="append", default=[], metavar="OVERRIDES",
                        help="a variant of the sweep: space-separated KEY=VALUE overrides, e.g. 'max_concurrent=4' or "
                             "'sweep.prune.min_steps=30 sweep.prune.reduction_factor=2' (repeatable)")
    parser.add_argument("--sampler", action="append", default=[], metavar="NAME[:OPTION=VALUE,...]",
                        help="a variant drawing trials from another Optuna sampler: tpe, random, gp, qmc, with options "
                             "(e.g. tpe:n_startup_trials=4, tpe:multivariate=false) (repeatable)")
    parser.add_argument("--cost", default="", help="another machine's cost model instead of SEARCH_RUN's: "
                        "FIXED_MS,PER_ADAPTER_MS,EVAL_S,START_S (a model, not a measurement)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the sweep as it ran, after bench-search.json's own --set (e.g. "
                             "max_concurrent=8 for runs made without bench-search.py; `devices` is not read)")
    parser.add_argument("--promoted-first", action="store_true",
                        help="variant: a scheduler stepping only trials past a rung while there are any")
    args = parser.parse_args()
    try:
        summary = replay_report(args.sweep, args.grid_run, args.search_run, seeds=args.seeds,
                                target_pp=args.target_pp, process_trial_seconds=args.process_trial_seconds,
                                variants=tuple(args.variant), samplers=tuple(args.sampler),
                                promoted_first=args.promoted_first, cost_override=args.cost,
                                grid_wall=args.grid_wall, overrides=tuple(args.set))
    except (ValueError, ConfigError, OSError) as exc:  # runs that do not fit, a bad option, override or folder
        problems = exc.problems if isinstance(exc, ConfigError) else \
            [f"{exc.filename}: {exc.strerror}"] if isinstance(exc, OSError) else [str(exc)]
        for problem in problems:
            print(f"search-replay: {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    out = args.search_run / "search-replay.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"search-replay.json: {out}")


if __name__ == "__main__":
    main()
