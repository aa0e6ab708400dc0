"""`eval.harness_tasks` in a run: lm-evaluation-harness scores as extra columns of every adapter's R.

At each row of R (before training and after each task) the worker asks `HarnessRows.score` for the adapters whose
row is due, and every one of them is scored in the same fused passes (`eval.harness.evaluate_slots`), one base load.
Before its first step an adapter is the base (B = 0 gives the base's logits exactly): the base is scored once, in
the first such slot, and that row is shared by every adapter that starts from it, refills included. The harness is
imported here only when a sweep names harness tasks (the `[lm-eval]` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlora_cli.errors import ConfigError
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.load import HARNESS_MISSING
from mlora_cli.spec.schema import EvalConfig

HarnessScores = dict[str, dict[str, float]]  # {harness task: {metric: value}}


class HarnessRows:
    """The harness tasks of `config`, their TaskManager built once (an unknown task is a ConfigError at start)."""

    def __init__(self, config: EvalConfig, model: Any, tokenizer: Any):
        try:
            from mlora_cli.eval import harness
        except ImportError as exc:
            raise ConfigError([f"eval.harness_tasks: {HARNESS_MISSING} ({exc})"]) from exc
        self.harness, self.config, self.tokenizer = harness, config, tokenizer
        include = Path(config.harness_include) if config.harness_include else None
        self.manager = harness.task_manager(config.harness_tasks, include, key="eval.harness_tasks")
        self.max_length = harness.max_length(model)
        self.base_scores: HarnessScores | None = None  # the base's row, shared by every adapter still at B = 0

    def score(self, engine: MultiLoraModel, due: Sequence[tuple[str, int, bool]]) -> dict[str, HarnessScores]:
        """{adapter: {harness task: {metric: value}}} for `due` = (adapter, slot, still the base) entries."""
        trained = [(name, slot) for name, slot, at_base in due if not at_base]
        at_base = [(name, slot) for name, slot, base in due if base]
        if at_base and self.base_scores is None:
            trained.append(("\0base", at_base[0][1]))  # a slot with B = 0 answers as the base does
        scores: dict[str, HarnessScores] = {}
        if trained:
            per_pass = max(1, self.config.batch_size // len(trained))
            scores = self.harness.evaluate_slots(
                engine, [slot for _, slot in trained], [name for name, _ in trained], self.tokenizer,
                self.config.harness_tasks, self.manager, per_pass, self.max_length, self.config.harness_limit,
                key="eval.harness_tasks")
        if "\0base" in scores:
            self.base_scores = scores.pop("\0base")
        scores.update({name: self.base_scores for name, _ in at_base if self.base_scores is not None})
        return scores
