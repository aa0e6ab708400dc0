"""The GRPO-family objective: group-relative advantages and the policy-gradient loss per adapter.

For one adapter, G completions o_1..o_G of each prompt get rewards r_i; the advantage is
`A_i = r_i - mean(r)` over the group, divided by the group's std with `scale_rewards: group`
(Shao et al. 2024, https://arxiv.org/abs/2402.03300; Dr. GRPO, https://arxiv.org/abs/2503.20783,
drops the division: `none`). A group whose rewards are all equal has A = 0: it teaches nothing.

Per completion token t of o_i, with the ratio `rho = pi(t) / pi_old(t)`, pi being the sampling
policy softmax(logits / temperature) as in TRL:

    l_{i,t} = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta * (exp(q - p) - (q - p) - 1),
    p = log pi(t), q = log pi_base(t)

On the first step on a batch the policy that sampled it is the current one: rho = 1 in value
(it carries d log pi in its gradient) and the clip is inactive, so the loss is -A_i rho. With
`num_iterations` > 1 the same samples train further steps, pi_old being the log-probabilities
recorded on the first (PPO's clipped surrogate, https://arxiv.org/abs/1707.06347).

the second term being the k3 estimate of KL(pi || base) (the base: the adapter switched off,
no model copy). The adapter's loss normalises over its own tokens only, so one adapter's long
completions never shrink another's gradient:

- dapo:    sum_{i,t} l / sum_i |o_i|  (DAPO, https://arxiv.org/abs/2503.14476; TRL's default);
- grpo:    mean_i (sum_t l_{i,t} / |o_i|);
- dr_grpo: sum_{i,t} l / (G_total * max_new_tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mlora_cli import seeds
from mlora_cli.data.batches import IGNORE, Row
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import RLConfig
from mlora_cli.train.rewards import failure_line, load_reward, score
from mlora_cli.train.rollout import Rollout, RolloutRequest, sample


def advantages(rewards: list[float], group_size: int, scale: str) -> list[float]:
    """Group-relative advantages of rewards listed group by group."""
    values = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    centred = values - values.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (values.std(1, keepdim=True) + 1e-4)  # TRL's epsilon: zero-variance groups stay 0
    return centred.flatten().tolist()


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_T of each next token (rows x length-1) and the mask of completion tokens.

    pi_T = softmax(logits / T) is the policy that sampled the completions, so the gradient is
    that of the policy that acted (as TRL and verl compute it); at T = 1 it is the model's own.
    """
    return predicted_log_probs(logits[:, :-1], labels[:, 1:], temperature)


def predicted_log_probs(logits: torch.Tensor, targets: torch.Tensor,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_log_probs` where logits[:, t] already predicts targets[:, t] (IGNORE: not a completion token)."""
    mask = targets != IGNORE
    log_probs = torch.log_softmax(logits.float() / temperature, -1)
    chosen = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return chosen, mask


def adapter_loss(log_probs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor, config: RLConfig,
                 base_log_probs: torch.Tensor | None = None, old_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """One adapter's GRPO-family loss over its rows (see the module doc); `advantage` is per row.

    `old_log_probs`: log pi_old of the same tokens when the samples are being reused (None: the
    first step on them, where pi_old is the current policy).
    """
    if old_log_probs is None:
        ratio = torch.exp(log_probs - log_probs.detach())
        per_token = -advantage.unsqueeze(1) * ratio
    else:
        ratio = torch.exp(log_probs - old_log_probs)
        clipped = ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps)
        per_token = -torch.minimum(ratio * advantage.unsqueeze(1), clipped * advantage.unsqueeze(1))
    if config.kl_beta > 0 and base_log_probs is not None:
        gap = base_log_probs - log_probs
        per_token = per_token + config.kl_beta * (torch.exp(gap) - gap - 1)
    weights = mask.to(per_token.dtype)
    if config.loss == "dapo":
        return (per_token * weights).sum() / weights.sum().clamp(min=1)
    if config.loss == "grpo":
        return ((per_token * weights).sum(1) / weights.sum(1).clamp(min=1)).mean()
    return (per_token * weights).sum() / (mask.size(0) * config.max_new_tokens)


@dataclass
class RLJob:
    """One adapter's share of an RL step: its prompts, how to sample them, and what scores them."""

    name: str
    slot: int
    seed: int
    step: int
    prompts: list[Row]
    config: RLConfig
    reward: str  # train.rewards spec (a python: path already absolute)
    task: str
    # Per prompt, (reward, task) where it is not the job's own: replayed prompts of earlier tasks.
    replayed: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class RLBatch:
    rows: list[Row]  # prompt + sampled completion, one per sample
    advantages: list[float]
    metrics: dict[str, float]  # what metrics.jsonl records for the step
    steps_left: int = 1  # optimizer steps still to take on these samples (train.rl.num_iterations at first)
    # log pi_old of each row's completion tokens, recorded on the first step when the samples are reused
    old_log_probs: list[list[float]] | None = None


def rollout_request(job: RLJob) -> RolloutRequest:
    """What to sample for `job`: its prompts x group_size rows, each with its own noise stream."""
    config = job.config
    return RolloutRequest(job.slot, job.prompts, config.group_size, config.temperature, config.top_p,
                          config.max_new_tokens, [seeds.rl_sample(job.seed, job.step, k, s)
                                                  for k in range(len(job.prompts)) for s in range(config.group_size)])


def scored_batch(job: RLJob, rollout: Rollout, tokenizer: Any, sample_seconds: float) -> RLBatch:
    """Score `job`'s samples with its reward and turn the rewards into advantages; a failing reward raises."""
    scored = time.perf_counter()
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.completion_ids]
    group = job.config.group_size
    # Each sample is scored by its prompt's task: the job's own, or an earlier one's (replay).
    scorer_of = [job.replayed.get(k // group, (job.reward, job.task)) for k in range(len(texts))]
    rewards = [0.0] * len(texts)
    for reward_spec, task in dict.fromkeys(scorer_of):
        picked = [k for k, scorer in enumerate(scorer_of) if scorer == (reward_spec, task)]
        # Found at worker start (a missing one is a ConfigError there); raises what the user's reward raises.
        values = score(load_reward(reward_spec), [rollout.rows[k].prompt for k in picked], [texts[k] for k in picked],
                       [rollout.rows[k].completion for k in picked], task)
        for k, value in zip(picked, values):
            rewards[k] = value
    own = [r for r, scorer in zip(rewards, scorer_of) if scorer == (job.reward, job.task)] or rewards
    rows = rollout.rows
    if job.config.mask_truncated:  # a cut completion carries no loss: no completion tokens to learn from
        rows = [Row(r.ids, r.tokens, r.completion, r.prompt) if cut else r for r, cut in zip(rows, rollout.truncated)]
    spread = torch.tensor(rewards, dtype=torch.float64).view(-1, group).std(1)
    replayed = [r for r, scorer in zip(rewards, scorer_of) if scorer != (job.reward, job.task)]
    return RLBatch(rows, advantages(rewards, group, job.config.scale_rewards), steps_left=job.config.num_iterations,
                   metrics={
        "reward_mean": sum(own) / len(own),  # the task being trained; replayed prompts apart
        "reward_std": float(torch.tensor(own, dtype=torch.float64).std()) if len(own) > 1 else 0.0,
        **({"replayed_reward_mean": sum(replayed) / len(replayed)} if replayed else {}),
        "zero_variance_groups": float((spread == 0).double().mean()),
        "truncated": sum(rollout.truncated) / len(rollout.truncated),
        "completion_tokens": sum(len(ids) for ids in rollout.completion_ids) / len(rollout.completion_ids),
        "sample_seconds": sample_seconds,
        "score_seconds": time.perf_counter() - scored,
    })


def rl_batches(engine: MultiLoraModel, tokenizer: Any, jobs: list[RLJob]) -> tuple[dict[str, RLBatch], dict[str, str]]:
    """Sample every job's completions in one fused pass, score them, and turn rewards into advantages.

    Returns the batches by adapter name, and the adapters whose reward failed (name -> why):
    those train nothing this step and stop; the others are not touched by it.
    """
    started = time.perf_counter()
    rollouts = sample(engine, [rollout_request(job) for job in jobs], tokenizer.pad_token_id, tokenizer.eos_token_id)
    sample_seconds = time.perf_counter() - started
    batches, failures = {}, {}
    for job, rollout in zip(jobs, rollouts):
        try:
            batches[job.name] = scored_batch(job, rollout, tokenizer, sample_seconds)
        except Exception as exc:  # the user's reward: its failure stops this adapter alone
            failures[job.name] = failure_line(job.reward, job.task, exc)
    return batches, failures
