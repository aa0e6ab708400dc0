"""On a CUDA device: co-training in bfloat16 (and in the default float32) agrees with float32 on CPU.

Skipped without a GPU (`pytest -m gpu` selects them; scripts/gpu_check.sh runs them with
`mlora bench` on builtin:small). The tolerances are loose on purpose: a bf16 base rounds
every activation to 8 bits of mantissa, and Adam turns small gradient differences into
full-size steps, so weights are compared through what they do (logits, eval loss), not
element by element.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import builtin_tasks, micro_sweep, write_sweep

from mlora_cli.data.batches import collate, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.run.launcher import run_sweep
from mlora_cli.spec.load import load_sweep, parse_spec
from mlora_cli.spec.schema import AdapterConfig, ModelConfig, TaskConfig
from mlora_cli.spec.sweep import expand
from mlora_cli.train.step import StepInput, fused_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TARGETS = ("q_proj", "v_proj", "down_proj")
SWEEP = micro_sweep(
    name="gpu",
    seed=2,
    tasks=builtin_tasks("copy", "reverse", train_examples=32, eval_examples=8),
    adapter={"target_modules": list(TARGETS)},
    train={"steps_per_task": 4, "batch_size": 4, "max_seq_len": 32, "checkpoint_every": None},
    eval={"metrics": ["loss", "token_accuracy"]},
    sweep={"grid": {"adapter.rank": [2, 4]}},
)


def run(folder: Path, devices: Any, dtype: str) -> tuple[Path, dict[str, Any]]:
    spec, resolved = load_sweep(write_sweep(folder, SWEEP, devices=devices, model={"dtype": dtype}))
    outcome = run_sweep(spec, resolved, folder, output_base=folder, plots=False)
    assert all(e["status"] == "done" for e in outcome.results["adapters"].values()), outcome.results
    return outcome.run_dir, outcome.results


def adapter_logits(run_dir: Path, device: str) -> dict[str, torch.Tensor]:
    """Each saved adapter's logits on the eval rows, from a float32 base on `device`."""
    from safetensors.torch import load_file

    spec = parse_spec(yaml.safe_load((run_dir / "sweep.resolved.yaml").read_text()))
    base = load_base(spec.base_model, device)
    engine = MultiLoraModel(base.model, TARGETS, 1, 4)
    rows = [
        row for task in spec.tasks for row in tokenize_task(load_task(task, spec.seed, None), base.tokenizer, 32).eval
    ]
    batch = collate(rows, base.tokenizer.pad_token_id, device)
    logits = {}
    for adapter in expand(spec):
        engine.set_slot_weights(
            0, adapter.adapter, load_file(str(run_dir / "adapters" / adapter.name / "adapter_model.safetensors"))
        )
        with torch.no_grad(), engine.routed([0], [len(rows)]):
            logits[adapter.name] = (
                engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float().cpu()
            )
    return logits


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cotrain_on_cuda_agrees_with_float32_on_cpu(dtype: str, tmp_path: Path) -> None:
    cpu_dir, cpu = run(tmp_path / "cpu", "cpu", "float32")
    cuda_dir, cuda = run(tmp_path / "cuda", ["cuda:0"], dtype)
    for name, entry in cpu["adapters"].items():
        for task, scores in entry["final"].items():
            assert cuda["adapters"][name]["final"][task]["loss"] == pytest.approx(scores["loss"], rel=0.03)
    expected, got = adapter_logits(cpu_dir, "cpu"), adapter_logits(cuda_dir, "cpu")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0.1, rtol=0.05)


def test_fused_step_on_a_cuda_bfloat16_base_matches_cpu_float32() -> None:
    """One fused step from the same start: losses and the updated LoRA weights agree."""
    task = load_task(TaskConfig(name="sort", source="builtin:sort", train_examples=16, eval_examples=1), 0, None)
    results, engines = {}, {}
    for device, dtype in (("cpu", "float32"), ("cuda:0", "bfloat16")):
        base = load_base("builtin:micro", device, ModelConfig(dtype=dtype))
        engine = MultiLoraModel(base.model, TARGETS, 2, 4)
        for slot, rank in enumerate((2, 4)):
            engine.load_slot(slot, AdapterConfig(rank=rank, alpha=8, target_modules=TARGETS), None, seed=slot)
        rows = list(tokenize_task(task, base.tokenizer, 32).train)
        assert next(engine.model.parameters()).dtype == getattr(torch, dtype)
        step, _ = fused_step(
            engine,
            [StepInput(0, rows[:8], 1e-2, 0.0, None), StepInput(1, rows[8:], 1e-2, 0.0, None)],
            base.tokenizer.pad_token_id,
        )
        results[device], engines[device] = step, engine
        assert all(layer.lora_A.dtype == torch.float32 for layer in engine.layers.values())
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda:0"]):
        assert on_cuda.finite and on_cuda.loss == pytest.approx(on_cpu.loss, rel=0.02)
    # Adam's first step moves every weight by about lr * sign(gradient): compare the signs.
    for name, layer in engines["cpu"].layers.items():
        on_cuda = engines["cuda:0"].layers[name].lora_B.detach().cpu()
        assert (on_cuda.sign() == layer.lora_B.detach().sign()).float().mean() > 0.9, name
