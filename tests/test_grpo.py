"""GRPO-family RL in the fused engine: advantages, the fused RL step against plain PEFT on the same
samples, samples that do not depend on neighbours, and whole runs (SFT then GRPO; a failing
reward stopping only its adapter; a run stopped mid-RL resuming to the same results)."""

from __future__ import annotations

import copy
import json
import os
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, engine_with_trained_b, micro_sweep, mlora, numbers, write_sweep
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from mlora_cli.data.batches import Row, collate, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.model.base import build_builtin
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.prompt_sharing import shared_rows
from mlora_cli.run import worker
from mlora_cli.spec.schema import AdapterConfig, RLConfig, TaskConfig
from mlora_cli.train.grpo import advantages
from mlora_cli.train.rollout import RolloutRequest, sample
from mlora_cli.train.step import StepInput, fused_step

TARGETS = ("q_proj", "v_proj", "down_proj")


def test_advantages_are_group_relative_and_zero_for_equal_rewards() -> None:
    rewards = [1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]
    scaled = advantages(rewards, 4, "group")
    assert scaled[4:] == [0.0] * 4  # a group whose rewards are all equal teaches nothing
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item()
    assert scaled[:4] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2)
    assert advantages(rewards, 4, "none")[:4] == pytest.approx([0.5, -0.5, 0.5, -0.5])


def sampled_rows(tokenizer: Any, count: int, completion_length: int, offset: int, group: int = 4) -> list[Row]:
    """`count` rows in groups of `group` rows sharing a prompt, as sampling gives them."""
    task = load_task(TaskConfig(name="copy", source="builtin:copy", train_examples=32, eval_examples=4), 0, None)
    prompts = tokenize_task(task, tokenizer, 32).train
    # Completions of different lengths per row, as sampling gives: loss on the completion only.
    rows = []
    for i in range(count):
        prompt = prompts[offset + i // group]
        completion = tuple(range(10 + i % 2, 10 + i % 2 + completion_length + i % 3))
        rows.append(Row(prompt.ids[: prompt.prompt_len] + completion, prompt.prompt_len, "x"))
    return rows


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared-prompts", "full-rows"])
@pytest.mark.parametrize(("loss", "kl_beta"), [("dapo", 0.0), ("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.5)],
                         ids=["dapo", "grpo", "dr_grpo", "dapo-kl"])
def test_fused_rl_step_equals_plain_peft_on_the_same_samples(loss: str, kl_beta: float, share_prompts: bool) -> None:
    """Two adapters, different samples, advantages and completion lengths: each ends where plain PEFT
    with the same loss, clipping and AdamW ends, its normalisation over its own tokens only; with
    kl_beta, the KL reference is the base with the adapter off. Each adapter's log-probabilities are those
    of its sampling policy, softmax(logits / its temperature), as TRL's. The same with each group's prompt
    run once (model.share_prompts) and with every row in full."""
    model, tokenizer = build_builtin("builtin:micro")
    reference = copy.deepcopy(model)
    configs = [AdapterConfig(rank=4, alpha=8.0, lr=1e-2, target_modules=TARGETS),
               AdapterConfig(rank=2, alpha=4.0, lr=3e-3, target_modules=TARGETS)]
    rls = [RLConfig(group_size=4, loss=loss, max_new_tokens=8, kl_beta=kl_beta, temperature=temperature)
           for temperature in (0.7, 1.0)]
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8)]  # the second's completions are longer
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group")]
    engine = MultiLoraModel(model, TARGETS, 2, 4, share_prompts=share_prompts)
    for slot, config in enumerate(configs):
        engine.load_slot(slot, config, 1.0, seed=slot)
    initial = [engine.slot_weights(slot, config) for slot, config in enumerate(configs)]
    for _ in range(3):
        results, _ = fused_step(engine, [StepInput(slot, rows[slot], configs[slot].lr, 0.0, None, scores[slot],
                                                   rls[slot]) for slot in range(2)], tokenizer.pad_token_id)
        assert all(r.finite for r in results)

    for slot, config in enumerate(configs):
        peft = get_peft_model(copy.deepcopy(reference), LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                                                   target_modules=list(TARGETS)))
        set_peft_model_state_dict(peft, initial[slot])
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        advantage = torch.tensor(scores[slot]).unsqueeze(1)
        rl = rls[slot]
        for _ in range(3):
            batch = collate(rows[slot], tokenizer.pad_token_id)
            logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            logits = logits / rl.temperature
            targets = batch.labels[:, 1:]
            mask = (targets != -100).float()
            log_p = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            per_token = -advantage * torch.exp(log_p - log_p.detach())
            if kl_beta:
                with torch.no_grad(), peft.disable_adapter():
                    base = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                    base_p = torch.log_softmax(base.float() / rl.temperature, -1).gather(
                        -1, targets.clamp(min=0).unsqueeze(-1))
                gap = base_p.squeeze(-1) - log_p
                per_token = per_token + kl_beta * (torch.exp(gap) - gap - 1)
            if loss == "dapo":
                objective = (per_token * mask).sum() / mask.sum()
            elif loss == "grpo":
                objective = ((per_token * mask).sum(1) / mask.sum(1)).mean()
            else:
                objective = (per_token * mask).sum() / (mask.size(0) * rl.max_new_tokens)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        expected, got = get_peft_model_state_dict(peft), engine.slot_weights(slot, config)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"adapter {slot} {key}")
        assert any(not torch.allclose(got[k], initial[slot][k]) for k in got if "lora_B" in k)


def embedded_tokens(engine: MultiLoraModel) -> list[int]:
    """A list that collects the number of token positions of every forward through the model (padding included)."""
    seen: list[int] = []
    engine.model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    return seen


def test_shared_prompts_run_each_group_prompt_once_for_the_full_rows_step() -> None:
    """model.share_prompts: an RL step runs each group's prompt once and the rows' completions on its cache; the
    losses, gradient norms and updates are the full rows' up to float rounding. A cut completion that carries no
    loss (mask_truncated: its whole row is prompt) stays in its group."""
    _, tokenizer = build_builtin("builtin:micro")
    config = AdapterConfig(rank=4, alpha=8.0, lr=1e-2, target_modules=TARGETS)
    rl = RLConfig(group_size=4, max_new_tokens=8, loss="grpo")
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8)]
    cut = rows[0][5]
    rows[0][5] = Row(cut.ids, cut.tokens, cut.completion)  # as scored_batch masks a truncated completion
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group")]
    outcome = {}
    for share in (True, False):
        engine = MultiLoraModel(build_builtin("builtin:micro")[0], TARGETS, 2, 4, share_prompts=share)
        for slot in range(2):
            engine.load_slot(slot, config, 1.0, seed=slot)
        tokens = embedded_tokens(engine)
        results, _ = fused_step(engine, [StepInput(slot, rows[slot], config.lr, 0.0, None, scores[slot], rl)
                                         for slot in range(2)], tokenizer.pad_token_id)
        outcome[share] = results, [engine.slot_weights(slot, config) for slot in range(2)], tokens
    (shared, shared_weights, shared_tokens), (full, full_weights, full_tokens) = outcome[True], outcome[False]
    layout = shared_rows(rows)
    assert len(layout.prefixes) == 3 and layout.first_label[5] == len(layout.suffixes[5])  # the cut row: no loss
    assert shared_tokens == [len(layout.prefixes) * max(map(len, layout.prefixes)),
                             12 * max(map(len, layout.suffixes))]
    assert full_tokens == [12 * max(row.tokens for part in rows for row in part)]
    assert sum(shared_tokens) < full_tokens[0]
    for got, want in zip(shared, full):
        assert got.tokens == want.tokens
        assert got.loss == pytest.approx(want.loss, rel=1e-6)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    for got, want in zip(shared_weights, full_weights):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_an_rl_adapter_trains_the_same_beside_a_supervised_neighbour() -> None:
    """Which pass an adapter takes depends on itself only: RL adapters with shared prompts, a supervised one with
    full rows. Mixed in one step (two passes), each ends bit for bit where it ends in a step of its own kind."""
    _, tokenizer = build_builtin("builtin:micro")
    config = AdapterConfig(rank=4, alpha=8.0, lr=1e-2, target_modules=TARGETS)
    rl = RLConfig(group_size=4, max_new_tokens=8)
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8), sampled_rows(tokenizer, 3, 4, 20, 1)]
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group"), None]

    def trained(slots: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        engine = MultiLoraModel(build_builtin("builtin:micro")[0], TARGETS, 3, 4)
        for slot in range(3):
            engine.load_slot(slot, config, 1.0, seed=slot)
        inputs = [StepInput(slot, rows[slot], config.lr, 0.0, None, scores[slot], rl if scores[slot] else None)
                  for slot in slots]
        for _ in range(2):
            fused_step(engine, inputs, tokenizer.pad_token_id)
        return {slot: engine.slot_weights(slot, config) for slot in slots}

    mixed, rl_only, sft_only = trained([0, 2, 1]), trained([0, 1]), trained([2])
    for slot, alone in [(0, rl_only), (1, rl_only), (2, sft_only)]:
        assert all(torch.equal(mixed[slot][key], alone[slot][key]) for key in alone[slot]), slot


def sampling_engine() -> tuple[MultiLoraModel, Any, tuple[Row, ...]]:
    """Two adapters with nonzero B (each changes the distribution), the tokenizer, and copy-task prompts."""
    engine, _, tokenizer = engine_with_trained_b(TARGETS, AdapterConfig(rank=4, target_modules=TARGETS), slots=2,
                                                 nonzero=2)
    prompts = tokenize_task(load_task(TaskConfig(name="c", source="builtin:copy", train_examples=16, eval_examples=2),
                                      0, None), tokenizer, 32).train
    return engine, tokenizer, prompts


def test_sampling_prefills_each_group_prompt_once_with_the_same_samples() -> None:
    engine, tokenizer, prompts = sampling_engine()
    requests = [RolloutRequest(1, list(prompts[4:9]), 3, 0.7, 1.0, 6, list(range(15))),
                RolloutRequest(0, list(prompts[0:2]), 4, 1.0, 0.9, 6, list(range(100, 108)))]
    tokens = embedded_tokens(engine)
    shared = sample(engine, requests, tokenizer.pad_token_id, tokenizer.eos_token_id)
    shared_prefill, calls = tokens[0], len(tokens)
    engine.share_prompts = False
    full = sample(engine, requests, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in full]
    assert [r.rows for r in shared] == [r.rows for r in full]
    longest = max(row.prompt_len for row in prompts[:9])
    assert shared_prefill == 7 * longest and tokens[calls] == 23 * longest  # 7 prompts, 23 rows


def test_samples_depend_on_the_adapter_and_its_counters_only() -> None:
    engine, tokenizer, prompts = sampling_engine()

    def request(slot: int, first: int, count: int, temperature: float) -> RolloutRequest:
        return RolloutRequest(slot, list(prompts[first:first + count]), 3, temperature, 0.9, 6,
                              [100 * slot + k for k in range(3 * count)])

    alone = sample(engine, [request(0, 0, 2, 1.0)], tokenizer.pad_token_id, tokenizer.eos_token_id)[0]
    together = sample(engine, [request(1, 4, 5, 0.7), request(0, 0, 2, 1.0)], tokenizer.pad_token_id,
                      tokenizer.eos_token_id)
    assert together[1].completion_ids == alone.completion_ids
    assert together[1].rows == alone.rows
    other_seeds = sample(engine, [RolloutRequest(0, list(prompts[0:2]), 3, 1.0, 0.9, 6, list(range(50, 56)))],
                         tokenizer.pad_token_id, tokenizer.eos_token_id)[0]
    assert other_seeds.completion_ids != alone.completion_ids  # the seeds do drive the samples


FLAKY = textwrap.dedent("""\
    import os
    calls = []

    def graded(prompts, completions, references, **fields):
        calls.append(1)
        if len(calls) == int(os.environ.get("FAIL_ON", "0")):
            raise ValueError("bad completion")
        return [sum(a == b for a, b in zip(c, r)) / max(1, len(r)) for c, r in zip(completions, references)]
""")
RL_SWEEP = micro_sweep(
    name="rl", devices="cpu", seed=3,
    tasks=[*builtin_tasks("copy", train_examples=16, eval_examples=4, min_len=4, max_len=4, steps=3),
           *builtin_tasks("reverse", train_examples=16, eval_examples=4, min_len=4, max_len=4, steps=6,
                          objective="grpo", reward="python:./flaky.py:graded")],
    adapter={"rank": 4, "target_modules": list(TARGETS)},
    # Each batch of samples trains 2 steps: a state saved between the two resumes with the batch and its pi_old.
    train={"checkpoint_every": 3, "rl": {"group_size": 3, "max_new_tokens": 6, "num_iterations": 2}},
    eval={"metrics": ["loss", "reward"], "max_new_tokens": 6},
    sweep={"grid": {"train.rl.loss": ["dapo", "grpo"]}},
)


def run_rl(folder: Path, *args: str) -> tuple[Any, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flaky.py").write_text(FLAKY)
    result = mlora("run", write_sweep(folder, RL_SWEEP), "--no-plots", *args)
    (run_dir,) = (folder / "runs").iterdir()
    return result, run_dir


@pytest.fixture(scope="module")
def rl_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result, run_dir = run_rl(tmp_path_factory.mktemp("rl"))
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.mark.slow
def test_sft_then_grpo_run_logs_rl_metrics(rl_reference: Path) -> None:
    records = [json.loads(line) for line in (rl_reference / "metrics.jsonl").read_text().splitlines()]
    rl_steps = [r for r in records if r["task"] == "reverse"]
    assert len(rl_steps) == 12 and all(r["task"] == "copy" for r in records if "reward_mean" not in r)
    for record in rl_steps:
        assert {"reward_mean", "reward_std", "zero_variance_groups", "truncated", "completion_tokens",
                "sample_seconds", "score_seconds"} <= set(record)
        assert 0.0 <= record["reward_mean"] <= 1.0 and 0.0 <= record["zero_variance_groups"] <= 1.0
    assert [r["sample_use"] for r in rl_steps if r["adapter"] == "dapo"] == [1, 2, 1, 2, 1, 2]
    results = json.loads((rl_reference / "results.json").read_text())["adapters"]
    for entry in results.values():
        assert entry["status"] == "done" and [len(row) for row in entry["matrix"]["reward"]] == [2, 2, 2]


@pytest.mark.slow
def test_a_failing_reward_in_rl_stops_only_its_adapter(rl_reference: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Calls: 2 evaluations of the base and the adapters before RL (4 calls: base x task, then each adapter's
    # eval of reverse after copy), then one per adapter per RL step: the 6th is "grpo"'s first RL step.
    monkeypatch.setenv("FAIL_ON", "6")
    result, run_dir = run_rl(tmp_path)
    assert result.exit_code == 1, result.output
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    reference = json.loads((rl_reference / "results.json").read_text())["adapters"]
    failed = [name for name, entry in adapters.items() if entry["status"] == "failed"]
    assert len(failed) == 1 and "ValueError: bad completion" in adapters[failed[0]]["failure"]
    (survivor,) = set(adapters) - set(failed)
    assert numbers(adapters[survivor]["matrix"]) == numbers(reference[survivor]["matrix"])


@pytest.mark.slow
def test_a_run_stopped_mid_rl_resumes_to_the_same_results(rl_reference: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = worker.rl_batches
    calls: list[int] = []

    def ctrl_c_on_the_third_rl_step(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    with monkeypatch.context() as patch:
        patch.setattr(worker, "rl_batches", ctrl_c_on_the_third_rl_step)
        stopped, run_dir = run_rl(tmp_path)
    assert stopped.exit_code == 130, stopped.output
    resumed = mlora("run", "--resume", run_dir, "--no-plots")
    assert resumed.exit_code == 0, resumed.output
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    reference = json.loads((rl_reference / "results.json").read_text())["adapters"]
    for name, entry in reference.items():
        got, want = numbers(adapters[name]["matrix"]), numbers(entry["matrix"])
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)


def test_reused_samples_train_with_the_clipped_ratio_as_plain_peft() -> None:
    """num_iterations 3: the first step records pi_old and the next two use it; the ratio moves and clip_eps
    0.05 clips it. Each adapter ends where plain PEFT with PPO's clipped surrogate ends: within 2% of the update
    (AdamW's first steps amplify rounding in the 7th digit to ~0.5% here; a missing clip is off by ~200%)."""
    model, tokenizer = build_builtin("builtin:micro")
    reference = copy.deepcopy(model)
    config = AdapterConfig(rank=4, alpha=8.0, lr=1e-2, target_modules=TARGETS)
    rl = RLConfig(group_size=4, max_new_tokens=8, num_iterations=3, clip_eps=0.05, temperature=0.8)
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8)]
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group")]
    engine = MultiLoraModel(model, TARGETS, 2, 4)
    for slot in range(2):
        engine.load_slot(slot, config, 1.0, seed=slot)
    initial = [engine.slot_weights(slot, config) for slot in range(2)]
    old: list[list[list[float]] | None] = [None, None]
    for use in range(3):
        inputs = [StepInput(slot, rows[slot], config.lr, 0.0, None, scores[slot], rl, old[slot], use == 0)
                  for slot in range(2)]
        fused_step(engine, inputs, tokenizer.pad_token_id)
        old = [part.recorded_log_probs if use == 0 else old[slot] for slot, part in enumerate(inputs)]
        assert all(o is not None for o in old)

    clipped_any = False
    for slot in range(2):
        peft = get_peft_model(copy.deepcopy(reference), LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
        set_peft_model_state_dict(peft, initial[slot])
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, fused=True)
        advantage = torch.tensor(scores[slot]).unsqueeze(1)
        batch = collate(rows[slot], tokenizer.pad_token_id)
        targets = batch.labels[:, 1:]
        mask = (targets != -100).float()
        pi_old = None
        for _ in range(3):
            logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
            log_p = torch.log_softmax(logits / 0.8, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            pi_old = log_p.detach() if pi_old is None else pi_old
            ratio = torch.exp(log_p - pi_old)
            clipped_any |= bool(((ratio - ratio.clamp(0.95, 1.05)).abs() * mask > 0).any())
            per_token = -torch.minimum(ratio * advantage, ratio.clamp(0.95, 1.05) * advantage)
            ((per_token * mask).sum() / mask.sum()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        expected, got = get_peft_model_state_dict(peft), engine.slot_weights(slot, config)
        for key in expected:
            update = (expected[key] - initial[slot][key]).abs().max()
            assert (got[key] - expected[key]).abs().max() <= 0.02 * update, f"adapter {slot} {key}"
    assert clipped_any  # the test reaches the clip


def test_lwf_adds_to_the_rl_loss_and_never_replaces_a_neighbours() -> None:
    """An LwF teacher in a pass adds its distillation to its own adapter's objective: an RL adapter with a teacher
    (lambda 0 here) keeps its RL loss, and an RL neighbour in the same pass (full rows: dropout) trains as beside
    no teacher at all."""
    from mlora_cli.train.step import _pass_losses
    from mlora_cli.train.strategies import Strategies

    _, tokenizer = build_builtin("builtin:micro")
    rl = RLConfig(group_size=4, max_new_tokens=8)
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8)]
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group")]
    lwf = AdapterConfig(rank=4, alpha=8.0, lr=1e-2, target_modules=TARGETS, strategy="lwf", lwf_lambda=0.0)

    def objectives(teacher: bool) -> torch.Tensor:
        engine = MultiLoraModel(build_builtin("builtin:micro")[0], TARGETS, 4, 4)  # 2 students, 2 teachers
        strategies = Strategies(engine, 2)
        for slot in (0, 1):
            engine.load_slot(slot, lwf, 1.0, seed=slot)
            strategies.start(slot, lwf, slot)
        if teacher:
            strategies.end_task(0, lwf, 0, 0, lambda: [], train_rows=0)
        inputs = [StepInput(slot, rows[slot], lwf.lr, 0.1, torch.Generator().manual_seed(slot), scores[slot], rl)
                  for slot in (0, 1)]
        objective, _, _ = _pass_losses(engine, inputs, tokenizer.pad_token_id, strategies, share=False)
        return objective.detach()

    assert torch.equal(objectives(teacher=True), objectives(teacher=False))


def test_the_logged_loss_of_rl_rows_builds_no_graph() -> None:
    """The next-token loss of RL rows is logged, not trained on: computed without a graph, it keeps no rows x length
    x vocab fp32 log-softmax alive through backward. With a supervised adapter in the pass it is its objective."""
    from mlora_cli.train.step import _pass_losses

    _, tokenizer = build_builtin("builtin:micro")
    engine = MultiLoraModel(build_builtin("builtin:micro")[0], TARGETS, 2, 4)
    config = AdapterConfig(rank=4, alpha=8.0, target_modules=TARGETS)
    for slot in (0, 1):
        engine.load_slot(slot, config, 1.0, seed=slot)
    rows = [sampled_rows(tokenizer, 8, 3, 0), sampled_rows(tokenizer, 4, 6, 8)]
    scores = [advantages([1, 0, 0, 0, 1, 1, 0, 1], 4, "group"), advantages([0.2, 0.9, 0.4, 0.1], 4, "group")]
    rl = [StepInput(slot, rows[slot], 1e-2, 0.0, None, scores[slot], RLConfig(group_size=4)) for slot in (0, 1)]
    for share in (True, False):
        objective, task_loss, _ = _pass_losses(engine, rl, tokenizer.pad_token_id, None, share=share)
        assert objective.requires_grad and not task_loss.requires_grad
    mixed = [rl[0], StepInput(1, rows[1], 1e-2, 0.0, None)]
    objective, task_loss, _ = _pass_losses(engine, mixed, tokenizer.pad_token_id, None, share=False)
    assert task_loss.requires_grad and torch.equal(objective[1], task_loss[1])
