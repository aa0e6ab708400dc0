"""Every random stream an adapter uses, derived from its own seed alone, in one place.

An adapter's results never depend on its neighbours because each stream below is a function
of (adapter seed, what it is for), never of a shared generator. The sequential baseline
replays the same streams, so it sees the same batches and initial weights. Changing any of
these changes every result: they are part of what `--resume` and the bench's agreement rely on.
"""

from __future__ import annotations

import hashlib

# Distinct offsets keep the streams apart: adding a small constant to a seed would make
# adapter s's dropout stream adapter (s + c)'s init stream.
_DROPOUT_OFFSET = 7919  # a prime: seeds 0, 1, 2, ... never land on each other's dropout stream
_FISHER_TASK_OFFSET = 10_000  # batch-sampler "task indices" for EWC's Fisher samples, past any real task
_OLORA_SEED_STRIDE = 1009  # a prime larger than any task count: (seed, task) -> a unique generator seed


def data_seed(seed: int, task_name: str) -> int:
    """Builtin task generation and the held-out split of a file task.

    A hash, not Python's hash() (salted per process): every worker must draw the same data.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{task_name}".encode()).digest()[:8], "big")


def batch_order(seed: int, task_index: int) -> str:
    """The order in which an adapter draws its training rows of task `task_index`."""
    return f"batches:{seed}:{task_index}"


def lora_init(seed: int) -> int:
    """The adapter's A matrices (B starts at zero)."""
    return seed


def dropout(seed: int) -> int:
    """The adapter's LoRA-dropout masks."""
    return seed + _DROPOUT_OFFSET


def olora_task_init(seed: int, task_index: int) -> int:
    """O-LoRA's fresh A for the task after `task_index`."""
    return seed * _OLORA_SEED_STRIDE + task_index + 1


def replay_draws(seed: int) -> str:
    """Which buffered rows replay puts into each batch."""
    return f"replay:{seed}"


def replay_buffer(seed: int, task_index: int) -> str:
    """Which rows of finished task `task_index` replay keeps."""
    return f"buffer:{seed}:{task_index}"


def fisher_samples_task(task_index: int) -> int:
    """The batch-sampler task index whose order picks EWC's Fisher samples of task `task_index`."""
    return _FISHER_TASK_OFFSET + task_index


def rl_sample(seed: int, step: int, prompt: int, sample: int) -> int:
    """The noise stream of one sampled completion: sample `sample` of prompt `prompt` in step `step`.

    A function of the adapter's own seed and these counters only, so an adapter's samples never
    depend on its neighbours, on the batch they share, or on how a run was resumed.
    """
    return int.from_bytes(hashlib.sha256(f"rl/{seed}/{step}/{prompt}/{sample}".encode()).digest()[:8], "big")


def eval_sample(seed: int, task_index: int, example: int, sample: int) -> int:
    """The noise stream of one evaluation sample (pass@k): sample `sample` of eval example `example` of a task.

    A function of the adapter's own seed and these counters only, with no training step in it:
    every evaluation of an adapter (after each task, `mlora eval` later) draws the same noise, so
    its numbers depend on its weights alone, never on its neighbours or when it was evaluated.
    """
    return int.from_bytes(hashlib.sha256(f"eval/{seed}/{task_index}/{example}/{sample}".encode()).digest()[:8], "big")
