"""Warm starts and replay for RL: `adapter.init_from` starts an adapter from a saved PEFT adapter (checked at
validate, evaluated as itself before its first step), and replay puts earlier tasks' prompts into RL batches,
each scored by its own task's reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import builtin_tasks, micro_sweep, mlora, write_sweep

from mlora_cli.data.batches import Row
from mlora_cli.spec.schema import RLConfig
from mlora_cli.train.grpo import RLJob, scored_batch
from mlora_cli.train.rollout import Rollout

TARGETS = ["q_proj", "v_proj"]
SFT_SWEEP = micro_sweep(
    name="sft", devices="cpu",
    tasks=builtin_tasks("copy", train_examples=16, eval_examples=4, min_len=3, max_len=3, steps=4),
    adapter={"rank": 4, "alpha": 8, "lr": 1e-2, "target_modules": TARGETS},
    eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 4},
)


def run(folder: Path, sweep: dict, *args: str):
    result = mlora("run", write_sweep(folder, sweep), "--no-plots", *args)
    runs = sorted((folder / "runs").iterdir()) if (folder / "runs").exists() else []
    return result, runs[-1] if runs else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    result, run_dir = run(folder, SFT_SWEEP)
    assert result.exit_code == 0, result.output
    return run_dir


def test_a_warm_start_is_evaluated_as_the_saved_adapter_before_its_first_step(trained: Path, tmp_path: Path) -> None:
    saved = json.loads((trained / "results.json").read_text())["adapters"]
    (name,) = saved
    warm = micro_sweep(**{**SFT_SWEEP, "name": "warm",
                          "adapter": {**SFT_SWEEP["adapter"], "init_from": str(trained / "adapters" / name)}})
    result, run_dir = run(tmp_path, warm)
    assert result.exit_code == 0, result.output
    entry = next(iter(json.loads((run_dir / "results.json").read_text())["adapters"].values()))
    # Row 0 (before training) is the saved adapter's final row, not the base's.
    assert entry["matrix"]["loss"][0] == pytest.approx(saved[name]["matrix"]["loss"][-1], rel=1e-5)
    assert entry["matrix"]["loss"][0] != saved[name]["matrix"]["loss"][0]


def test_a_warm_start_that_does_not_fit_is_one_line_at_validate(trained: Path, tmp_path: Path) -> None:
    (name,) = json.loads((trained / "results.json").read_text())["adapters"]
    folder = trained / "adapters" / name
    sweep = micro_sweep(**{**SFT_SWEEP, "adapter": {**SFT_SWEEP["adapter"], "rank": 8, "init_from": str(folder)}})
    result = mlora("validate", write_sweep(tmp_path, sweep))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"adapter.init_from: {folder} has r=4, lora_alpha=8; the adapter has rank 8, alpha 8: set them to match"]
    relative = micro_sweep(**{**SFT_SWEEP, "adapter": {**SFT_SWEEP["adapter"], "init_from": "missing/adapter"}})
    result = mlora("validate", write_sweep(tmp_path, relative))
    assert result.exit_code == 2 and f"{tmp_path.resolve()}/missing/adapter is not a PEFT adapter" in result.stderr


def test_a_warm_start_on_other_layers_fails_its_adapter_only_with_one_line(trained: Path, tmp_path: Path) -> None:
    """Found once the model is loaded (validate cannot see layers): that adapter fails with one line naming the key,
    its neighbour trains on."""
    (name,) = json.loads((trained / "results.json").read_text())["adapters"]
    sweep = micro_sweep(**{**SFT_SWEEP, "sweep": {"list": [
        {"name": "warm", "adapter.target_modules": ["q_proj"], "adapter.init_from": str(trained / "adapters" / name)},
        {"name": "plain"}]}})
    result, run_dir = run(tmp_path, sweep)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    assert adapters["plain"]["status"] == "done"
    failure = adapters["warm"]["failure"]
    assert failure.startswith("adapter.init_from: ") and "layers it does not target" in failure, failure


def test_a_damaged_warm_start_is_one_line_at_validate_and_in_eval(trained: Path, tmp_path: Path) -> None:
    (name,) = json.loads((trained / "results.json").read_text())["adapters"]
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((trained / "adapters" / name / "adapter_config.json").read_text())
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    sweep = micro_sweep(**{**SFT_SWEEP, "adapter": {**SFT_SWEEP["adapter"], "init_from": str(folder)}})
    result = mlora("validate", write_sweep(tmp_path, sweep))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"adapter.init_from: {folder}/adapter_model.safetensors: not a safetensors file (damaged or truncated)"]
    tasks = write_sweep(tmp_path, SFT_SWEEP)
    result = mlora("eval", "--base", "builtin:micro", "--adapter", str(folder), "--tasks", str(tasks))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    assert f"{folder}/adapter_model.safetensors: unreadable" in result.stderr


def test_an_adapter_saved_for_another_base_is_one_line_in_eval(trained: Path, tmp_path: Path) -> None:
    (name,) = json.loads((trained / "results.json").read_text())["adapters"]
    tasks = write_sweep(tmp_path, SFT_SWEEP)
    result = mlora("eval", "--base", "builtin:tiny", "--adapter", str(trained / "adapters" / name), "--tasks",
                   str(tasks))
    assert result.exit_code == 2 and "Traceback" not in result.output + result.stderr
    assert "saved for another base model or rank" in result.stderr


def test_replayed_prompts_are_scored_by_their_own_tasks_reward() -> None:
    config = RLConfig(group_size=2, max_new_tokens=4)

    class Characters:  # decodes token ids as the characters they code
        @staticmethod
        def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids)

    prompts = [Row((1,), 1, "abc", "now"), Row((1,), 1, "abd", "old")]
    completions = [[ord(c) for c in text] for text in ("abc", "abX", "abX", "abd")]
    rows = [Row((1, *ids), 1, prompts[k // 2].completion, prompts[k // 2].prompt) for k, ids in enumerate(completions)]
    rollout = Rollout(rows, completions, [False] * 4)
    job = RLJob("a", 0, 0, 0, prompts, config, "exact_match", "reverse", {1: ("char_accuracy", "copy")})
    batch = scored_batch(job, rollout, Characters(), 0.0)
    # Prompt 0 (this task): exact match 1, 0. Prompt 1 (replayed copy task): char accuracy 2/3, 1.
    assert batch.metrics["reward_mean"] == 0.5
    assert batch.metrics["replayed_reward_mean"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.slow
def test_replay_on_an_rl_task_samples_earlier_prompts(tmp_path: Path) -> None:
    sweep = micro_sweep(
        name="replay", devices="cpu",
        tasks=[*builtin_tasks("copy", train_examples=16, eval_examples=2, min_len=3, max_len=3, steps=2),
               *builtin_tasks("reverse", train_examples=16, eval_examples=2, min_len=3, max_len=3, steps=3,
                              objective="grpo", reward="char_accuracy")],
        adapter={"rank": 4, "target_modules": TARGETS, "buffer_size": 8, "replay_ratio": 0.5},
        train={"batch_size": 4, "rl": {"group_size": 2, "max_new_tokens": 4}},
        eval={"metrics": ["loss"], "max_new_tokens": 4},
        sweep={"grid": {"adapter.strategy": ["naive", "replay"]}},
    )
    result, run_dir = run(tmp_path, sweep)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = {name: [r for r in records if r["adapter"] == name and r["task"] == "reverse"] for name in ("naive", "replay")}
    assert len(rl["replay"]) == 3 and all("replayed_reward_mean" in r for r in rl["replay"])
    assert not any("replayed_reward_mean" in r for r in rl["naive"])


def test_truncated_completions_carry_no_loss_with_mask_truncated() -> None:
    class Characters:
        @staticmethod
        def decode(ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids)

    prompt = Row((1, 2), 2, "ab", "p")
    completions = [[ord("a"), ord("b")], [ord("a"), ord("x"), ord("y")]]  # the second was cut at max_new_tokens
    rows = [Row((1, 2, *ids), 2, "ab", "p") for ids in completions]
    rollout = Rollout(rows, completions, [False, True])
    for masked in (False, True):
        job = RLJob("a", 0, 0, 0, [prompt], RLConfig(group_size=2, max_new_tokens=3, mask_truncated=masked),
                    "exact_match", "t")
        batch = scored_batch(job, rollout, Characters(), 0.0)
        assert batch.metrics["truncated"] == 0.5 and batch.metrics["zero_variance_groups"] == 0.0
        assert batch.rows[0].prompt_len == 2  # the ended completion keeps its loss tokens
        assert batch.rows[1].prompt_len == (len(rows[1].ids) if masked else 2)  # all prompt: no loss tokens


@pytest.mark.slow
def test_strategies_apply_to_rl_tasks(tmp_path: Path) -> None:
    """l2, ewc and olora add their terms to RL gradients and lwf distils the previous adapter on the sampled
    rows: each ends elsewhere than naive RL from the same start, and every one finishes."""
    sweep = micro_sweep(
        name="rlcl", devices="cpu",
        tasks=[*builtin_tasks("copy", train_examples=16, eval_examples=2, min_len=3, max_len=3, steps=3),
               *builtin_tasks("reverse", train_examples=16, eval_examples=2, min_len=3, max_len=3, steps=3,
                              objective="grpo", reward="char_accuracy")],
        adapter={"rank": 4, "target_modules": TARGETS, "lr": 1e-2, "l2_lambda": 50.0, "ewc_lambda": 1e4,
                 "lwf_lambda": 5.0, "olora_lambda1": 5.0, "fisher_samples": 4},
        train={"batch_size": 2, "rl": {"group_size": 2, "max_new_tokens": 4}},
        eval={"metrics": ["loss"], "max_new_tokens": 4},
        sweep={"grid": {"adapter.strategy": ["naive", "l2", "ewc", "lwf", "olora"]}},
    )
    result, run_dir = run(tmp_path, sweep)
    assert result.exit_code == 0, result.output
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    assert all(entry["status"] == "done" for entry in adapters.values())
    naive = adapters["naive"]["matrix"]["loss"]
    for name in ("l2", "ewc", "lwf", "olora"):
        assert adapters[name]["matrix"]["loss"][1] == naive[1], name  # the same SFT task first
        assert adapters[name]["matrix"]["loss"][2] != naive[2], name  # then its term changed the RL task
