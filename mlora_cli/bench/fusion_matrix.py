"""Fusion efficiency of the training step over the configurations people run, one cell per configuration.

For each cell (torch threads x target modules x ranks x dropout) on the sweep's first task and
batch size: the fused N-adapter step, the same rows as one adapter's union batch on mlora's
engine (the reference of `fusion.py`), and the union batch as plain PEFT (LoRA of the mean rank,
the cell's dropout, `AdamW(fused=True)` after `clip_grad_norm_`), timed alternately in pairs
(`bench.alternating`: ratios are medians over the pairs, times medians).

- efficiency = union step on mlora's engine / fused step (1.0: co-training costs what the union
  batch costs); `vs_peft` = PEFT's union step / fused step;
- dropout cost = the fused step at dropout p / at dropout 0, against PEFT's union step at p / at 0:
  dropout should cost co-training no more than it costs PEFT.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlora_cli.bench.alternating import timed_alternately
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"q,v": ("q_proj", "v_proj"), "all-linear": ALL_LINEAR}


@dataclasses.dataclass
class CellSteps:
    """One cell's three steps, ready to run: the fused step, the union batch on mlora's engine, PEFT's union."""

    fused: Callable[[], Any]
    union: Callable[[], Any]
    peft: Callable[[], Any]
    ranks: set[int]  # the LoRA ranks in play (what tells a LoRA matmul from a base one in a profile)


def _cell_steps(spec: SweepSpec, adapters: list[AdapterSpec], rows: list[list[Any]], targets: tuple[str, ...],
                dropout: float) -> CellSteps:
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import record_function

    from mlora_cli.data.batches import collate, token_losses
    from mlora_cli.model.base import load_base
    from mlora_cli.train.step import STEP_PHASES, StepInput, fused_step

    union_rank = max(1, round(statistics.mean(a.adapter.rank for a in adapters)))
    configs = [dataclasses.replace(a.adapter, target_modules=targets, dropout=dropout) for a in adapters]
    union_config = dataclasses.replace(configs[0], rank=union_rank)

    fused_engine, tokenizer = _engine_for(spec, targets, configs)
    union_engine, _ = _engine_for(spec, targets, [union_config])
    pad = tokenizer.pad_token_id
    generators = [torch.Generator().manual_seed(slot) for slot in range(len(configs))]
    fused = [StepInput(slot, rows[slot], 1e-9, dropout, generators[slot]) for slot in range(len(configs))]
    union = [StepInput(0, [r for part in rows for r in part], 1e-9, dropout, torch.Generator().manual_seed(99))]

    base = load_base(spec.base_model, "cpu", spec.model)
    peft = get_peft_model(base.model, LoraConfig(r=union_rank, lora_alpha=union_config.alpha, lora_dropout=dropout,
                                                 target_modules=list(targets)))
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-9, fused=True)
    batch = collate([r for part in rows for r in part], pad)

    def peft_step() -> None:  # in mlora's phases, for profile_cell
        with record_function(STEP_PHASES[0]):
            logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss_sum, tokens, _ = token_losses(logits, batch.labels)
            loss = loss_sum.sum() / tokens.sum()
        with record_function(STEP_PHASES[1]):
            loss.backward()
        with record_function(STEP_PHASES[2]):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return CellSteps(fused=lambda: fused_step(fused_engine, fused, pad),
                     union=lambda: fused_step(union_engine, union, pad), peft=peft_step,
                     ranks={c.rank for c in configs} | {union_rank})


def _engine_for(spec: SweepSpec, targets: tuple[str, ...], slot_configs: list[Any]) -> tuple[Any, Any]:
    """A fresh base under an engine of one slot per config (loaded with seeds 0, 1, ...), and its tokenizer."""
    from mlora_cli.model.base import load_base
    from mlora_cli.model.engine import MultiLoraModel

    base = load_base(spec.base_model, "cpu", spec.model)
    engine = MultiLoraModel(base.model, targets, len(slot_configs), max(c.rank for c in slot_configs), base.autocast)
    for slot, config in enumerate(slot_configs):
        engine.load_slot(slot, config, 1.0, seed=slot)
    return engine, base.tokenizer


def _cell(spec: SweepSpec, adapters: list[AdapterSpec], rows: list[list[Any]], targets: tuple[str, ...],
          dropout: float, repeats: int) -> dict[str, float]:
    steps = _cell_steps(spec, adapters, rows, targets, dropout)
    union = timed_alternately(steps.union, steps.fused, repeats)
    peft = timed_alternately(steps.peft, steps.fused, repeats)
    fused_seconds = statistics.median([union.second_seconds, peft.second_seconds])
    return {"fused_ms": fused_seconds * 1e3, "union_ms": union.first_seconds * 1e3,
            "peft_union_ms": peft.first_seconds * 1e3, "efficiency": union.ratio, "vs_peft": peft.ratio}


def profile_cell(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, threads: int, targets: str,
                 equal_ranks: bool, dropout: float, steps: int = 10) -> dict[str, dict[str, float]]:
    """Where one cell's step time goes: {fused | union | peft: {phase: ms per step}}, from torch.profiler's ranges
    over `steps` steps of each after a warm-up: forward, backward, clip and AdamW (`train.step.STEP_PHASES`), and
    inside the first two the LoRA term (`model.multi_lora`; PEFT's has no range of its own); `wall` is the median
    step without the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mlora_cli.model.multi_lora import LORA_FORWARD
    from mlora_cli.model.per_adapter import LORA_BACKWARD
    from mlora_cli.train.step import STEP_PHASES

    rows, rank_sets, _ = _cell_inputs(spec, adapters, data_dir)
    members = rank_sets["equal" if equal_ranks else "mixed"]
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cell = _cell_steps(spec, members, rows, TARGET_SETS[targets], dropout)
        names = {STEP_PHASES[0]: "forward", LORA_FORWARD: "  of which LoRA term", STEP_PHASES[1]: "backward",
                 LORA_BACKWARD: "  of which LoRA term ", STEP_PHASES[2]: "clip and AdamW"}
        parts: dict[str, dict[str, float]] = {}
        for label, run in (("fused", cell.fused), ("union", cell.union), ("peft", cell.peft)):
            walls = []
            for _ in range(steps + 2):
                started = time.perf_counter()
                run()
                walls.append(time.perf_counter() - started)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    run()
            split = dict.fromkeys(names.values(), 0.0)
            for event in prof.key_averages():
                if event.key in names:
                    split[names[event.key]] += event.cpu_time_total / 1e3 / steps
            parts[label] = {**split, "wall": statistics.median(walls[2:]) * 1e3}
        return parts
    finally:
        torch.set_num_threads(default_threads)


def lora_term_by_rank_class(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, threads: int,
                            targets: str, rounds: int = 100) -> dict[str, dict[str, Any]]:
    """Where a mixed-rank cell's gap lies: each target module's LoRA term (forward and backward, the input's
    gradient included) in the first decoder layer, on the cell's rows, timed three ways in rotating order:

    - fused: every adapter's group at its own rank, as the fused step computes it;
    - union: the union batch through one adapter of the mean rank (the cells' reference);
    - rank classes: the same rows split by rank, each rank's rows through one adapter of that rank (the fewest
      LoRA computations these ranks can take: PEFT's matmuls at each rank, one call per rank).

    Returns {module: {fused_us, union_us, rank_classes_us, efficiency (union / fused), vs_rank_classes
    (rank classes / fused), rows (each side's rows)}}, ratios as medians over the rounds. If fused costs more
    than the union but less than the rank classes, the gap is what the ranks themselves cost (small ranks run
    the matmul library's narrow kernels at a worse rate per entry), not what fusing them costs."""
    import torch

    from mlora_cli.data.batches import collate

    rows, _, equal_rank = _cell_inputs(spec, adapters, data_dir)
    ranks = [a.adapter.rank for a in adapters]
    modules = TARGET_SETS[targets]
    configs = [dataclasses.replace(a.adapter, target_modules=modules, dropout=0.0) for a in adapters]
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused, tokenizer = _engine_for(spec, modules, configs)
        tokens = collate([r for part in rows for r in part], tokenizer.pad_token_id).input_ids.size(1)
        size = len(rows[0])
        classes = sorted(set(ranks))
        sides = {"fused": (fused, list(range(len(configs))), [size] * len(configs)),
                 "union": (_engine_for(spec, modules, [dataclasses.replace(configs[0], rank=equal_rank)])[0], [0],
                           [size * len(configs)])}
        for rank in classes:
            sides[f"rank {rank}"] = (_engine_for(spec, modules, [dataclasses.replace(configs[0], rank=rank)])[0], [0],
                                     [size * ranks.count(rank)])
        noise = torch.Generator().manual_seed(0)
        report: dict[str, dict[str, Any]] = {}
        for module in modules:
            runs = {}
            for label, (engine, slots, counts) in sides.items():
                layer = next(layer for name, layer in engine.layers.items() if name.endswith(f".{module}"))
                x = torch.randn(sum(counts), tokens, layer.in_features, generator=noise, requires_grad=True)
                grad = torch.randn(sum(counts), tokens, layer.out_features, generator=noise)
                runs[label] = _lora_term_step(engine, layer, x, grad, slots, counts)
            labels = list(runs)
            for label in labels:  # warm up (the first call checks which batched matmuls are exact)
                runs[label]()
            seconds: dict[str, list[float]] = {label: [] for label in labels}
            for turn in range(rounds):
                for label in labels[turn % len(labels):] + labels[: turn % len(labels)]:
                    started = time.perf_counter()
                    runs[label]()
                    seconds[label].append(time.perf_counter() - started)
            per_round = [sum(seconds[f"rank {rank}"][i] for rank in classes) for i in range(rounds)]
            report[module] = {
                "fused_us": statistics.median(seconds["fused"]) * 1e6,
                "union_us": statistics.median(seconds["union"]) * 1e6,
                "rank_classes_us": statistics.median(per_round) * 1e6,
                "efficiency": statistics.median(u / f for u, f in zip(seconds["union"], seconds["fused"])),
                "vs_rank_classes": statistics.median(c / f for c, f in zip(per_round, seconds["fused"])),
                "rows": {label: sum(counts) for label, (_, _, counts) in sides.items()}}
        return report
    finally:
        torch.set_num_threads(default_threads)


def _lora_term_step(engine: Any, layer: Any, x: Any, grad: Any, slots: list[int],
                    counts: list[int]) -> Callable[[], None]:
    """One forward and backward of `layer`'s LoRA term on `x` routed as `slots` x `counts` rows."""

    def run() -> None:
        with engine.routed(slots, counts):
            layer.lora_term(x).backward(grad)
        x.grad = None
        engine.zero_grad()

    return run


def _cell_inputs(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path) -> tuple[list[list[Any]], dict, int]:
    """The rows each adapter trains on in every cell, the adapters with equal and with their own ranks, and the
    equal rank."""
    from mlora_cli.data.batches import tokenize_task
    from mlora_cli.data.sources import load_task
    from mlora_cli.model.base import load_base
    from mlora_cli.model.engine import check_targets

    base = load_base(spec.base_model, "cpu", spec.model)
    # The cells target a Llama's projections by name: a base without them is one line per name, not a traceback.
    check_targets(base.model, ALL_LINEAR, spec.base_model, key="--fusion-matrix")
    tokenizer = base.tokenizer
    first = adapters[0]
    task = tokenize_task(load_task(spec.tasks[0], first.seed, data_dir), tokenizer, first.train.max_seq_len)
    size = first.train.batch_size
    rows = [[task.train[(slot * size + i) % len(task.train)] for i in range(size)] for slot in range(len(adapters))]
    equal_rank = max(1, round(statistics.mean(a.adapter.rank for a in adapters)))
    rank_sets = {"equal": [dataclasses.replace(a, adapter=dataclasses.replace(a.adapter, rank=equal_rank))
                           for a in adapters], "mixed": adapters}
    return rows, rank_sets, equal_rank


def fusion_matrix(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, repeats: int = 15,
                  progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Every cell of threads (1, all cores) x targets (q,v / all-linear) x ranks (equal / the sweep's) x
    dropout (0 / 0.05), with each dropout cell's cost relative to its dropout-0 twin, for mlora and PEFT."""
    import os

    import torch

    rows, rank_sets, equal_rank = _cell_inputs(spec, adapters, data_dir)
    size = len(rows[0])
    default_threads = torch.get_num_threads()
    cells = []
    try:
        for threads, (target_name, targets), (rank_name, members), dropout in itertools.product(
                sorted({1, os.cpu_count() or 1}), TARGET_SETS.items(), rank_sets.items(), (0.0, 0.05)):
            torch.set_num_threads(threads)
            progress(f"fusion matrix: {threads} threads, {target_name}, {rank_name} ranks, dropout {dropout}")
            cell = _cell(spec, members, rows, targets, dropout, repeats)
            cells.append({"threads": threads, "targets": target_name, "ranks": rank_name, "dropout": dropout, **cell})
    finally:
        torch.set_num_threads(default_threads)
    for cell in cells:
        if cell["dropout"] > 0:
            twin = next(c for c in cells if c["dropout"] == 0 and all(c[k] == cell[k]
                                                                       for k in ("threads", "targets", "ranks")))
            cell["dropout_cost"] = cell["fused_ms"] / twin["fused_ms"]
            cell["peft_dropout_cost"] = cell["peft_union_ms"] / twin["peft_union_ms"]
    return {"adapters": len(adapters), "rows_per_adapter": size, "equal_rank": equal_rank,
            "ranks": [a.adapter.rank for a in adapters], "cells": cells}


def fusion_matrix_report(sweep: Path, spec: SweepSpec, adapters: list[AdapterSpec], out: Path,
                         progress: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """`mlora bench --fusion-matrix`: `fusion_matrix` for the sweep at `sweep`, written to OUT/fusion-matrix.json."""
    from mlora_cli.files import write_json

    report = fusion_matrix(spec, adapters, sweep.parent.resolve(), progress=progress)
    write_json(out / "fusion-matrix.json", report)
    return report
