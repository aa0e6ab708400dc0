"""An adapter's training state on disk: what `--resume` continues from.

Written at every task end and every `train.checkpoint_every` steps (write, then rename, so a
kill leaves the previous state whole): the slot's weights and optimizer, the strategy's state
(replay buffer, anchors, Fisher, teacher, O-LoRA blocks), the data sampler's and dropout
stream's positions, and the plain progress counters and evaluations so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlora_cli.contract import state_path
from mlora_cli.data.batches import BatchSampler
from mlora_cli.errors import StorageError
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.run.progress import AdapterProgress
from mlora_cli.train.strategies import Strategies


def save(run_dir: Path, progress: AdapterProgress, engine: MultiLoraModel, strategies: Strategies) -> Path:
    """Write the adapter's whole training state atomically; returns the file."""
    state = {name: getattr(progress, name) for name in AdapterProgress.SAVED}
    state.update(
        slot=engine.slot_state(progress.slot),
        strategy=strategies.slot_state(progress.slot),
        sampler=progress.sampler.state(),
        dropout_rng=progress.dropout_generator.get_state() if progress.dropout_generator is not None else None,
    )
    path = state_path(run_dir, progress.spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # the previous state stays whole
        if isinstance(exc, OSError):
            raise StorageError(path, exc) from exc
        raise
    return path


def restore(path: Path, progress: AdapterProgress, engine: MultiLoraModel, strategies: Strategies) -> None:
    """Continue `progress` (already in its slot) from the state at `path`; ValueError if the engine cannot take it."""
    state: dict[str, Any] = torch.load(path, weights_only=False)
    engine.load_slot_state(progress.slot, state["slot"])  # first: it checks the state fits
    for name in AdapterProgress.SAVED:
        setattr(progress, name, state.get(name, getattr(progress, name)))  # a field newer than the state: its default
    strategy_state = state["strategy"]
    if "replay_buffer" in state:  # saved before the replay buffer moved into the strategy's own state
        strategy_state = {**strategy_state, "replay_buffer": state["replay_buffer"], "replay_rng": state["replay_rng"]}
    strategies.load_slot_state(progress.slot, strategy_state)
    if not progress.finished:
        task = progress.tasks[progress.task_index]
        progress.sampler = BatchSampler(len(task.train), progress.spec.seed, progress.task_index)
        progress.sampler.load_state(state["sampler"])
    if progress.dropout_generator is not None and state["dropout_rng"] is not None:
        progress.dropout_generator.set_state(state["dropout_rng"])
