"""What scripts/gpu_check.sh measures on a GPU besides the tests and the bench, written to OUT/probe.json.

    python scripts/gpu_probe.py OUT_DIR

1. Host syncs: one fused step of 8 adapters on builtin:small (bf16 autocast), each phase run under
   `torch.cuda.set_sync_debug_mode("warn")`, counting the sync warnings of: the forward and loss,
   the backward, clipping and AdamW. The design is no sync before the step's one read-back of
   what it logs (`fused_step` after `step_on_device`); a count above 0 names work to do.
2. fp32 cross-check: the same fused step on the GPU with the batched path, with the per-adapter
   path, and on the CPU (autocast off): the largest relative differences of the losses and of the
   updated LoRA weights.
3. A profile of one `builtin:small` step (bf16): CUDA kernel launches and the top kernels by
   GPU time, and the step's wall time with the optimizer's share.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mlora_cli.data.batches import tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import AdapterConfig, ModelConfig, TaskConfig
from mlora_cli.train.step import StepInput, _adapter_losses, fused_step

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (4, 8, 16, 32, 4, 8, 16, 32)


def engine_on(device: str, autocast: str, model: str = "builtin:small") -> tuple[MultiLoraModel, Any]:
    base = load_base(model, device, ModelConfig(autocast=autocast))
    engine = MultiLoraModel(base.model, TARGETS, len(RANKS), max(RANKS), base.autocast)
    for slot, rank in enumerate(RANKS):
        engine.load_slot(slot, AdapterConfig(rank=rank, alpha=16, lr=1e-3, target_modules=TARGETS), 1.0, seed=slot)
    return engine, base.tokenizer


def inputs_for(tokenizer: Any, rows_per_adapter: int = 4, dropout: float = 0.0) -> list[StepInput]:
    data = load_task(TaskConfig(name="sort", source="builtin:sort", train_examples=64, eval_examples=1), 0, None)
    rows = list(tokenize_task(data, tokenizer, 48).train)
    return [StepInput(slot, rows[slot * rows_per_adapter:(slot + 1) * rows_per_adapter], 1e-3, dropout,
                      torch.Generator().manual_seed(slot) if dropout else None) for slot in range(len(RANKS))]


def count_syncs(work: Any) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return len(messages), sorted(set(messages))[:5]


def host_syncs() -> dict[str, Any]:
    engine, tokenizer = engine_on("cuda:0", "auto")
    inputs = inputs_for(tokenizer, dropout=0.05)
    fused_step(engine, inputs, tokenizer.pad_token_id)  # warm up (allocator, kernels)
    state: dict[str, Any] = {}

    def forward() -> None:
        state["objective"] = _adapter_losses(engine, inputs, tokenizer.pad_token_id, None)[0]

    def backward() -> None:
        state["objective"].sum().backward()

    def optimizer() -> None:
        slots = [p.slot for p in inputs]
        norms = engine.grad_norms(slots)
        active = torch.ones(engine.num_slots, dtype=torch.bool, device=norms.device)
        lrs = torch.full((engine.num_slots,), 1e-3, dtype=torch.float64).pin_memory().to("cuda:0", non_blocking=True)
        engine.optimizer.step(active, lrs, norms)
        engine.zero_grad()

    return {phase: dict(zip(("syncs", "examples"), count_syncs(work)))
            for phase, work in (("forward", forward), ("backward", backward), ("optimizer", optimizer))}


def fp32_cross_check() -> dict[str, float]:
    outcomes = {}
    for label, device, per_adapter in (("batched", "cuda:0", False), ("per_adapter", "cuda:0", True),
                                       ("cpu", "cpu", True)):
        engine, tokenizer = engine_on(device, "off")
        engine.routing.per_adapter = per_adapter
        inputs = inputs_for(tokenizer)
        losses = []
        for _ in range(3):
            results, _ = fused_step(engine, inputs, tokenizer.pad_token_id)
            losses.append([r.loss for r in results])
        weights = torch.cat([p.detach().float().cpu().flatten() for p in engine.optimizer.params])
        outcomes[label] = torch.tensor(losses), weights
    reference_losses, reference_weights = outcomes["cpu"]
    figures = {}
    for label in ("batched", "per_adapter"):
        losses, weights = outcomes[label]
        figures[f"{label}_vs_cpu_max_loss_rel"] = float(((losses - reference_losses).abs() / reference_losses).max())
        figures[f"{label}_vs_cpu_weights_rel"] = float((weights - reference_weights).norm() / reference_weights.norm())
    return figures


def profile() -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine, tokenizer = engine_on("cuda:0", "auto")
    inputs = inputs_for(tokenizer)
    for _ in range(3):
        fused_step(engine, inputs, tokenizer.pad_token_id)
    torch.cuda.synchronize()
    walls = []
    for _ in range(10):
        start = time.perf_counter()
        fused_step(engine, inputs, tokenizer.pad_token_id)
        walls.append(time.perf_counter() - start)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fused_step(engine, inputs, tokenizer.pad_token_id)
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    top = sorted(events, key=lambda e: e.device_time_total, reverse=True)[:10]
    return {
        "step_seconds_median": sorted(walls)[len(walls) // 2],
        "kernel_launches_per_step": launches,
        "top_kernels": [{"name": e.key[:80], "count": e.count, "gpu_ms": e.device_time_total / 1e3} for e in top],
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def main(out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, probe in (("host_syncs", host_syncs), ("fp32_cross_check", fp32_cross_check), ("profile", profile)):
        try:
            report[name] = probe()
        except Exception as exc:  # one probe failing must not hide the others' results
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        (folder / "probe.json").write_text(json.dumps(report, indent=2))
        print(name, json.dumps(report[name])[:400], flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/gpu-probe")
