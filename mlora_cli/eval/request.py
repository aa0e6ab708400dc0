"""What one evaluation pass is asked for: an adapter's slot and its tasks (shared by every scorer in eval/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlora_cli.data.batches import TokenizedTask


@dataclass
class EvalRequest:
    key: str  # the adapter (or any label) the scores belong to
    slot: int | None  # None: the base alone
    tasks: Sequence[TokenizedTask]
    seed: int = 0  # the adapter's seed: what pass_at_k's samples are drawn with (seeds.eval_sample)
