"""`mlora bench`: what co-training buys, measured side by side on the same sweep.

Modes (each a fresh process, timed from launch to exit, imports and model load included):
- concurrent:     `mlora run` as a user runs it (all adapters co-trained);
- sequential:     one `python -m mlora_cli.bench.baseline` process per adapter, one after another
                  (plain PEFT + torch AdamW; see baseline.py);
- engine-serial:  `mlora run` with max_concurrent=1 (one process, one adapter at a time):
                  separates the saved cold starts from the fused steps;
- concurrent@c:   `mlora run` with max_concurrent=c, for the throughput curve;
- trl:            on an RL sweep, one TRL `GRPOTrainer` process per adapter (trl_grpo.py), the
                  tool a user would otherwise pick; timed, its rewards shown, no agreement asked.

Derived figures:
- experiments/hour = adapters / wall seconds * 3600;
- experiment_throughput_ratio = concurrent experiments/hour / sequential experiments/hour;
- mean experiment time: sequential, the mean process wall time; mlora, the mean time from
  process start to each adapter's end;
- fusion efficiency: the union batch through one adapter / the fused N-adapter pass over the
  same rows, for a training step, an evaluation pass and, on an RL sweep, the sampling pass
  and the RL step (see fusion.py).
- agreement, per adapter, in two parts. Early: the training loss of each of the first
  EARLY_STEPS steps within EARLY_LOSS_TOLERANCE (relative) of the baseline's: the two compute
  the same thing, so they differ by rounding at most, and a wrong gradient or update shows at
  step 2. Final: per task, |loss_c - loss_s| <= FINAL_LOSS_TOLERANCE of loss_s and
  |exact_match_c - exact_match_s| <= EXACT_MATCH_TOLERANCE. The final tolerance is wider
  because training amplifies rounding: where the CPU's matmul kernels round differently for a
  different number of rows, a co-trained adapter's first gradient differs from the lone one's
  in the 7th digit, and over 120 steps at lr 3e-3 that grows to a few percent of eval loss, as
  it does between two plain-PEFT runs at 1 and at 2 threads (measured: 2.3%).
  On an RL task the early part also needs each of the first EARLY_STEPS RL steps' mean
  sampled reward to be equal (both sample with the same per-row noise, so the same
  completions unless rounding flips a near-tie), and the final part |reward_c - reward_s| <=
  REWARD_TOLERANCE per task.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mlora_cli.bench.fusion import fusion_efficiency
from mlora_cli.bench.processes import run_processes, timed
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec

EARLY_STEPS = 5
EARLY_LOSS_TOLERANCE = 1e-4  # relative, per step: rounding, not a different computation
FINAL_LOSS_TOLERANCE = 0.10  # relative, per task
EXACT_MATCH_TOLERANCE = 0.05  # absolute (5 points), per task
REWARD_TOLERANCE = 0.05  # absolute, per task (rewards of the builtins lie in [0, 1])


def run_mlora(sweep: Path, overrides: list[str], out: Path, label: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlora_cli", "run", str(sweep), *overrides, f"output_dir={out.resolve()}",
               "--no-plots"]
    wall, rss = timed(command, out / f"{label}.log")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    results = json.loads((run_dir / "results.json").read_text())
    adapters = results["adapters"]
    return {
        "mode": label,
        "wall_seconds": wall,
        "peak_rss_mib": rss,
        "experiments": len(adapters),
        "experiment_seconds": [e["finished_after_s"] for e in adapters.values()],
        "train_tokens": sum(e["train_tokens"] for e in adapters.values()),
        "eval_seconds": sum(e["eval_seconds"] for e in adapters.values()),
        "final": {name: e["final"] for name, e in adapters.items()},
        "early_losses": _early_losses(run_dir / "metrics.jsonl"),
        "rl_rewards": _rl_rewards(run_dir / "metrics.jsonl"),
        "run_dir": str(run_dir),
        **({"cuda_max_allocated_mib": results["run"]["cuda_max_allocated_mib"]}
           if "cuda_max_allocated_mib" in results["run"] else {}),
    }


def _early_losses(metrics_file: Path) -> dict[str, list[float]]:
    """Each adapter's training loss at its first EARLY_STEPS steps, from a run's metrics.jsonl."""
    losses: dict[str, list[float]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record["step"] <= EARLY_STEPS:
            losses.setdefault(record["adapter"], []).append(record["loss"])
    return losses


def _rl_rewards(metrics_file: Path) -> dict[str, list[float]]:
    """Each adapter's mean sampled reward at every RL step, in order, from a run's metrics.jsonl."""
    rewards: dict[str, list[float]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "reward_mean" in record:
            rewards.setdefault(record["adapter"], []).append(record["reward_mean"])
    return rewards


def _mean_final(mode: dict[str, Any], metric: str) -> float | None:
    """The mean over adapters and tasks of `metric` after the last task (None where no adapter has it)."""
    values = [scores[metric] for final in mode["final"].values() for scores in final.values() if metric in scores]
    return statistics.mean(values) if values else None


def run_sequential(resolved_sweep: Path, data_dir: Path, adapters: list[AdapterSpec], out: Path,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    return run_processes("sequential", "mlora_cli.bench.baseline", resolved_sweep, data_dir, adapters, out, progress,
                         EARLY_STEPS)


def summarize(mode: dict[str, Any], sequential: dict[str, Any] | None) -> dict[str, Any]:
    wall = mode["wall_seconds"]
    figures = {
        "wall_seconds": wall,
        "experiments": mode["experiments"],
        "experiments_per_hour": mode["experiments"] / wall * 3600,
        "mean_experiment_seconds": statistics.mean(mode["experiment_seconds"]),
        "train_tokens_per_s": mode["train_tokens"] / wall,
        "eval_seconds": mode["eval_seconds"],
        "peak_rss_mib": mode["peak_rss_mib"],
    }
    if "cuda_max_allocated_mib" in mode:
        figures["cuda_max_allocated_mib"] = mode["cuda_max_allocated_mib"]
    if sequential is not None:
        sequential_per_hour = sequential["experiments"] / sequential["wall_seconds"] * 3600
        figures["throughput_vs_sequential"] = figures["experiments_per_hour"] / sequential_per_hour
        figures["mean_experiment_time_vs_sequential"] = (statistics.mean(sequential["experiment_seconds"])
                                                         / figures["mean_experiment_seconds"])
    return figures


def agreement(concurrent: dict[str, Any], sequential: dict[str, Any]) -> dict[str, Any]:
    """Per adapter: the largest early and final differences from the baseline, and whether they agree."""
    verdicts = {}
    for name, final in sequential["final"].items():
        ours = concurrent["final"].get(name, {})
        worst = {"loss": 0.0, "exact_match": 0.0, "reward": 0.0}
        for task, scores in final.items():
            for metric in worst:
                if metric in scores and metric in ours.get(task, {}):
                    delta = abs(ours[task][metric] - scores[metric])
                    worst[metric] = max(worst[metric], delta / max(abs(scores[metric]), 1e-12)
                                        if metric == "loss" else delta)
        theirs_early, ours_early = sequential["early_losses"][name], concurrent["early_losses"].get(name, [])
        worst_early = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours_early, theirs_early)), default=0.0)
        theirs_rewards = sequential.get("rl_rewards", {}).get(name, [])[:EARLY_STEPS]
        ours_rewards = concurrent.get("rl_rewards", {}).get(name, [])[:EARLY_STEPS]
        worst_reward = max((abs(a - b) for a, b in zip(ours_rewards, theirs_rewards)), default=0.0)
        verdicts[name] = {
            "max_early_loss_rel_delta": worst_early,
            "max_early_reward_delta": worst_reward,
            "max_loss_rel_delta": worst["loss"],
            "max_exact_match_delta": worst["exact_match"],
            "max_reward_delta": worst["reward"],
            "agree": (len(ours_early) == len(theirs_early) and worst_early <= EARLY_LOSS_TOLERANCE
                      and len(ours_rewards) == len(theirs_rewards) and worst_reward == 0.0
                      and worst["loss"] <= FINAL_LOSS_TOLERANCE and worst["exact_match"] <= EXACT_MATCH_TOLERANCE
                      and worst["reward"] <= REWARD_TOLERANCE),
        }
    return verdicts


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_bench(
    sweep: Path, spec: SweepSpec, resolved: dict[str, Any], adapters: list[AdapterSpec], overrides: list[str],
    out: Path, sequential_baseline: bool, modes: list[str], concurrency: list[int],
    progress: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Run the requested modes; return (and write to out/bench.json) the report."""
    out.mkdir(parents=True, exist_ok=True)
    resolved_file = out / "sweep.resolved.yaml"
    resolved_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
    data_dir = sweep.parent.resolve()
    raw: dict[str, dict[str, Any]] = {}

    sequential = None
    if sequential_baseline:
        sequential = run_sequential(resolved_file, data_dir, adapters, out / "sequential", progress)
        raw["sequential"] = sequential
    progress("concurrent: mlora run")
    raw["concurrent"] = run_mlora(sweep, overrides, out / "concurrent", "concurrent")
    if "engine-serial" in modes:
        progress("engine-serial: mlora run, one adapter at a time")
        raw["engine-serial"] = run_mlora(sweep, [*overrides, "max_concurrent=1"], out / "engine-serial",
                                         "engine-serial")
    for c in concurrency:
        if c >= len(adapters) or (c == 1 and "engine-serial" in raw):
            continue  # all adapters at once is `concurrent`; one at a time is `engine-serial`
        progress(f"concurrent@{c}: mlora run, max_concurrent={c}")
        raw[f"concurrent@{c}"] = run_mlora(sweep, [*overrides, f"max_concurrent={c}"], out / f"concurrent-{c}",
                                           f"concurrent@{c}")
    if "trl" in modes:
        from mlora_cli.bench.trl_grpo import run_trl

        raw["trl"] = run_trl(resolved_file, data_dir, adapters, out / "trl", progress)
    progress("fusion efficiency: fused step vs union batch")
    import torch

    from mlora_cli.spec.plan import resolve_devices, sweep_work

    workers = resolve_devices(spec.devices, torch.cuda.device_count(), os.cpu_count() or 1, len(adapters),
                              sweep_work(adapters, spec))
    # On the device of the run's first worker (the sweep's, not whatever GPU this machine has).
    device = "cpu" if workers[0][0] == "cpu" else workers[0][0]
    fusion = fusion_efficiency(spec, adapters, data_dir, threads=workers[0][1] if device == "cpu" else None,
                               device=device)

    report: dict[str, Any] = {
        "sweep": spec.name,
        "adapters": len(adapters),
        "machine": machine(),
        "modes": {name: summarize(mode, sequential) for name, mode in raw.items()},
        "fusion": fusion,
        "fusion_efficiency_train": fusion["fusion_efficiency_train"],
        "fusion_efficiency_eval": fusion["fusion_efficiency_eval"],
    }
    if sequential is not None:
        report["experiment_throughput_ratio"] = report["modes"]["concurrent"]["throughput_vs_sequential"]
        report["agreement"] = agreement(raw["concurrent"], sequential)
        report["agree"] = all(v["agree"] for v in report["agreement"].values())
        report["agreement_tolerances"] = {"early_steps": EARLY_STEPS, "early_loss": EARLY_LOSS_TOLERANCE,
                                          "final_loss": FINAL_LOSS_TOLERANCE, "exact_match": EXACT_MATCH_TOLERANCE,
                                          "reward": REWARD_TOLERANCE}
        report["memory_below_two_sequential"] = raw["concurrent"]["peak_rss_mib"] < 2 * sequential["peak_rss_mib"]
    if "trl" in raw:
        report["throughput_vs_trl"] = (report["modes"]["concurrent"]["experiments_per_hour"]
                                       / report["modes"]["trl"]["experiments_per_hour"])
    rewards = {name: mode["rl_rewards"] for name, mode in raw.items() if mode.get("rl_rewards")}
    if rewards:  # each mode's mean sampled reward per RL step, per adapter, and the final greedy reward
        report["rl_rewards"] = rewards
        report["final_reward"] = {name: _mean_final(mode, "reward") for name, mode in raw.items()}
    curve = {1 if name == "engine-serial" else int(name.split("@")[1]): figures
             for name, figures in report["modes"].items() if name == "engine-serial" or name.startswith("concurrent@")}
    if curve or concurrency:
        curve[len(adapters)] = report["modes"]["concurrent"]
        report["concurrency_curve"] = {str(c): curve[c]["experiments_per_hour"] for c in sorted(curve)}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report
