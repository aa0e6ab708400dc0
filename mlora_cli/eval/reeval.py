"""`mlora eval`: evaluate saved LoRA adapters, all in shared batched passes.

Two uses:
- `evaluate_run(run_dir)`: recompute a run's accuracy matrices from its per-task checkpoints
  (optionally on other tasks), written to `run_dir/evals/<timestamp>/`, never over anything;
- `evaluate_adapters(base, paths, suite)`: any PEFT LoRA adapters, trained anywhere.

Every checkpoint gets a slot of one engine over one copy of the base, and each task is
evaluated for all of them at once. With `harness_tasks`, the same engine also answers
lm-evaluation-harness tasks for every adapter's final checkpoint (eval.harness, the `[lm-eval]`
extra), or for every checkpoint and the base, all adapters in shared passes; scores go under each adapter's
`harness` key (and `harness_matrix`, one row per checkpoint, as R's rows).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from mlora_cli.contract import ADAPTERS, RESOLVED_SWEEP, RESULTS, load_resolved_sweep, matrix_of, mean_over_tasks
from mlora_cli.data.batches import TokenizedTask, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.errors import ConfigError
from mlora_cli.eval.evaluate import evaluate
from mlora_cli.eval.metrics import add_cl_metrics
from mlora_cli.eval.request import EvalRequest
from mlora_cli.files import new_folder, read_json, write_json
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.load import HARNESS_MISSING, TaskSuite
from mlora_cli.spec.schema import AdapterConfig
from mlora_cli.spec.tasks import first_line

SLOTS_PER_PASS = 64  # checkpoints evaluated together; more only grows the batch


@dataclass
class SavedAdapter:
    label: str
    path: Path
    config: AdapterConfig
    weights: dict[str, torch.Tensor]
    seed: int = 0  # what pass_at_k samples with: the run's adapter seed, so it scores as in the run


def read_peft_adapter(path: Path, label: str | None = None, seed: int = 0) -> SavedAdapter:
    """A PEFT LoRA checkpoint folder -> config and weights under mlora's key names; `seed` is pass_at_k's."""
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError([f"{path}: not a PEFT adapter folder (no adapter_config.json)"])
    try:
        peft_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{config_file}: unreadable ({type(exc).__name__}: {first_line(exc)})"]) from exc
    if not isinstance(peft_config, dict):
        raise ConfigError([f"{config_file}: not a PEFT adapter config (a JSON object)"])
    problems = []
    if peft_config.get("peft_type") != "LORA":
        problems.append(f"{config_file}: peft_type {peft_config.get('peft_type')!r} is not LORA")
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern"):
        if peft_config.get(unsupported):
            problems.append(f"{config_file}: {unsupported} is not supported")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        problems.append(f"{path}: no adapter_model.safetensors")
    if problems:
        raise ConfigError(problems)
    from safetensors.torch import load_file

    try:
        raw = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ConfigError([f"{weights_file}: unreadable ({type(exc).__name__}: {first_line(exc)})"]) from exc
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                module = key.split(f".{part}.")[0]
                weights[f"{module}.{part}.weight"] = tensor.float()
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in weights})
    rank = int(peft_config["r"])
    alpha = float(peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r); mlora's scale is alpha / r
    config = AdapterConfig(rank=rank, alpha=alpha, target_modules=tuple(modules))
    return SavedAdapter(label=label or path.name, path=path, config=config, weights=weights, seed=seed)


def _tokenized_tasks(suite: TaskSuite, seed: int, max_seq_len: int, tokenizer: Any, base_dir: Path | None,
                     cache: dict[tuple[int, int], list[TokenizedTask]]) -> list[TokenizedTask]:
    key = (seed, max_seq_len)
    if key not in cache:
        cache[key] = [
            tokenize_task(load_task(task, seed, base_dir, path=f"tasks[{i}]"), tokenizer, max_seq_len)
            for i, task in enumerate(suite.tasks)
        ]
    return cache[key]


def build_engine(base: Any, saved: list[SavedAdapter]) -> MultiLoraModel:
    """One engine over the base with room for SLOTS_PER_PASS of `saved` (their modules, their largest rank)."""
    targets = sorted({m for s in saved for m in s.config.target_modules})
    missing = sorted({m for m in targets if not any(m == n for n, _ in base.model.named_modules())})
    if missing:
        raise ConfigError([f"{saved[0].path}: modules not in the base model: {', '.join(missing[:5])}"])
    max_rank = max(w.size(0) for s in saved for k, w in s.weights.items() if "lora_A" in k)
    return MultiLoraModel(base.model, targets, min(len(saved), SLOTS_PER_PASS), max_rank, base.autocast)


def score_checkpoints(
    base: Any, saved: list[SavedAdapter], task_sets: list[list[TokenizedTask]], suite: TaskSuite,
    base_requests: list[EvalRequest] | None = None, engine: MultiLoraModel | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """{label: {task: {metric: value}}} for every saved adapter, SLOTS_PER_PASS at a time.

    `base_requests` (slot None: the base alone) ride along with the first pass.
    """
    engine = engine or build_engine(base, saved)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    seconds = 0.0
    for start in range(0, len(saved), SLOTS_PER_PASS):
        chunk = saved[start : start + SLOTS_PER_PASS]
        for slot, adapter in enumerate(chunk):
            engine.set_slot_weights(slot, adapter.config, adapter.weights)
        requests = [EvalRequest(s.label, slot, task_sets[start + slot], s.seed) for slot, s in enumerate(chunk)]
        if start == 0:
            requests += base_requests or []
        chunk_scores, took = evaluate(engine, requests, suite.eval, base.tokenizer)
        scores.update(chunk_scores)
        seconds += took
    return scores, seconds


def harness_scores(base: Any, engine: MultiLoraModel, saved: list[SavedAdapter], tasks: list[str],
                   include: Path | None, batch_size: int) -> dict[str, dict[str, dict[str, float]]]:
    """{label: {harness task: {metric: value}}}: lm-evaluation-harness on every saved adapter, a slot each, together."""
    try:
        from mlora_cli.eval import harness
    except ImportError as exc:
        raise ConfigError([f"--harness-tasks: {HARNESS_MISSING} ({exc})"]) from exc
    manager = harness.task_manager(tasks, include)
    max_length = harness.max_length(base.model)
    scores = {}
    for start in range(0, len(saved), engine.num_slots):
        chunk = saved[start : start + engine.num_slots]
        for slot, adapter in enumerate(chunk):
            engine.set_slot_weights(slot, adapter.config, adapter.weights)
        scores.update(harness.evaluate_slots(engine, list(range(len(chunk))), [s.label for s in chunk], base.tokenizer,
                                             tasks, manager, max(1, batch_size // len(chunk)), max_length))
    return scores


def evaluate_adapters(
    base_model: str, paths: list[Path], suite: TaskSuite | None, device: str = "cpu", max_seq_len: int = 1024,
    harness_tasks: list[str] | None = None, harness_include: Path | None = None,
) -> dict[str, Any]:
    """Evaluate any PEFT LoRA adapters on a task suite and/or harness tasks; results keyed by adapter folder name."""
    labels = [p.name for p in paths]
    labels = [f"{label}-{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    seed = suite.seed or 0 if suite is not None else 0
    saved = [read_peft_adapter(p, label, seed) for p, label in zip(paths, labels)]
    started = time.perf_counter()
    base = load_base(base_model, device)
    engine = build_engine(base, saved)
    scores: dict[str, dict[str, dict[str, float]]] = {s.label: {} for s in saved}
    seconds = 0.0
    if suite is not None:
        tasks = _tokenized_tasks(suite, seed, max_seq_len, base.tokenizer, suite.base_dir, {})
        scores, seconds = score_checkpoints(base, saved, [tasks] * len(saved), suite, engine=engine)
    harness = harness_scores(base, engine, saved, harness_tasks, harness_include, 32) if harness_tasks else {}
    task_names = [t.name for t in suite.tasks] if suite is not None else []
    adapters = {}
    for adapter in saved:
        final = scores[adapter.label]
        adapters[adapter.label] = {
            "name": adapter.label, "path": str(adapter.path), "rank": adapter.config.rank,
            "final": final,
            "final_mean": mean_over_tasks(final) if final else math.nan,
            **({"harness": harness[adapter.label]} if harness_tasks else {}),
        }
    return {"adapters": adapters, "run": {"base_model": base_model, "tasks": task_names, "eval_seconds": seconds,
                                          "wall_seconds": time.perf_counter() - started,
                                          **({"harness_tasks": harness_tasks} if harness_tasks else {})}}


def harness_entry(harness: dict[str, dict[str, dict[str, float]]], name: str, checkpoints: list[str],
                  every_task: bool) -> dict[str, Any]:
    """An adapter's `harness` (its final checkpoint's scores) and, with every checkpoint scored, `harness_matrix`."""
    if not every_task:
        return {"harness": harness[f"{name}/{checkpoints[-1]}"]}
    rows = [harness["before"]] + [harness[f"{name}/{checkpoint}"] for checkpoint in checkpoints]
    return {"harness": rows[-1], "harness_matrix": rows}


def evaluate_run(run_dir: Path, suite: TaskSuite | None = None, device: str = "cpu",
                 harness_tasks: list[str] | None = None, harness_include: Path | None = None,
                 harness_every_task: bool = False) -> tuple[Path, dict[str, Any]]:
    """Recompute every adapter's matrix from its per-task checkpoints into run_dir/evals/<time>/; with
    `harness_tasks`, also each adapter's final checkpoint on those lm-evaluation-harness tasks, or with
    `harness_every_task` every checkpoint and the base (each adapter's `harness_matrix`: the harness columns of R)."""
    problems = [f"{run_dir}: missing {name}" for name in (RESOLVED_SWEEP, ADAPTERS, RESULTS)
                if not (run_dir / name).is_file()]
    if problems:
        raise ConfigError(problems)
    previous = read_json(run_dir / RESULTS)
    sweep_dir = Path(previous["run"].get("sweep_dir", run_dir))
    spec, _ = load_resolved_sweep(run_dir / RESOLVED_SWEEP, sweep_dir)
    if suite is None:
        suite = TaskSuite(tasks=spec.tasks, eval=spec.eval, seed=None, base_dir=sweep_dir)
    base_dir = suite.base_dir
    expanded = read_json(run_dir / ADAPTERS)
    started = time.perf_counter()
    base = load_base(spec.base_model, device, spec.model)
    cache: dict[tuple[int, int], list[TokenizedTask]] = {}

    saved, task_sets, rows_of, tasks_of = [], [], {}, {}
    for adapter in expanded:
        folder = run_dir / "checkpoints" / adapter["name"]
        checkpoints = sorted(folder.glob("after-task-*"), key=lambda p: int(p.name.rpartition("-")[2]))
        rows_of[adapter["name"]] = [c.name for c in checkpoints]
        if not checkpoints:  # nothing to evaluate (run.not_evaluated); its data may not even tokenize
            continue
        seed = suite.seed if suite.seed is not None else adapter["seed"]
        tasks = _tokenized_tasks(suite, seed, adapter["train"]["max_seq_len"], base.tokenizer, base_dir, cache)
        tasks_of[adapter["name"]] = tasks
        for checkpoint in checkpoints:
            saved.append(read_peft_adapter(checkpoint, f"{adapter['name']}/{checkpoint.name}", adapter["seed"]))
            task_sets.append(tasks)
    if not saved:
        raise ConfigError([f"{run_dir}: no per-task checkpoints under checkpoints/"])
    # Row 0 of every matrix is the base alone (B = 0).
    base_requests = [
        EvalRequest(f"{a['name']}/before", None, tasks_of[a["name"]], a["seed"]) for a in expanded if rows_of[a["name"]]
    ]
    engine = build_engine(base, saved)
    scores, seconds = score_checkpoints(base, saved, task_sets, suite, base_requests, engine)
    harness: dict[str, dict[str, dict[str, float]]] = {}
    if harness_tasks:  # the final checkpoint of each adapter (the last of its per-task ones), or every one
        final_labels = {f"{name}/{rows[-1]}" for name, rows in rows_of.items() if rows}
        chosen = saved if harness_every_task else [s for s in saved if s.label in final_labels]
        if harness_every_task:  # row 0: the base, as a checkpoint whose B is zero
            zeroed = {k: torch.zeros_like(w) if ".lora_B." in k else w for k, w in saved[0].weights.items()}
            chosen = [SavedAdapter("before", saved[0].path, saved[0].config, zeroed), *chosen]
        harness = harness_scores(base, engine, chosen, harness_tasks, harness_include, suite.eval.batch_size)

    task_names = [t.name for t in suite.tasks]
    adapters = {}
    for adapter in expanded:
        if not rows_of[adapter["name"]]:
            continue  # failed before its first task ended: nothing saved
        rows = [scores[f"{adapter['name']}/before"]] + [scores[f"{adapter['name']}/{c}"]
                                                         for c in rows_of[adapter["name"]]]
        final = rows[-1]
        adapters[adapter["name"]] = {
            "name": adapter["name"], "seed": adapter["seed"], "varied": adapter["varied"],
            "config": {"adapter": adapter["adapter"], "train": adapter["train"]},
            "status": previous["adapters"].get(adapter["name"], {}).get("status", "unknown"),
            "checkpoints": rows_of[adapter["name"]],
            "final": final,
            "final_mean": mean_over_tasks(final),
            "matrix": matrix_of(rows, task_names),
            **(harness_entry(harness, adapter["name"], rows_of[adapter["name"]], harness_every_task)
               if harness_tasks else {}),
        }
    # Adapters that ended before their first task did (failed, pruned mid-task, or unfinished) saved no checkpoint.
    left_out = {a["name"]: previous["adapters"].get(a["name"], {}).get("status", "unfinished")
                for a in expanded if not rows_of[a["name"]]}
    results = {
        "adapters": adapters,
        "run": {"name": spec.name, "run_dir": str(run_dir), "base_model": spec.base_model, "tasks": task_names,
                "trained_tasks": [t.name for t in spec.tasks], "eval_seconds": seconds,
                "wall_seconds": time.perf_counter() - started,
                **({"harness_tasks": harness_tasks} if harness_tasks else {}),
                **({"not_evaluated": left_out} if left_out else {})},
    }
    if [t.name for t in spec.tasks] == task_names:
        add_cl_metrics(results)  # only meaningful when rows and columns are the same tasks
    out_dir = new_folder(run_dir / "evals" / datetime.now().strftime("eval-%Y%m%d-%H%M%S"))
    write_json(out_dir / RESULTS, results)
    return out_dir, results
