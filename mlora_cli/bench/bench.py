"""`mlora bench`: what co-training buys, measured side by side on the same sweep.

Modes (each a fresh process, timed from launch to exit, imports and model load included):
- concurrent:     `mlora run` as a user runs it (all adapters co-trained);
- sequential:     one `python -m mlora_cli.bench.baseline` process per adapter, one after another
                  (plain PEFT + torch AdamW; see baseline.py);
- engine-serial:  `mlora run` with max_concurrent=1 (one process, one adapter at a time):
                  separates the saved cold starts from the fused steps;
- concurrent@c:   `mlora run` with max_concurrent=c, for the throughput curve.

Derived figures:
- experiments/hour = adapters / wall seconds * 3600;
- experiment_throughput_ratio = concurrent experiments/hour / sequential experiments/hour;
- mean experiment time: sequential, the mean process wall time; mlora, the mean time from
  process start to each adapter's end;
- fusion efficiency (train) = time of one adapter's step on the union batch (N x batch rows),
  on an engine holding only that adapter, / time of the fused N-adapter step on the same
  rows, the two timed alternately; (eval) the same for one batched evaluation pass. 1.0
  means co-training costs no more than the union batch itself. The one adapter is the first
  adapter given the sweep's mean rank, so that its LoRA matmuls on the union batch do the
  work of the N adapters' on their own rows (sum of rows x rank; on a GPU the batched path
  pads every adapter to the largest rank, so there the fused step does more). Both are timed
  with the torch threads of one of the concurrent run's workers.
- agreement, per adapter, in two parts. Early: the training loss of each of the first
  EARLY_STEPS steps within EARLY_LOSS_TOLERANCE (relative) of the baseline's: the two compute
  the same thing, so they differ by rounding at most, and a wrong gradient or update shows at
  step 2. Final: per task, |loss_c - loss_s| <= FINAL_LOSS_TOLERANCE of loss_s and
  |exact_match_c - exact_match_s| <= EXACT_MATCH_TOLERANCE. The final tolerance is wider
  because training amplifies rounding: where the CPU's matmul kernels round differently for a
  different number of rows, a co-trained adapter's first gradient differs from the lone one's
  in the 7th digit, and over 120 steps at lr 3e-3 that grows to a few percent of eval loss, as
  it does between two plain-PEFT runs at 1 and at 2 threads (measured: 2.3%).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec

EARLY_STEPS = 5
EARLY_LOSS_TOLERANCE = 1e-4  # relative, per step: rounding, not a different computation
FINAL_LOSS_TOLERANCE = 0.10  # relative, per task
EXACT_MATCH_TOLERANCE = 0.05  # absolute (5 points), per task


def _timed(command: list[str], log: Path) -> tuple[float, float]:
    """Run `command` to completion; (wall seconds, peak RSS MiB of that process)."""
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed; see {log}")
    return wall, usage.ru_maxrss / 1024


def run_mlora(sweep: Path, overrides: list[str], out: Path, label: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlora_cli", "run", str(sweep), *overrides, f"output_dir={out.resolve()}", "--no-plots"]
    wall, rss = _timed(command, out / f"{label}.log")
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


def run_sequential(resolved_sweep: Path, data_dir: Path, adapters: list[AdapterSpec], out: Path,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    walls, rss, finals, early, train_tokens, eval_seconds = [], [], {}, {}, 0, 0.0
    start = time.perf_counter()
    for adapter in adapters:
        progress(f"sequential: {adapter.name}")
        result_file = out / f"{adapter.name}.json"
        command = [sys.executable, "-m", "mlora_cli.bench.baseline", str(resolved_sweep), adapter.name, str(result_file),
                   str(data_dir)]
        wall, peak = _timed(command, out / f"{adapter.name}.log")
        result = json.loads(result_file.read_text())
        walls.append(wall)
        rss.append(peak)
        finals[adapter.name] = result["final"]
        early[adapter.name] = result["train_losses"][:EARLY_STEPS]
        train_tokens += result["train_tokens"]
        eval_seconds += result["eval_seconds"]
    return {
        "mode": "sequential",
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mib": max(rss),
        "experiments": len(adapters),
        "experiment_seconds": walls,
        "train_tokens": train_tokens,
        "eval_seconds": eval_seconds,
        "final": finals,
        "early_losses": early,
    }


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
        figures["throughput_vs_sequential"] = figures["experiments_per_hour"] / (sequential["experiments"] / sequential["wall_seconds"] * 3600)
        figures["mean_experiment_time_vs_sequential"] = statistics.mean(sequential["experiment_seconds"]) / figures["mean_experiment_seconds"]
    return figures


def agreement(concurrent: dict[str, Any], sequential: dict[str, Any]) -> dict[str, Any]:
    """Per adapter: the largest relative |delta| of the early training losses, of final loss and exact match, and agree."""
    verdicts = {}
    for name, final in sequential["final"].items():
        ours = concurrent["final"].get(name, {})
        worst_loss = worst_em = 0.0
        for task, scores in final.items():
            if "loss" in scores:
                worst_loss = max(worst_loss, abs(ours[task]["loss"] - scores["loss"]) / max(abs(scores["loss"]), 1e-12))
            if "exact_match" in scores:
                worst_em = max(worst_em, abs(ours[task]["exact_match"] - scores["exact_match"]))
        theirs_early, ours_early = sequential["early_losses"][name], concurrent["early_losses"].get(name, [])
        worst_early = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours_early, theirs_early)), default=0.0)
        verdicts[name] = {
            "max_early_loss_rel_delta": worst_early,
            "max_loss_rel_delta": worst_loss,
            "max_exact_match_delta": worst_em,
            "agree": (len(ours_early) == len(theirs_early) and worst_early <= EARLY_LOSS_TOLERANCE
                      and worst_loss <= FINAL_LOSS_TOLERANCE and worst_em <= EXACT_MATCH_TOLERANCE),
        }
    return verdicts


def fusion_efficiency(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, repeats: int = 7,
                      threads: int | None = None) -> dict[str, Any]:
    """Union-batch time / fused time, for one training step and one evaluation pass (medians).

    `threads`: torch threads while measuring, those of one of the concurrent run's CPU workers
    (None: torch's default), so the steps are timed as the run ran them.
    """
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return {**_fusion_efficiency(spec, adapters, data_dir, repeats), "torch_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(default_threads)


def _fusion_efficiency(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, repeats: int) -> dict[str, Any]:
    import torch

    from mlora_cli.data.batches import TokenizedTask, tokenize_task
    from mlora_cli.eval.evaluate import EvalRequest, evaluate
    from mlora_cli.model.base import load_base
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.data.sources import load_task
    from mlora_cli.train.step import StepInput, fused_step

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    targets = sorted({t for a in adapters for t in a.adapter.target_modules})

    def engine_for(slots: list[AdapterSpec]) -> tuple[MultiLoraModel, Any]:
        base = load_base(spec.base_model, device, spec.model)
        engine = MultiLoraModel(base.model, targets, len(slots), max(a.adapter.rank for a in slots))
        for slot, adapter in enumerate(slots):
            engine.load_slot(slot, adapter.adapter, adapter.train.max_grad_norm, adapter.seed)
        return engine, base.tokenizer

    # The union batch runs on an engine of its own holding one adapter, as a single-tenant run
    # would: no other slot's optimizer state or routing to carry. It is the first adapter at
    # the sweep's mean rank: N adapters of ranks r_k on their own rows make the LoRA matmuls
    # of one adapter of rank mean(r_k) on all the rows, so both sides do the same work (at the
    # first adapter's own rank the fused step would have more to do, or less).
    union_rank = max(1, round(statistics.mean(a.adapter.rank for a in adapters)))
    union_adapter = dataclasses.replace(adapters[0], adapter=dataclasses.replace(adapters[0].adapter, rank=union_rank))
    fused_engine, tokenizer = engine_for(adapters)
    union_engine, _ = engine_for([union_adapter])
    pad = tokenizer.pad_token_id
    task = tokenize_task(load_task(spec.tasks[0], adapters[0].seed, data_dir), tokenizer, adapters[0].train.max_seq_len)
    size = adapters[0].train.batch_size
    rows = [[task.train[(slot * size + i) % len(task.train)] for i in range(size)] for slot in range(len(adapters))]
    fused = [StepInput(slot, rows[slot], 1e-9, 0.0, None) for slot in range(len(adapters))]
    union = [StepInput(0, [r for part in rows for r in part], 1e-9, 0.0, None)]
    eval_rows = list(task.eval)
    union_task = TokenizedTask(task.name, (), tuple(eval_rows * len(adapters)))
    fused_requests = [EvalRequest(a.name, slot, [task]) for slot, a in enumerate(adapters)]
    union_request = [EvalRequest("union", 0, [union_task])]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def seconds(step: Callable[[], Any]) -> float:
        sync()
        start = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - start

    def medians(union_run: Callable[[], Any], fused_run: Callable[[], Any], times: int) -> tuple[float, float]:
        """Medians of the two, timed alternately so that drift in the machine's speed hits both alike."""
        union_run(), fused_run()  # warm up
        union_times, fused_times = [], []
        for _ in range(times):
            union_times.append(seconds(union_run))
            fused_times.append(seconds(fused_run))
        return statistics.median(union_times), statistics.median(fused_times)

    # A training step is short: more repeats for the same time.
    union_train, fused_train = medians(lambda: fused_step(union_engine, union, pad),
                                       lambda: fused_step(fused_engine, fused, pad), 3 * repeats)
    union_eval, fused_eval = medians(lambda: evaluate(union_engine, union_request, spec.eval, tokenizer),
                                     lambda: evaluate(fused_engine, fused_requests, spec.eval, tokenizer), repeats)
    return {
        "adapters": len(adapters),
        "rows_per_adapter": size,
        "union_rank": union_rank,
        "fused_step_seconds": fused_train,
        "union_step_seconds": union_train,
        "fusion_efficiency_train": union_train / fused_train,
        "fused_eval_seconds": fused_eval,
        "union_eval_seconds": union_eval,
        "fusion_efficiency_eval": union_eval / fused_eval,
    }


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
        raw["engine-serial"] = run_mlora(sweep, [*overrides, "max_concurrent=1"], out / "engine-serial", "engine-serial")
    for c in concurrency:
        if c >= len(adapters) or (c == 1 and "engine-serial" in raw):
            continue  # all adapters at once is `concurrent`; one at a time is `engine-serial`
        progress(f"concurrent@{c}: mlora run, max_concurrent={c}")
        raw[f"concurrent@{c}"] = run_mlora(sweep, [*overrides, f"max_concurrent={c}"], out / f"concurrent-{c}", f"concurrent@{c}")
    progress("fusion efficiency: fused step vs union batch")
    import torch

    from mlora_cli.spec.plan import resolve_devices, sweep_work

    workers = resolve_devices(spec.devices, torch.cuda.device_count(), os.cpu_count() or 1, len(adapters),
                              sweep_work(adapters, spec))
    fusion = fusion_efficiency(spec, adapters, data_dir, threads=workers[0][1] if workers[0][0] == "cpu" else None)

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
                                          "final_loss": FINAL_LOSS_TOLERANCE, "exact_match": EXACT_MATCH_TOLERANCE}
        report["memory_below_two_sequential"] = raw["concurrent"]["peak_rss_mib"] < 2 * sequential["peak_rss_mib"]
    curve = {1 if name == "engine-serial" else int(name.split("@")[1]): figures
             for name, figures in report["modes"].items() if name == "engine-serial" or name.startswith("concurrent@")}
    if curve or concurrency:
        curve[len(adapters)] = report["modes"]["concurrent"]
        report["concurrency_curve"] = {str(c): curve[c]["experiments_per_hour"] for c in sorted(curve)}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    return report
