"""TRL's `GRPOTrainer` on one experiment of an RL sweep: the tool a user would otherwise pick for RL.

    python -m mlora_cli.bench.trl_grpo RESOLVED_SWEEP.yaml ADAPTER_NAME OUT.json [DATA_DIR]

This is what the `trl` mode of `mlora bench` runs (`run_trl`), as a fresh process per adapter,
one after another, like the sequential baseline (baseline.py): import, load the base, wrap it
with PEFT LoRA, then one `GRPOTrainer` per task, in order, all training the same PEFT model,
with the same evaluation as the baseline after each task. A supervised task of the sequence (a
warm-up before RL, say) is trained by TRL's `SFTTrainer` on mlora's prompt-completion rows, as
a TRL user would (`sft_settings`). Its reward curve is reported next to
mlora's; it is not expected to agree step for step (TRL samples with `generate`, not with
mlora's seeded Gumbel noise).

What it shares with the mlora run of the same adapter: the base, tokenizer, tasks, each step's
prompts (mlora's per-adapter order: the dataset lists them step by step and TRL does not
shuffle), group size, max new tokens, temperature, top-p, loss, reward scaling, KL weight (the
reference is the base with the adapter off, as in mlora), clipping, the initial LoRA weights,
and one AdamW whose moments and lr schedule run across all tasks (`grpo_settings` has the
mapping). Where TRL differs and cannot be told otherwise:
- TRL 1.x no longer cuts prompts (`max_prompt_length` is gone): a prompt mlora cuts to fit
  `train.max_seq_len` is given to TRL whole.
Only naive fine-tuning without dropout, on sweeps with at least one `objective: grpo` task.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlora_cli.contract import load_resolved_sweep
from mlora_cli.errors import ConfigError
from mlora_cli.spec.formats import CONVERSATIONS
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec, expand

if TYPE_CHECKING:
    from datasets import Dataset

    from mlora_cli.data.batches import TokenizedTask

TRL_MISSING = "the trl bench mode needs TRL: pip install 'mlora-sweep[trl]'"


def unsupported(spec: SweepSpec, adapters: Sequence[AdapterSpec]) -> list[str]:
    """Why the trl mode cannot run these adapters of `spec`, one line each (none: it can)."""
    problems = [TRL_MISSING] if importlib.util.find_spec("trl") is None else []
    if all(task.objective != "grpo" for task in spec.tasks):
        problems.append("tasks: the trl bench mode compares RL, and no task has objective: grpo")
    others = [a.name for a in adapters if a.adapter.strategy != "naive" or a.adapter.dropout > 0]
    if others:
        problems.append(f"sweep: the trl bench mode runs naive GRPO without dropout; not: {', '.join(others)}")
    # TRL's prompt-completion data learns the last reply only; mlora also learns a conversation's earlier turns.
    problems += [f"tasks[{i}].format: the trl bench mode takes plain, chat and alpaca tasks, not {task.format}"
                 for i, task in enumerate(spec.tasks) if task.format in CONVERSATIONS]
    return problems


def grpo_settings(spec: SweepSpec, adapter: AdapterSpec, steps: int, on_gpu: bool) -> dict[str, Any]:
    """`GRPOConfig` keyword arguments for one task of `steps` steps: mlora's settings of this adapter in TRL's names."""
    train, rl = adapter.train, adapter.train.rl
    completions = train.batch_size * rl.group_size  # TRL counts its batches in completions, not prompts
    return {
        # One optimizer step = one sampling of batch_size prompts x group_size completions, used once.
        "per_device_train_batch_size": completions,
        "generation_batch_size": completions,
        "gradient_accumulation_steps": 1,
        "num_generations": rl.group_size,
        "num_iterations": rl.num_iterations,  # reuse each sampling this many steps, clipped at epsilon
        "epsilon": rl.clip_eps,
        "max_steps": steps,
        "shuffle_dataset": False,  # the dataset is already in mlora's per-step order
        "max_completion_length": rl.max_new_tokens,
        "temperature": rl.temperature,
        "top_p": rl.top_p,
        "top_k": 0,  # off, as in mlora
        "loss_type": rl.loss,  # dapo, grpo and dr_grpo are TRL's names too, with the same normalisations
        "scale_rewards": rl.scale_rewards,  # group / none: TRL's names, the same std + 1e-4
        "beta": rl.kl_beta,
        "mask_truncated_completions": rl.mask_truncated,
        **_trainer_settings(spec, adapter, on_gpu),
        "remove_unused_columns": False,  # the reward needs the `reference` column
    }


def sft_settings(spec: SweepSpec, adapter: AdapterSpec, steps: int, on_gpu: bool) -> dict[str, Any]:
    """`SFTConfig` keyword arguments for a supervised task: loss on the completion only, mlora's batches in order."""
    train = adapter.train
    return {
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "max_length": train.max_seq_len,
        "completion_only_loss": True,
        "packing": False,
        "shuffle_dataset": False,  # the dataset is already in mlora's per-step order
        **_trainer_settings(spec, adapter, on_gpu),
    }


def _trainer_settings(spec: SweepSpec, adapter: AdapterSpec, on_gpu: bool) -> dict[str, Any]:
    """What every Trainer config takes from mlora: clipping, AdamW, the device, precision and logging."""
    import torch

    from mlora_cli.model.base import autocast_dtype

    precision = autocast_dtype(spec.model.autocast, "cuda:0" if on_gpu else "cpu")
    config = adapter.adapter
    return {
        # Trainer clips only when max_grad_norm > 0: 0 is mlora's null (no clipping).
        "max_grad_norm": adapter.train.max_grad_norm or 0.0,
        # What Trainer would build; main passes its own AdamW and schedule (same values) so they run across tasks.
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "adam_beta1": config.beta1,
        "adam_beta2": config.beta2,
        "adam_epsilon": config.eps,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "gradient_checkpointing": spec.model.gradient_checkpointing,  # GRPOConfig would turn it on
        "use_cpu": not on_gpu,
        # Trainer's mixed precision as mlora's model.autocast resolves on this device.
        "bf16": on_gpu and precision == torch.bfloat16,
        "fp16": on_gpu and precision == torch.float16,
        "seed": adapter.seed,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def prompt_dataset(task: TokenizedTask, format: str, order: list[int], completions: bool = False) -> Dataset:
    """The prompts of `task` in `order` (one step's prompts after another): columns prompt and reference, or
    (`completions`, for SFTTrainer) prompt and completion."""
    from datasets import Dataset

    rows = [task.train[i] for i in order]
    prompts: list[Any] = [r.prompt for r in rows]
    if format == "chat":  # a conversational prompt: TRL applies the chat template with the generation prompt, as mlora
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    answers: list[Any] = [r.completion for r in rows]
    if completions:
        if format == "chat":
            answers = [[{"role": "assistant", "content": a}] for a in answers]
        return Dataset.from_dict({"prompt": prompts, "completion": answers})
    return Dataset.from_dict({"prompt": prompts, "reference": answers})


def _text(value: Any) -> str:
    """A prompt or completion as TRL passes it: text, or a conversation whose last turn holds the text."""
    return value if isinstance(value, str) else value[-1]["content"]


def trl_reward(task: TokenizedTask) -> Callable[..., list[float]]:
    """The task's mlora reward with TRL's signature `fn(prompts, completions, **columns)`, its values checked."""
    from mlora_cli.train.rewards import load_reward, score

    reward = load_reward(task.reward)

    def reward_fn(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        return score(reward, [_text(p) for p in prompts], [_text(c) for c in completions], list(reference), task.name)

    reward_fn.__name__ = task.reward.rpartition(":")[2]  # TRL logs rewards/<name>/mean
    return reward_fn


def main(sweep_file: str, adapter_name: str, out_file: str, data_dir: str | None = None) -> None:
    base_dir = Path(data_dir) if data_dir else Path(sweep_file).parent  # where relative data paths resolve
    spec, _ = load_resolved_sweep(Path(sweep_file), base_dir)
    adapter = next(a for a in expand(spec) if a.name == adapter_name)
    problems = unsupported(spec, [adapter])
    if problems:
        raise SystemExit("; ".join(problems))

    import torch
    import trl
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    from mlora_cli.bench.baseline import evaluate, lone_peft_model, result_entry
    from mlora_cli.data.batches import BatchSampler, tokenize_task
    from mlora_cli.data.sources import load_task
    from mlora_cli.model.base import load_base
    from mlora_cli.model.optim import lr_factor

    config, train = adapter.adapter, adapter.train
    # The device a worker of `mlora run` would use for this sweep: the first GPU if there is one.
    on_gpu = torch.cuda.is_available()
    base = load_base(spec.base_model, "cuda:0" if on_gpu else "cpu", spec.model)
    tokenizer = base.tokenizer
    tasks = [tokenize_task(load_task(t, adapter.seed, base_dir), tokenizer, train.max_seq_len) for t in spec.tasks]
    model = lone_peft_model(base.model, adapter)  # mlora's targets and initial A; B starts at zero in both
    # One AdamW and one schedule for all tasks, as mlora has: a trainer per task building its own would restart
    # Adam's moments and the schedule at every task. Trainer uses them when given them.
    steps = adapter.task_steps([t.steps for t in spec.tasks])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(config.beta1, config.beta2), eps=config.eps,
                                  weight_decay=config.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, sum(steps), train.warmup_steps, train.schedule))
    ready = time.perf_counter()

    matrix_rows, rewards, train_seconds, eval_seconds, train_tokens = [], [], 0.0, 0.0, 0
    start = time.perf_counter()
    matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval, adapter.seed))
    eval_seconds += time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="mlora-trl-") as scratch:  # Trainer wants an output_dir; nothing is saved
        for index, (task, task_config) in enumerate(zip(tasks, spec.tasks)):
            sampler = BatchSampler(len(task.train), adapter.seed, index)  # mlora's prompts for this adapter and task
            order = [i for _ in range(steps[index]) for i in sampler.next(train.batch_size)]
            start = time.perf_counter()
            if task_config.objective == "sft":
                trainer = SFTTrainer(
                    model=model, processing_class=tokenizer, optimizers=(optimizer, schedule),
                    args=SFTConfig(output_dir=scratch, **sft_settings(spec, adapter, steps[index], on_gpu)),
                    train_dataset=prompt_dataset(task, task_config.format, order, completions=True))
            else:
                trainer = GRPOTrainer(
                    model=model, reward_funcs=trl_reward(task), processing_class=tokenizer,
                    args=GRPOConfig(output_dir=scratch, **grpo_settings(spec, adapter, steps[index], on_gpu)),
                    train_dataset=prompt_dataset(task, task_config.format, order), optimizers=(optimizer, schedule))
            # Given a PEFT model and beta > 0, TRL adds a frozen copy of the adapter as the KL reference; mlora's
            # reference is the base with the adapter off, which is what TRL uses when there is no copy.
            if "ref" in model.peft_config:
                model.delete_adapter("ref")
            trainer.train()
            train_seconds += time.perf_counter() - start
            rewards += [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
            train_tokens += int(trainer.state.num_input_tokens_seen)
            start = time.perf_counter()
            matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval, adapter.seed))
            eval_seconds += time.perf_counter() - start

    result = result_entry(adapter.name, matrix_rows, [t.name for t in tasks], ready, train_seconds, eval_seconds,
                          train_tokens, rl_rewards=rewards, trl_version=trl.__version__,
                          grpo_config=grpo_settings(spec, adapter, steps[0], on_gpu) | {"max_steps": steps})
    Path(out_file).write_text(json.dumps(result, indent=2))


def run_trl(resolved_sweep: Path, data_dir: Path, adapters: list[AdapterSpec], out: Path,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """One `python -m mlora_cli.bench.trl_grpo` process per adapter, one after another (the trl mode of the bench)."""
    from mlora_cli.bench.processes import run_processes

    spec, _ = load_resolved_sweep(resolved_sweep, data_dir)
    problems = unsupported(spec, adapters)
    if problems:
        raise ConfigError(problems)
    return run_processes("trl", "mlora_cli.bench.trl_grpo", resolved_sweep, data_dir, adapters, out, progress)


if __name__ == "__main__":
    main(*sys.argv[1:5])
