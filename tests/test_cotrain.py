"""Co-training is exact: N adapters trained together for 20 fused steps end with the same
weights as each adapter trained alone with plain PEFT and torch.optim.AdamW(fused=True) on the same
batches (fp32, rel. tol 1e-4), including warmup/cosine schedules, weight decay, per-adapter
clipping, mixed ranks and batch sizes, and steps where an adapter has no rows; through the
per-adapter matmuls and fused AdamW kernel (the CPU's path) and the batched matmuls and
masked AdamW over all slots (the GPU's path, run here on CPU).

When adapters share their rows (same seed in a sweep), the fused batch is padded exactly as
each adapter's own batch, and on the CPU every adapter is then bit-identical to PEFT alone; also
when all have one rank, so that their matmuls are batched (`exact_batch`) forward and backward.
"""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from mlora_cli.data.batches import collate, token_losses, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.model import clip_norms, exact_batch, optim, per_adapter
from mlora_cli.model.base import build_builtin
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.optim import lr_factor
from mlora_cli.spec.schema import AdapterConfig, TaskConfig, TrainConfig
from mlora_cli.train.step import StepInput, fused_step

STEPS = 20
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = [
    (AdapterConfig(rank=2, alpha=4.0, lr=3e-3, weight_decay=0.01, target_modules=TARGETS),
     TrainConfig(batch_size=2, max_grad_norm=1.0, warmup_steps=3, schedule="cosine")),
    (AdapterConfig(rank=4, alpha=8.0, lr=1e-2, weight_decay=0.0, beta2=0.99, target_modules=TARGETS),
     TrainConfig(batch_size=3, max_grad_norm=None, schedule="linear")),
    (AdapterConfig(rank=8, alpha=32.0, lr=5e-3, weight_decay=0.1, target_modules=("q_proj", "v_proj")),
     TrainConfig(batch_size=4, max_grad_norm=0.05, schedule="constant")),
]


def rows_for_test():
    model, tokenizer = build_builtin("builtin:micro")
    task = load_task(TaskConfig(name="reverse", source="builtin:reverse", train_examples=64, eval_examples=8), 0, None)
    return model, tokenizer, tokenize_task(task, tokenizer, 32).train


def absent(slot: int, step: int) -> bool:
    return slot == 1 and step in (4, 5, 11)  # adapter 1 sits some steps out


EQUAL_RANKS = ("equal-ranks", "equal-ranks-padded")  # the engine at the adapters' rank, or above it


def adapters_for(mode: str) -> list[tuple[AdapterConfig, TrainConfig]]:
    """ADAPTERS, or (the equal-rank modes) all of rank 4 on every projection: one run of groups per layer; and two
    of them clipping hard, so that several slots clip in a step."""
    if mode not in EQUAL_RANKS:
        return ADAPTERS
    return [(dataclasses.replace(config, rank=4, target_modules=TARGETS),
             dataclasses.replace(train, max_grad_norm=0.05 if train.max_grad_norm is not None else None))
            for config, train in ADAPTERS]


def batches(mode: str) -> list[list[list[int]]]:
    rng = random.Random(0)
    if mode in ("shared", *EQUAL_RANKS):
        return [[rows] * len(ADAPTERS) for rows in (rng.sample(range(64), 3) for _ in range(STEPS))]
    sizes = [t.batch_size for _, t in ADAPTERS] if mode == "unequal" else [3, 3, 3]
    return [[rng.sample(range(64), sizes[slot]) for slot in range(len(ADAPTERS))] for _ in range(STEPS)]


@pytest.mark.parametrize("mode", ["uniform", "unequal", "batched", "shared", *EQUAL_RANKS])
def test_cotrained_weights_equal_peft_trained_alone(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ADAPTERS = adapters_for(mode)  # noqa: N806 (the module's list, or its equal-rank variant)
    batched_runs: list[int] = []
    run_grads = per_adapter._run_grads
    monkeypatch.setattr(per_adapter, "_run_grads", lambda *args: batched_runs.append(1) or run_grads(*args))
    monkeypatch.setattr(exact_batch, "_EXACT", {})  # the shape classes this test checks, and what was found
    monkeypatch.setattr(exact_batch, "_EXACT_NORMS", {})
    by_parameter: list[bool] = []  # whether each step's norms were row reductions
    norms = clip_norms.by_parameter

    def spied(*args: object) -> object:
        result = norms(*args)  # type: ignore[arg-type]
        by_parameter.append(result is not None)
        return result

    monkeypatch.setattr(clip_norms, "by_parameter", spied)
    stack_clips: list[int] = []
    clip_stacks = optim.clip_stacks
    monkeypatch.setattr(optim, "clip_stacks", lambda *args: stack_clips.append(1) or clip_stacks(*args))
    # Gradient stacks the backward should write entirely start as NaN: an entry it missed would show.
    monkeypatch.setattr(per_adapter, "unfilled", lambda like, shape: like.new_full(shape, float("nan")))
    model, tokenizer, rows = rows_for_test()
    reference = copy.deepcopy(model)
    engine = MultiLoraModel(model, TARGETS, len(ADAPTERS), 8 if mode == "equal-ranks-padded" else
                            max(config.rank for config, _ in ADAPTERS))
    assert engine.routing.per_adapter  # the CPU default
    engine.routing.per_adapter = mode != "batched"
    assert engine.optimizer.per_slot_fused  # the CPU default
    engine.optimizer.per_slot_fused = mode != "batched"  # "batched" is the GPU's path throughout
    for slot, (config, train) in enumerate(ADAPTERS):
        engine.load_slot(slot, config, train.max_grad_norm, seed=slot)
    initial = [engine.slot_weights(slot, config) for slot, (config, _) in enumerate(ADAPTERS)]
    plan = batches(mode)

    counts = [0] * len(ADAPTERS)
    for step in range(STEPS):
        inputs = []
        for slot, (config, train) in enumerate(ADAPTERS):
            if absent(slot, step):
                continue
            total = STEPS - sum(absent(slot, s) for s in range(STEPS))
            lr = config.lr * lr_factor(counts[slot], total, train.warmup_steps, train.schedule)
            inputs.append(StepInput(slot, [rows[i] for i in plan[step][slot]], lr, 0.0, None))
            counts[slot] += 1
        if step == 4:
            before = engine.slot_weights(1, ADAPTERS[1][0])
        results, _ = fused_step(engine, inputs, tokenizer.pad_token_id)
        assert all(r.finite for r in results)
        if step == 4:  # an adapter with no rows in a step does not change at all
            for key, value in engine.slot_weights(1, ADAPTERS[1][0]).items():
                assert torch.equal(value, before[key])

    for slot, (config, train) in enumerate(ADAPTERS):
        peft = get_peft_model(
            copy.deepcopy(reference),
            LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                       target_modules=list(config.target_modules)),
        )
        set_peft_model_state_dict(peft, initial[slot])
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                      weight_decay=config.weight_decay, fused=True)
        total = STEPS - sum(absent(slot, s) for s in range(STEPS))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k, total=total, train=train: lr_factor(k, total, train.warmup_steps, train.schedule)
        )
        for step in range(STEPS):
            if absent(slot, step):
                continue
            batch = collate([rows[i] for i in plan[step][slot]], tokenizer.pad_token_id)
            logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss_sum, tokens, _ = token_losses(logits, batch.labels)
            (loss_sum.sum() / tokens.sum()).backward()
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        expected = get_peft_model_state_dict(peft)
        got = engine.slot_weights(slot, config)
        assert set(expected) == set(got)
        for key in expected:
            if mode in ("shared", *EQUAL_RANKS):
                assert torch.equal(got[key], expected[key]), f"adapter {slot} {key}"
            else:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"adapter {slot} {key}")
        # Training moved the weights: the comparison is not of two untouched tensors.
        assert any(not torch.allclose(got[k], initial[slot][k]) for k in got if "lora_B" in k)
    assert bool(batched_runs) == (mode in EQUAL_RANKS)  # the batched backward ran where it applies
    if mode in EQUAL_RANKS:  # and made some matmuls as one bmm (the shapes this machine rounds as mm)
        assert any(exact_batch._EXACT.values())
        assert any(by_parameter)  # and took the norms as row reductions
        assert stack_clips  # and clipped several slots with one multiply per stacked gradient
