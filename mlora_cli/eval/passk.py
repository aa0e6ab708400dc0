"""pass@k: the chance that at least one of k sampled completions solves an example, as pure functions.

For each eval example, n completions are sampled (`eval.samples`) and c of them pass: the task's
reward gives the completion full marks, reward >= 1.0 (`PASS_REWARD`). Full marks, not a
threshold in between, because it is the one cut that means "solved" for every reward: for the
0/1 rewards (exact_match, last_number) it is the reward itself, and a graded one
(prefix_match, char_accuracy) reaches 1.0 only when the completion is right throughout.

pass@k per task is the mean over examples of the unbiased estimator of Chen et al. 2021
(https://arxiv.org/abs/2107.03374, section 2.1):

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

the probability that k completions drawn without replacement from the n include a passing one.
The product form never builds the binomials (C(200, 100) overflows a float). With k = 1 it is
c / n, the share of samples that pass.

Torch-free: the fused evaluation (`eval.evaluate`) and the plain-PEFT baseline both score with these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mlora_cli import seeds
from mlora_cli.train.rewards import load_reward, score

PASS_REWARD = 1.0  # a sample passes when its reward reaches full marks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al.'s unbiased pass@k of one example with n samples, c of them passing, in product form."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k includes a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def passing_counts(rewards: Sequence[float], n: int) -> list[int]:
    """Per example, how many of its n samples pass; `rewards` is example-major (example 0's n samples first)."""
    if n < 1 or len(rewards) % n:
        raise ValueError(f"{len(rewards)} rewards are not a whole number of groups of {n} samples")
    return [sum(r >= PASS_REWARD for r in rewards[i : i + n]) for i in range(0, len(rewards), n)]


def mean_pass_at_k(rewards: Sequence[float], n: int, k: int) -> float:
    """A task's pass@k: the mean over its examples of `pass_at_k`, from the rewards of n samples per example."""
    counts = passing_counts(rewards, n)
    return sum(pass_at_k(n, c, k) for c in counts) / max(1, len(counts))


def task_pass_at_k(reward: str, task: str, prompts: Sequence[str], completions: Sequence[str],
                   references: Sequence[str], n: int, k: int) -> float:
    """A task's pass@k from the texts of n samples per example (example-major), scored by the task's reward.

    Raises what the reward raises (or `score`'s ValueError): the caller fails the adapter whose samples these are.
    """
    values = score(load_reward(reward), list(prompts), list(completions), list(references), task)
    return mean_pass_at_k(values, n, k)


def sample_seeds(seed: int, items: Sequence[tuple[int, int]], n: int) -> list[int]:
    """The noise seeds of n samples of each (task index, example index), item-major, as `rollout.sample` takes them.

    An example index is its position in the task's eval split (not in any sorted order), so an
    example's samples are the same however the examples are batched.
    """
    return [seeds.eval_sample(seed, task_index, example, s) for task_index, example in items for s in range(n)]
