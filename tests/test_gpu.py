"""On a CUDA device: the GPU path checked against the CPU path, over several steps, with what a real sweep has.

Skipped without a GPU (`pytest -m gpu` selects them; scripts/gpu_check.sh runs them, then the
sync check, a profile and the bench). What each test holds the GPU to:

- fp32 (`model.autocast: off`): several fused steps of adapters with unequal groups and ranks, B
  nonzero from the second step, end where the same steps on the CPU end (within 2% of the update:
  AdamW's first steps amplify rounding, and cuBLAS rounds differently from MKL);
- the batched path (equal groups: padded bmm) and the per-adapter path give the same logits and
  gradients on the GPU, in fp32 and under bf16 autocast;
- bf16 autocast tracks fp32: the same losses within 2%, the same direction of every update;
- dropout masks on the GPU do not depend on the neighbours (an adapter alone == with a neighbour);
- generation: greedy evaluation and RL sampling on the GPU give the CPU's tokens (fp32);
- a whole run on cuda:0 with strategies (replay, ewc, lwf, olora) and an RL task, stopped by SIGTERM
  and resumed, gives the results of the same run left alone; and its evaluation matches the CPU's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, numbers, stop_mid_run, write_sweep

from mlora_cli.data.batches import TokenizedTask, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.eval.evaluate import evaluate
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import AdapterConfig, EvalConfig, ModelConfig, RLConfig, TaskConfig
from mlora_cli.train.rollout import RolloutRequest, sample
from mlora_cli.train.step import StepInput, fused_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TARGETS = ("q_proj", "v_proj", "down_proj")
CONFIGS = [AdapterConfig(rank=2, alpha=4, lr=1e-2, target_modules=TARGETS),
           AdapterConfig(rank=4, alpha=8, lr=1e-2, target_modules=TARGETS),
           AdapterConfig(rank=8, alpha=8, lr=3e-3, target_modules=TARGETS)]


def task(name: str = "sort") -> TokenizedTask:
    data = load_task(TaskConfig(name=name, source=f"builtin:{name}", train_examples=32, eval_examples=6), 0, None)
    return tokenize_task(data, load_base("builtin:micro").tokenizer, 32)


def engine_on(device: str, autocast: str = "off", configs: list[AdapterConfig] = CONFIGS) -> tuple[MultiLoraModel, Any]:
    base = load_base("builtin:micro", device, ModelConfig(autocast=autocast))
    engine = MultiLoraModel(base.model, TARGETS, len(configs), max(c.rank for c in configs), base.autocast)
    for slot, config in enumerate(configs):
        engine.load_slot(slot, config, 1.0, seed=slot)
    return engine, base.tokenizer


def train(engine: MultiLoraModel, pad: int, groups: list[int], steps: int, dropout: float = 0.0,
          slots: list[int] | None = None) -> list[list[float]]:
    """`steps` fused steps, group g taking `groups[g]` rows; returns each step's losses."""
    rows = list(task().train)
    slots = slots if slots is not None else list(range(len(groups)))
    generators = {s: torch.Generator().manual_seed(100 + s) for s in slots}
    losses = []
    for step in range(steps):
        inputs, start = [], step
        for slot, count in zip(slots, groups):
            inputs.append(StepInput(slot, [rows[(start + i) % len(rows)] for i in range(count)], CONFIGS[slot].lr,
                                    dropout, generators[slot] if dropout else None))
            start += count
        results, _ = fused_step(engine, inputs, pad)
        assert all(r.finite for r in results)
        losses.append([r.loss for r in results])
    return losses


def weights(engine: MultiLoraModel, slot: int) -> dict[str, torch.Tensor]:
    return {k: v.float().cpu() for k, v in engine.slot_weights(slot, CONFIGS[slot]).items()}


def assert_close_to_update(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                           start: dict[str, torch.Tensor], share: float) -> None:
    for key in want:
        update = (want[key] - start[key]).abs().max()
        assert (got[key] - want[key]).abs().max() <= share * update + 1e-7, key


def test_fp32_steps_on_cuda_end_where_the_cpu_ends() -> None:
    ends = {}
    for device in ("cpu", "cuda:0"):
        engine, tokenizer = engine_on(device)
        start = [weights(engine, s) for s in range(3)]
        losses = train(engine, tokenizer.pad_token_id, [3, 5, 8], steps=6)  # unequal groups and ranks
        ends[device] = losses, [weights(engine, s) for s in range(3)]
    (cpu_losses, cpu_weights), (gpu_losses, gpu_weights) = ends["cpu"], ends["cuda:0"]
    for cpu_step, gpu_step in zip(cpu_losses, gpu_losses):
        assert gpu_step == pytest.approx(cpu_step, rel=1e-3)
    for slot in range(3):
        assert_close_to_update(gpu_weights[slot], cpu_weights[slot], start[slot], 0.02)


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_batched_and_per_adapter_paths_agree_on_cuda(autocast: str) -> None:
    outcomes = {}
    for per_adapter in (True, False):
        engine, tokenizer = engine_on("cuda:0", autocast)
        engine.routing.per_adapter = per_adapter
        train(engine, tokenizer.pad_token_id, [4, 4, 4], steps=1)  # B nonzero from here on
        rows = list(task().train)[:12]
        from mlora_cli.data.batches import collate, token_losses

        batch = collate(rows, tokenizer.pad_token_id, "cuda:0")
        with engine.routed([0, 1, 2], [4, 4, 4]):  # equal groups: the padded bmm unless per-adapter
            logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, tokens, _ = token_losses(logits, batch.labels)
        (loss.sum() / tokens.sum()).backward()
        grads = torch.cat([g.flatten().float().cpu() for layer in engine.layers.values()
                           for g in (layer.lora_A.grad, layer.lora_B.grad)])
        outcomes[per_adapter] = logits.float().cpu(), grads
    tolerance = 1e-4 if autocast == "off" else 3e-2
    torch.testing.assert_close(outcomes[True][0], outcomes[False][0], atol=tolerance * 10, rtol=tolerance)
    assert (outcomes[True][1] - outcomes[False][1]).norm() <= tolerance * outcomes[True][1].norm()


def test_bf16_autocast_tracks_fp32() -> None:
    ends = {}
    for autocast in ("off", "bfloat16"):
        engine, tokenizer = engine_on("cuda:0", autocast)
        start = [weights(engine, s) for s in range(3)]
        ends[autocast] = train(engine, tokenizer.pad_token_id, [3, 5, 8], steps=4), [weights(engine, s)
                                                                                     for s in range(3)]
    for fp32_step, bf16_step in zip(ends["off"][0], ends["bfloat16"][0]):
        assert bf16_step == pytest.approx(fp32_step, rel=0.02)
    for slot in range(3):
        for key, value in ends["off"][1][slot].items():
            update, bf16_update = value - start[slot][key], ends["bfloat16"][1][slot][key] - start[slot][key]
            moved = update.abs() > 1e-6
            assert (update.sign() == bf16_update.sign())[moved].float().mean() > 0.9, key


def test_dropout_masks_on_cuda_do_not_depend_on_neighbours() -> None:
    alone, tokenizer = engine_on("cuda:0")
    train(alone, tokenizer.pad_token_id, [5], steps=3, dropout=0.1, slots=[1])
    together, _ = engine_on("cuda:0")
    train(together, tokenizer.pad_token_id, [3, 5], steps=3, dropout=0.1, slots=[0, 1])
    for key, value in weights(alone, 1).items():
        torch.testing.assert_close(weights(together, 1)[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_greedy_evaluation_on_cuda_gives_the_cpus_tokens_and_rl_samples_are_seeded_on_it() -> None:
    """Greedy evaluation: the CPU's tokens. RL sampling draws its noise on the GPU from per-row generators
    (Philox, not the CPU's Mersenne Twister: other samples than the CPU's), so it must be reproducible there
    and not depend on the neighbours."""
    scores = {}
    for device in ("cpu", "cuda:0"):
        engine, tokenizer = engine_on(device)
        train(engine, tokenizer.pad_token_id, [3, 5, 8], steps=3)
        tasks = [task("sort"), task("copy")]
        requests = [EvalRequest(f"a{slot}", slot, tasks, seed=slot) for slot in range(3)]
        scores[device], _ = evaluate(engine, requests, EvalConfig(metrics=("loss", "exact_match")), tokenizer)
        RLConfig()  # the RL defaults load on this device's build too
    # `engine` is now the cuda one (the loop's last device).
    rl_requests = [RolloutRequest(slot, list(tasks[0].train[:2]), 3, 1.0, 0.9, 6, list(range(10 * slot, 10 * slot + 6)))
                   for slot in range(3)]
    together = [r.completion_ids for r in sample(engine, rl_requests, tokenizer.pad_token_id, tokenizer.eos_token_id)]
    again = [r.completion_ids for r in sample(engine, rl_requests, tokenizer.pad_token_id, tokenizer.eos_token_id)]
    alone = sample(engine, rl_requests[1:2], tokenizer.pad_token_id, tokenizer.eos_token_id)[0].completion_ids
    assert together == again and together[1] == alone
    for name, per_task in scores["cpu"].items():
        for task_name, values in per_task.items():
            assert scores["cuda:0"][name][task_name]["exact_match"] == values["exact_match"]
            assert scores["cuda:0"][name][task_name]["loss"] == pytest.approx(values["loss"], rel=1e-4)


RUN = micro_sweep(
    name="gpu", devices=["cuda:0"], seed=2,
    tasks=[*builtin_tasks("copy", "reverse", train_examples=32, eval_examples=8, steps=6),
           *builtin_tasks("sort", train_examples=32, eval_examples=8, steps=6, objective="grpo",
                          reward="char_accuracy")],
    adapter={"target_modules": list(TARGETS), "dropout": 0.05},
    train={"batch_size": 4, "max_seq_len": 32, "checkpoint_every": 2,
           "rl": {"group_size": 2, "max_new_tokens": 6, "num_iterations": 2}},
    eval={"metrics": ["loss", "exact_match", "reward"], "max_new_tokens": 6},
    sweep={"list": [{"adapter.strategy": s} for s in ("naive", "replay", "ewc", "lwf", "olora")]},
)


def only_run(folder: Path) -> Path:
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


@pytest.mark.slow
def test_a_cuda_run_with_strategies_and_rl_resumes_to_the_same_results(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    result = mlora("run", write_sweep(reference, RUN), "--no-plots")
    assert result.exit_code == 0, result.output
    expected = json.loads((only_run(reference) / "results.json").read_text())
    assert all(e["status"] == "done" for e in expected["adapters"].values())
    assert expected["run"].get("cuda_max_allocated_mib", 0) > 0

    stopped = tmp_path / "stopped"
    stopped.mkdir()

    def some_adapter_at_step_9() -> bool:
        metrics = list((stopped / "runs").glob("*/metrics.jsonl"))
        return bool(metrics) and any(json.loads(line)["step"] >= 9 for line in metrics[0].read_text().splitlines()[:-1])

    done = stop_mid_run(stopped, write_sweep(stopped, RUN), signal.SIGTERM, some_adapter_at_step_9, dict(os.environ))
    assert done.returncode == 143, done.stdout
    resumed = mlora("run", "--resume", only_run(stopped), "--no-plots")
    assert resumed.exit_code == 0, resumed.output
    got = json.loads((only_run(stopped) / "results.json").read_text())
    for name, entry in expected["adapters"].items():
        want, have = numbers(entry["matrix"]), numbers(got["adapters"][name]["matrix"])
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)


if __name__ == "__main__":  # scripts/gpu_check.sh: python tests/test_gpu.py
    sys.exit(pytest.main([__file__, "-q", "-m", "gpu"]))
