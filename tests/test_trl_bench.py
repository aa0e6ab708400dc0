"""The trl bench mode: TRL's GRPOTrainer, one process per experiment, against the real TRL.

mlora's RL settings map onto a GRPOConfig TRL accepts, with one optimizer step per sampling of
batch_size prompts x group_size completions; a micro RL sweep on builtin:tiny runs through
`run_trl` (a process per adapter) and writes a reward per step, matrices of the baseline's shape
and TRL's version, TRL having seen mlora's prompts in mlora's order (an SFT warm-up task through
SFTTrainer first); a sweep the mode cannot run (no RL task, a strategy, no TRL) stops with one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import builtin_tasks, micro_sweep, write_sweep

pytest.importorskip("trl", reason="the trl bench mode needs TRL: pip install 'mlora-sweep[trl]'")

from mlora_cli.bench import trl_grpo  # noqa: E402
from mlora_cli.contract import load_resolved_sweep  # noqa: E402
from mlora_cli.errors import ConfigError  # noqa: E402
from mlora_cli.spec.sweep import expand  # noqa: E402

# Records the prompts of every call, then scores like char_accuracy.
LOGGING_REWARD = textwrap.dedent("""\
    import json, pathlib

    def graded(prompts, completions, references, **fields):
        with (pathlib.Path(__file__).parent / "calls.jsonl").open("a") as log:
            log.write(json.dumps(prompts) + "\\n")
        return [sum(a == b for a, b in zip(c, r)) / max(1, len(r)) for c, r in zip(completions, references)]
""")
TRL_SWEEP = micro_sweep(
    name="trl", base_model="builtin:tiny", devices="cpu",
    # eval_examples 3: evaluation scores 3 prompts at a time, a training step batch_size x group_size = 4
    tasks=[*builtin_tasks("copy", train_examples=16, eval_examples=3, min_len=3, max_len=4,
                          reward="python:./reward.py:graded"),  # a supervised warm-up: SFTTrainer
           *builtin_tasks("reverse", train_examples=16, eval_examples=3, min_len=3, max_len=4,
                          objective="grpo", reward="python:./reward.py:graded")],
    adapter={"rank": 4, "alpha": 8, "target_modules": "all-linear"},
    train={"steps_per_task": 2, "batch_size": 2, "rl": {"group_size": 2, "max_new_tokens": 4, "kl_beta": 0.1}},
    eval={"metrics": ["loss", "reward"], "max_new_tokens": 4},
    sweep={"grid": {"adapter.lr": [1e-3, 3e-3]}},
)


def test_grpo_settings_map_mlora_rl_onto_a_config_trl_accepts(tmp_path: Path) -> None:
    from trl import GRPOConfig

    sweep = micro_sweep(tasks=builtin_tasks("copy", objective="grpo"),
                        train={"batch_size": 3, "max_grad_norm": None,
                               "rl": {"group_size": 4, "loss": "dr_grpo", "scale_rewards": "none", "top_p": 0.9}})
    spec, _ = load_resolved_sweep(write_sweep(tmp_path, sweep), tmp_path)
    (adapter,) = expand(spec)
    config = GRPOConfig(output_dir=str(tmp_path), **trl_grpo.grpo_settings(spec, adapter, 5, on_gpu=False))
    # One optimizer step: 3 prompts x 4 completions, generated once and used once.
    assert config.generation_batch_size == config.per_device_train_batch_size == 12
    assert config.generation_batch_size // config.num_generations == 3 and config.steps_per_generation == 1
    assert (config.loss_type, config.scale_rewards, config.top_p, config.max_steps) == ("dr_grpo", "none", 0.9, 5)
    assert config.max_grad_norm == 0.0  # Trainer's "no clipping", mlora's null
    assert not config.bf16 and config.use_cpu and not config.gradient_checkpointing


@pytest.mark.slow
def test_run_trl_writes_a_reward_per_step_and_the_matrices(tmp_path: Path) -> None:
    from mlora_cli.bench.bench import summarize
    from mlora_cli.data.batches import BatchSampler
    from mlora_cli.data.sources import load_task

    (tmp_path / "reward.py").write_text(LOGGING_REWARD)
    sweep = write_sweep(tmp_path, TRL_SWEEP)
    spec, _ = load_resolved_sweep(sweep, tmp_path)
    adapters = expand(spec)
    mode = trl_grpo.run_trl(sweep, tmp_path, adapters, tmp_path / "trl", progress=lambda text: None)

    assert mode["mode"] == "trl" and mode["experiments"] == 2 and mode["train_tokens"] > 0
    assert summarize(mode, None)["experiments_per_hour"] > 0
    for adapter in adapters:
        result = json.loads((tmp_path / "trl" / f"{adapter.name}.json").read_text())
        assert len(result["rl_rewards"]) == 2 == len(mode["rl_rewards"][adapter.name])  # the RL task's 2 steps
        assert all(0.0 <= r <= 1.0 for r in result["rl_rewards"])
        assert set(result["matrix"]) == {"loss", "reward"}
        assert all(len(m) == 3 and all(len(row) == 2 for row in m) for m in result["matrix"].values())  # 1 + 2 tasks
        assert set(result["final"]) == {"copy", "reverse"} and result["final"] == mode["final"][adapter.name]
        assert result["trl_version"] and result["grpo_config"]["beta"] == 0.1
        assert 0 < result["startup_seconds"] < result["wall_seconds"] and result["train_seconds"] > 0

    # TRL sampled mlora's prompts, in mlora's per-adapter order, each group_size times.
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    steps = [prompts for prompts in calls if len(prompts) == 4]
    expected = []
    for index, task in list(enumerate(spec.tasks))[1:]:
        data = load_task(task, adapters[0].seed, tmp_path)
        sampler = BatchSampler(len(data.train), adapters[0].seed, index)
        expected += [[data.train[i].prompt for i in sampler.next(2) for _ in range(2)] for _ in range(2)]
    assert steps == expected * 2  # both adapters share the sweep's seed


def main_exits(tmp_path: Path, sweep: dict) -> subprocess.CompletedProcess:
    path = write_sweep(tmp_path, sweep)
    name = expand(load_resolved_sweep(path, tmp_path)[0])[0].name
    return subprocess.run([sys.executable, "-m", "mlora_cli.bench.trl_grpo", str(path), name,
                           str(tmp_path / "out.json"), str(tmp_path)], capture_output=True, text=True, timeout=120)


def test_a_sweep_without_an_rl_task_stops_with_one_line(tmp_path: Path) -> None:
    sweep = micro_sweep(tasks=builtin_tasks("copy", "reverse"))
    done = main_exits(tmp_path, sweep)
    assert done.returncode == 1 and not (tmp_path / "out.json").exists()
    assert done.stderr.strip() == "tasks: the trl bench mode compares RL, and no task has objective: grpo"
    adapters = expand(load_resolved_sweep(tmp_path / "sweep.yaml", tmp_path)[0])
    with pytest.raises(ConfigError, match="no task has objective: grpo"):
        trl_grpo.run_trl(tmp_path / "sweep.yaml", tmp_path, adapters, tmp_path / "trl", progress=lambda text: None)
    assert not (tmp_path / "trl").exists()  # nothing ran


def test_strategies_and_a_missing_trl_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = micro_sweep(tasks=builtin_tasks("copy", objective="grpo"),
                        sweep={"grid": {"adapter.strategy": ["naive", "ewc"]}})
    spec, _ = load_resolved_sweep(write_sweep(tmp_path, sweep), tmp_path)
    adapters = expand(spec)
    assert trl_grpo.unsupported(spec, adapters) == [
        f"sweep: the trl bench mode runs naive GRPO without dropout; not: {adapters[1].name}"]
    dropout = dataclasses.replace(adapters[0], adapter=dataclasses.replace(adapters[0].adapter, dropout=0.1))
    assert trl_grpo.unsupported(spec, [dropout]) != []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "trl" else find_spec(name, *rest))
    assert trl_grpo.unsupported(spec, adapters[:1]) == [trl_grpo.TRL_MISSING]
    assert trl_grpo.TRL_MISSING == "the trl bench mode needs TRL: pip install 'mlora-sweep[trl]'"
