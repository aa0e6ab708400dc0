"""The sweep file's schema: frozen dataclasses whose fields carry their one-line help and range check.

Each field's `metadata["help"]` is its documentation (the sweep reference in docs/ is
generated from it by `scripts/sweep_reference.py`, checked by a test) and `metadata["check"]`
its range check, applied by `spec.convert.build`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlora_cli.spec.fields import (
    at_least_two,
    below_one,
    choice_list,
    doc,
    module_names,
    no_repeats,
    non_empty,
    non_negative,
    optional_non_empty,
    optional_positive,
    positive,
    probability,
    reduction,
    unit_interval,
)


@dataclass(frozen=True)
class AdapterConfig:
    """One LoRA adapter's shape and optimizer; `sweep` varies these per adapter."""

    rank: int = field(default=8, metadata=doc("LoRA rank r", positive))
    alpha: float = field(default=16.0, metadata=doc("LoRA alpha; the update is scaled by alpha / rank", positive))
    dropout: float = field(default=0.0, metadata=doc("dropout on the LoRA input, in [0, 1)", below_one))
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        metadata={**doc("names of the linear layers that get LoRA (suffix match, as in PEFT), or all-linear",
                        module_names), "one_or_list": True},
    )
    lr: float = field(default=1e-3, metadata=doc("peak learning rate (AdamW)", positive))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW decoupled weight decay", non_negative))
    beta1: float = field(default=0.9, metadata=doc("AdamW beta1", below_one))
    beta2: float = field(default=0.999, metadata=doc("AdamW beta2", below_one))
    eps: float = field(default=1e-8, metadata=doc("AdamW epsilon", positive))
    strategy: Literal["naive", "replay", "l2", "ewc", "lwf", "olora"] = field(
        default="naive", metadata=doc("continual-learning strategy (see docs/strategies.md)")
    )
    buffer_size: int = field(default=64, metadata=doc("replay: examples kept from each finished task", positive))
    replay_ratio: float = field(
        default=0.25, metadata=doc("replay: share of each batch drawn from the buffer", unit_interval)
    )
    l2_lambda: float = field(
        default=1.0, metadata=doc("l2: lambda of lambda/2 ||theta - theta_prev||^2", non_negative)
    )
    ewc_lambda: float = field(
        default=1000.0, metadata=doc("ewc: lambda of lambda/2 sum F (theta - theta*)^2", non_negative)
    )
    ewc_gamma: float = field(
        default=1.0, metadata=doc("ewc: online decay of the old Fisher (1: sum over tasks)", unit_interval)
    )
    fisher_samples: int = field(
        default=32, metadata=doc("ewc: training examples whose squared gradients estimate the Fisher", positive)
    )
    lwf_lambda: float = field(
        default=1.0, metadata=doc("lwf: weight of KL(previous adapter || current)", non_negative)
    )
    lwf_temperature: float = field(
        default=2.0, metadata=doc("lwf: softmax temperature of the distillation", positive)
    )
    olora_lambda1: float = field(default=0.5, metadata=doc("olora: weight of sum |A_old A_new^T|", non_negative))
    olora_lambda2: float = field(default=0.0, metadata=doc("olora: weight of ||A_new||^2", non_negative))
    init_from: str | None = field(
        default=None, metadata=doc("warm start: a saved PEFT LoRA folder (e.g. a run's adapters/NAME) whose weights "
                                   "this adapter starts from; its r and lora_alpha must equal rank and alpha")
    )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class RLConfig:
    """GRPO-family reinforcement learning, for tasks with `objective: grpo`; per adapter, so sweeps vary it."""

    group_size: int = field(default=4, metadata=doc("completions sampled per prompt (the group)", at_least_two))
    temperature: float = field(default=1.0, metadata=doc("sampling temperature", positive))
    top_p: float = field(default=1.0, metadata=doc("nucleus sampling: keep the smallest set of tokens of this "
                                                   "probability", probability))
    max_new_tokens: int = field(default=16, metadata=doc("longest completion sampled", positive))
    loss: Literal["dapo", "grpo", "dr_grpo"] = field(
        default="dapo", metadata=doc("dapo: mean over the adapter's completion tokens (TRL's default); grpo: mean "
                                     "per completion, then over completions; dr_grpo: sum / (completions x "
                                     "max_new_tokens)"))
    scale_rewards: Literal["group", "none"] = field(
        default="group", metadata=doc("advantage = reward - group mean, divided by the group's std (group, TRL's "
                                      "default) or not (none, Dr. GRPO)"))
    kl_beta: float = field(default=0.0, metadata=doc("weight of KL(policy || base) per token (k3 estimator); the "
                                                     "reference is the base with the adapter off, no copy",
                                                     non_negative))
    mask_truncated: bool = field(default=False, metadata=doc("completions cut at max_new_tokens carry no loss"))
    num_iterations: int = field(default=1, metadata=doc(
        "optimizer steps on each sampled batch (TRL's num_iterations, default 1); > 1 reuses samples, so the "
        "policy ratio moves and clip_eps clips it", positive))
    clip_eps: float = field(default=0.2, metadata=doc(
        "PPO clipping of the ratio pi / pi_old to [1 - eps, 1 + eps] (TRL's epsilon, 0.2)", positive))


@dataclass(frozen=True)
class TrainConfig:
    """How each adapter trains; per adapter, so `sweep` may vary these too."""

    steps_per_task: int = field(default=50, metadata=doc("optimizer steps on each task", positive))
    batch_size: int = field(default=8, metadata=doc("rows per adapter per step", positive))
    max_seq_len: int = field(
        default=64, metadata=doc("prompt + completion tokens; longer examples are cut", positive)
    )
    warmup_steps: int = field(default=0, metadata=doc("linear warmup steps at the start of training", non_negative))
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=doc("lr after warmup, over all of an adapter's steps")
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=doc("clip each adapter's gradient to this norm; null: no clipping", optional_positive)
    )
    grad_norm_limit: float | None = field(
        default=1e4, metadata=doc(
            "stop an adapter (failed) whose gradient norm, before clipping, exceeds this", optional_positive
        )
    )
    checkpoint_every: int | None = field(
        default=50, metadata=doc(
            "also save the training state every N steps (always at task ends); null: task ends only", optional_positive
        )
    )
    rl: RLConfig = field(default_factory=RLConfig, metadata=doc("reinforcement learning (tasks with objective: grpo)"))


@dataclass(frozen=True)
class EvalConfig:
    """What is measured on every task's eval split after every task."""

    metrics: tuple[Literal["loss", "token_accuracy", "exact_match", "reward", "pass_at_k", "choice_accuracy"],
                   ...] = field(
        default=("loss", "token_accuracy", "exact_match"),
        metadata=doc("loss, token_accuracy: on completion tokens; exact_match, reward: greedy generation "
                     "(reward: scored by the task's `reward`); pass_at_k: `samples` sampled completions per "
                     "example, passing at full reward; choice_accuracy: the most likely of the task's `choices` "
                     "is the reference", non_empty),
    )
    max_new_tokens: int = field(
        default=16, metadata=doc("tokens generated for exact_match, reward and pass_at_k", positive)
    )
    batch_size: int = field(
        default=256, metadata=doc("rows per evaluation forward (all adapters together; each pass_at_k sample is a "
                                  "row)", positive)
    )
    every_steps: int | None = field(
        default=None, metadata=doc(
            "also evaluate every N steps within a task (per-task curves); null: only at task ends", optional_positive
        )
    )
    pass_k: int = field(default=1, metadata=doc("pass_at_k: the k of pass@k (k tries per example)", positive))
    samples: int = field(
        default=8, metadata=doc("pass_at_k: completions sampled per example (n of the unbiased estimator, >= "
                                "pass_k)", positive)
    )
    temperature: float = field(default=1.0, metadata=doc("pass_at_k: sampling temperature", positive))
    top_p: float = field(default=1.0, metadata=doc("pass_at_k: nucleus sampling: keep the smallest set of tokens "
                                                   "of this probability", probability))
    harness_tasks: tuple[str, ...] = field(
        default=(), metadata={**doc("lm-evaluation-harness tasks scored for every adapter at every row of R (before "
                                    "training and after each task), all adapters in shared passes; the [lm-eval] "
                                    "extra", no_repeats), "one_or_list": True},
    )
    harness_include: str | None = field(
        default=None, metadata=doc("a folder of harness task YAMLs (local tasks for harness_tasks), relative to the "
                                   "sweep file", optional_non_empty))
    harness_limit: int | None = field(
        default=None, metadata=doc("examples per harness task (the harness's --limit); null: all",
                                   optional_positive))
    choice_normalization: Literal["mean", "sum"] = field(
        default="mean", metadata=doc("choice_accuracy: rank choices by their log-likelihood per token (mean: no "
                                     "bias toward short choices) or summed over their tokens (sum)"))


@dataclass(frozen=True)
class TaskConfig:
    """One task of the ordered sequence."""

    name: str = field(metadata=doc("unique task name", non_empty))
    source: str = field(
        metadata=doc("builtin:<generator> | jsonl:PATH | csv:PATH | parquet:PATH | hf:NAME[:CONFIG]", non_empty)
    )
    train_examples: int = field(default=256, metadata=doc("training examples drawn from the source", positive))
    eval_examples: int = field(default=64, metadata=doc("held-out evaluation examples", positive))
    steps: int | None = field(
        default=None, metadata=doc("steps on this task; default train.steps_per_task", optional_positive)
    )
    prompt_field: str = field(default="prompt", metadata=doc("file/hf sources, plain and chat: the prompt column"))
    completion_field: str = field(
        default="completion", metadata=doc("file/hf sources, plain and chat: the completion column")
    )
    eval_source: str | None = field(
        default=None, metadata=doc("file/hf sources: a separate eval set, else a held-out split")
    )
    split: str = field(default="train", metadata=doc("hf sources: the split to read"))
    eval_split: str | None = field(default=None, metadata=doc("hf eval_source: its split; default `split`"))
    min_len: int = field(default=3, metadata=doc("builtin: shortest input (characters, or digits for add)", positive))
    max_len: int = field(default=8, metadata=doc("builtin: longest input", positive))
    shift: int = field(default=3, metadata=doc("builtin caesar: the shift"))
    prefix: str | None = field(
        default=None, metadata=doc("builtin: the task tag before the input; default the generator name")
    )
    format: Literal["plain", "chat", "alpaca", "messages", "sharegpt"] = field(
        default="plain",
        metadata=doc("plain: prompt then completion; chat: the prompt as a user turn through the tokenizer's chat "
                     "template; alpaca: instruction / input / output in Alpaca's prompt template; messages: an "
                     "OpenAI-style conversation, sharegpt: a ShareGPT one (from / value), through the chat template, "
                     "loss on every assistant turn"),
    )
    messages_field: str | None = field(
        default=None, metadata=doc("messages / sharegpt: the column holding the conversation; null: messages "
                                   "(messages) or conversations (sharegpt)", optional_non_empty))
    objective: Literal["sft", "grpo"] = field(
        default="sft", metadata=doc("sft: next-token loss on the completion; grpo: sample completions, score them "
                                    "with `reward`, reinforce (train.rl)"))
    choices: tuple[Any, ...] | None = field(
        default=None, metadata=doc("file/hf sources: the answers every example chooses from (choice_accuracy); "
                                   "each completion must be one of them. Quote yes/no: [\"yes\", \"no\"]",
                                   choice_list))
    choices_field: str | None = field(
        default=None, metadata=doc("file/hf sources: a column with each example's own choices: a list, or text "
                                   "(a JSON list, or choices separated by |, as CSV cells hold them)"))
    reward: str = field(
        default="exact_match",
        metadata=doc("the eval metric `reward` (greedy completion scored): exact_match | prefix_match | "
                     "char_accuracy | last_number | python:MODULE:FUNCTION | python:PATH.py:FUNCTION", non_empty),
    )


@dataclass(frozen=True)
class ModelConfig:
    """How the frozen base model is loaded (the model itself is the top-level `base_model`)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=doc(
            "the base weights' dtype: auto = the autocast dtype where model.autocast resolves to one (bfloat16 on a "
            "GPU of compute capability >= 8.0: half the memory, no cast of every weight on every forward), else "
            "float32; LoRA weights and their optimizer stay float32")
    )
    tokenizer: str | None = field(default=None, metadata=doc("tokenizer id or folder; null: the base model's own"))
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = field(
        default=None, metadata=doc("attention kernel; null: the transformers default")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=doc("recompute each layer's activations in backward: less memory, ~30% more compute")
    )
    autocast: Literal["auto", "off", "bfloat16", "float16"] = field(
        default="auto", metadata=doc(
            "mixed precision of every forward (training, evaluation, sampling, teachers, the bench baseline): auto = "
            "bfloat16 on a GPU that computes it natively (compute capability >= 8.0), off elsewhere; off = the "
            "base's dtype throughout; bfloat16 / float16 = torch.autocast to that dtype on any device. LoRA weights "
            "and optimizer state stay float32")
    )
    share_prompts: bool = field(
        default=True, metadata=doc(
            "RL sampling and training run each group's prompt through the model once, not once per sample (the "
            "same losses and gradients up to float rounding, ~1.5x faster steps); false: every sample its own full "
            "row, bit-identical to PEFT on the CPU")
    )


# Module-level aliases: inside SweepConfig the field names `list` and `zip` shadow the builtins.
Mapping = dict[str, Any]


@dataclass(frozen=True)
class SearchConfig:
    """Which configurations run: all of grid / zip / list, or `trials` asked from Optuna as slots free."""

    method: Literal["grid", "random", "tpe"] = field(
        default="grid", metadata=doc("grid: every configuration of grid / zip / list; random, tpe: `trials` "
                                     "configurations from Optuna's RandomSampler / TPESampler, each asked when a "
                                     "slot frees (grid keys become choices, zip and list one choice of entry each)"))
    trials: int | None = field(
        default=None, metadata=doc("random / tpe: configurations to try (each once per seed)", optional_positive))
    space: Mapping = field(default_factory=dict, metadata=doc(
        "random / tpe: dotted key -> {log_uniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi]} | "
        "{log_int: [lo, hi]} | {choice: [values]}"))
    metric: str | None = field(
        default=None, metadata=doc("the objective Optuna is told, pruners compare and the trials are ranked by: "
                                   "one of eval.metrics (loss is minimized, the others maximized)"))
    over: Literal["seen", "current", "all"] = field(
        default="seen", metadata=doc("which tasks the metric averages, at each step: seen = the tasks trained so "
                                     "far, the current one included (the final value is ACC); current = the task "
                                     "being trained; all = every task of the sequence"))


@dataclass(frozen=True)
class PruneConfig:
    """Early stopping of unpromising adapters by Optuna's pruners; a pruned adapter's slot takes the next at once."""

    method: Literal["none", "asha", "median"] = field(
        default="none", metadata=doc("none; asha: SuccessiveHalvingPruner; median: MedianPruner"))
    min_steps: int = field(default=20, metadata=doc(
        "asha: the first rung (min_resource); median: no pruning before this step (n_warmup_steps). Steps count "
        "over the whole task sequence", positive))
    reduction_factor: int = field(default=3, metadata=doc(
        "asha: keep the best 1/factor at each rung; rungs at min_steps x factor^k steps", reduction))
    every_steps: int | None = field(default=None, metadata=doc(
        "measure the objective every N steps; null: asha at its rungs, median every eval.every_steps (else "
        "min_steps)", optional_positive))
    startup_trials: int = field(default=4, metadata=doc(
        "median: no pruning until this many trained trials completed (n_startup_trials; a repeated "
        "suggestion told an earlier result does not count)", non_negative))


@dataclass(frozen=True)
class SweepConfig:
    """How the `adapter` and `train` defaults expand into many adapters."""

    grid: Mapping = field(default_factory=dict, metadata=doc("cartesian product: dotted key -> values"))
    zip: Mapping = field(default_factory=dict, metadata=doc("equal-length lists advanced together"))
    list: tuple[Mapping, ...] = field(default=(), metadata=doc("explicit adapters: mappings of dotted key -> value"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=doc("repeat every configuration per seed"))
    search: SearchConfig = field(default_factory=SearchConfig, metadata=doc("grid, or random / tpe trials from "
                                                                            "Optuna (docs/search.md)"))
    prune: PruneConfig = field(default_factory=PruneConfig, metadata=doc("early stopping by Optuna's pruners"))

    @property
    def runs_a_study(self) -> bool:
        """Whether the sweep runs an Optuna study (a random / tpe search, or pruning)."""
        return self.search.method != "grid" or self.prune.method != "none"


@dataclass(frozen=True)
class LoggingConfig:
    """Experiment trackers: one tracker run per adapter, with its config, every step's metrics and its results."""

    trackers: tuple[Literal["tensorboard", "mlflow", "wandb", "trackio"], ...] = field(
        default=(), metadata={**doc("where each adapter's curves go, each an extra (pip install "
                                    "'mlora-sweep[wandb]'): tensorboard (RUN/tensorboard/), mlflow, wandb, trackio",
                                    no_repeats), "one_or_list": True},
    )
    project: str | None = field(
        default=None, metadata=doc("the W&B and trackio project and MLflow experiment; null: the sweep's name",
                                   optional_non_empty)
    )
    mlflow_uri: str | None = field(
        default=None, metadata=doc("MLflow tracking URI (http://HOST:5000, sqlite:///PATH.db, databricks); null: a "
                                   "SQLite store in the run folder (RUN/mlflow/)", optional_non_empty)
    )
    wandb_mode: Literal["offline", "online"] = field(
        default="offline", metadata=doc("offline: W&B writes RUN/wandb/ only (upload later with `wandb sync`); "
                                        "online: streams to W&B (needs `wandb login`)")
    )


@dataclass(frozen=True)
class SweepSpec:
    """The whole sweep file."""

    name: str = field(metadata=doc("run name; the run folder is <output_dir>/<name>-<timestamp>", non_empty))
    tasks: tuple[TaskConfig, ...] = field(metadata=doc("the ordered task sequence", non_empty))
    base_model: str = field(
        default="builtin:tiny",
        metadata=doc("HF model id, local folder, or builtin:tiny (pretrained) | tiny-random | micro | small | "
                     "smollm2-135m", non_empty),
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc("how the base model loads"))
    seed: int = field(default=0, metadata=doc("seed for adapter init, data order and builtin data"))
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata=doc("defaults for every adapter"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=doc("training defaults for every adapter"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc("evaluation settings"))
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata=doc("grid / zip / list expansion"))
    devices: str | tuple[str, ...] = field(default="auto", metadata=doc("auto | cpu | [cuda:0, ...]"))
    max_concurrent: int | None = field(
        default=None, metadata=doc("adapters one worker trains at once; null: all", optional_positive)
    )
    output_dir: str = field(default="runs", metadata=doc("where run folders are written", non_empty))
    logging: LoggingConfig = field(
        default_factory=LoggingConfig, metadata=doc("experiment trackers (TensorBoard, MLflow, W&B, trackio)")
    )


# Keys a sweep may vary per adapter: every field of `adapter` and `train`.
SWEEPABLE_SECTIONS = {"adapter": AdapterConfig, "train": TrainConfig, "train.rl": RLConfig}
MAX_ADAPTERS = 10_000
