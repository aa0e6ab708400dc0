"""The base's scores, evaluated once per distinct eval data for a worker's life: every adapter's row of R before
training.

Before its first step an adapter is the base (B = 0 gives the base's logits exactly), and `evaluate` scores
requests for the base alone in passes of their own, apart from the adapters' rows. So the base's scores depend
only on the eval data, the eval settings and (for pass_at_k) the request's seed, never on when they are asked
for. A worker keeps them: an adapter that starts later (a slot refill, a search's next trial) takes them instead
of evaluating the base again, which cost a full evaluation per refill. A reward that failed on the base is not
kept (the next adapter tries it again). `HarnessRows` keeps the base's harness columns the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlora_cli.contract import Scores
from mlora_cli.data.batches import TokenizedTask
from mlora_cli.eval.evaluate import evaluate
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import EvalConfig


class KeptBaseScores:
    """`evaluate` for one worker, with the base's scores kept per distinct eval data (and seed, for pass_at_k)."""

    def __init__(self) -> None:
        # key -> (the tasks, held so their ids stay theirs; the scores)
        self.kept: dict[tuple[Any, ...], tuple[Sequence[TokenizedTask], Scores]] = {}

    @staticmethod
    def _key(request: EvalRequest, config: EvalConfig) -> tuple[Any, ...]:
        seeded = "pass_at_k" in config.metrics  # its samples are drawn with the request's seed
        return tuple(id(task) for task in request.tasks), request.seed if seeded else None

    def evaluate(
        self, engine: MultiLoraModel, requests: list[EvalRequest], config: EvalConfig, tokenizer: Any,
        failures: dict[str, str],
    ) -> tuple[dict[str, Scores], float, set[str]]:
        """`evaluate`'s scores and seconds for `requests`, and the keys whose base scores were kept ones."""
        kept = {r.key: self.kept[key] for r in requests
                if r.slot is None and (key := self._key(r, config)) in self.kept}
        fresh = [r for r in requests if r.key not in kept]
        scores, seconds = evaluate(engine, fresh, config, tokenizer, failures) if fresh else ({}, 0.0)
        for request in fresh:
            # A reward that failed on the base is not kept: the next adapter's evaluation tries it again.
            if request.slot is None and request.key not in failures:
                self.kept.setdefault(self._key(request, config), (request.tasks, _copy(scores[request.key])))
        for name, (_, base) in kept.items():
            scores[name] = _copy(base)
        return scores, seconds, set(kept)


def _copy(scores: Scores) -> Scores:
    """Scores of its own for each adapter (and for what is kept): nothing one holds changes another's."""
    return {task: dict(values) for task, values in scores.items()}
