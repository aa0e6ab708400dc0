"""lm-evaluation-harness over the fused engine: one harness request batch answered for every adapter at once.

The harness asks one `LM` at a time (`simple_evaluate(model=lm, tasks=...)`). `FusedHarness` holds the engine and
the slots to evaluate; `FusedHarness.views()` gives one `AdapterLM` per slot. The first view asked for a batch of
requests scores that batch for *all* slots in shared passes (each pass stacks the same requests once per slot, grouped
as `engine.routed` routes them) and caches every slot's answers; the other views are then answered from the cache,
so the fused work happens once per request batch (`FusedHarness.forwards` counts the passes).

Requests are tokenized and scored as the harness's own `HFLM` does (its `TemplateLM` base splits context and
continuation; rolling windows from `lm_eval.utils`; generation by `model.generate`, greedy, cut at the `until` strings,
at most `max_gen_toks` new tokens), so each adapter's numbers are those of `HFLM` over the same adapter in PEFT.

This is the one module that imports `lm_eval` (the `[lm-eval]` extra); callers import it only when asked for harness
tasks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria

from mlora_cli.errors import ConfigError
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.tasks import first_line

TokenPair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)
MAX_GEN_TOKS = 256  # HFLM's default when a task sets no max_gen_toks


class FusedHarness:
    """Harness requests scored for every slot of `slots` together; answers cached per request, one entry per slot."""

    def __init__(self, engine: MultiLoraModel, slots: Sequence[int], tokenizer: Any, batch_size: int = 32,
                 max_length: int = 2048):
        self.engine, self.slots, self.tokenizer = engine, list(slots), tokenizer
        self.batch_size = batch_size  # requests per pass; a pass holds batch_size x len(slots) rows
        self.max_length = max_length
        self.forwards = 0  # fused passes run (loglikelihood forwards and generate calls)
        self.likelihoods: dict[TokenPair, list[tuple[float, bool]]] = {}
        self.generations: dict[tuple[str, str], list[str]] = {}

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def views(self) -> list[AdapterLM]:
        return [AdapterLM(self, index) for index in range(len(self.slots))]

    def _routing(self, per_slot: int) -> tuple[list[int], list[int]]:
        return self.slots, [per_slot] * len(self.slots)

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[TokenPair]) -> None:
        """Fill `likelihoods` for the pairs not there yet: (sum of log p(continuation), continuation is greedy)."""
        todo = sorted({p for p in pairs if p not in self.likelihoods}, key=lambda p: -len(p[0]) - len(p[1]))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in chunk]
            length = max(len(ids) for ids in inputs)
            input_ids = torch.zeros((len(chunk), length), dtype=torch.long)  # right-padded; padding is never scored
            mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(inputs):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            rows = len(self.slots)
            with self.engine.routed(*self._routing(len(chunk))):
                logits = self.engine.model(input_ids=input_ids.repeat(rows, 1).to(self.engine.device),
                                           attention_mask=mask.repeat(rows, 1).to(self.engine.device)).logits
            self.forwards += 1
            for r, (pair, ids) in enumerate(zip(chunk, inputs)):
                continuation = torch.tensor(pair[1])
                n = len(continuation)
                answers = []
                for s in range(rows):
                    scored = torch.log_softmax(logits[s * len(chunk) + r, len(ids) - n : len(ids)].float(), dim=-1)
                    greedy = bool((scored.argmax(-1).cpu() == continuation).all())
                    answers.append((float(scored.gather(-1, continuation.view(-1, 1).to(scored.device)).sum()),
                                    greedy))
                self.likelihoods[pair] = answers

    @torch.no_grad()
    def generate(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Fill `generations` for the (context, gen_kwargs) not there yet: greedy, cut at the stop strings."""
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for context, kwargs in requests:
            key = json.dumps(kwargs, sort_keys=True, default=str)
            if (context, key) not in self.generations:
                groups.setdefault(key, []).append((context, kwargs))
        eos = self.tokenizer.decode([self.eos_id], skip_special_tokens=False)
        for key, group in groups.items():
            contexts = sorted(dict.fromkeys(c for c, _ in group), key=lambda c: -len(self.tokenizer.encode(c)))
            kwargs = normalize_gen_kwargs(dict(group[0][1]), MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ConfigError([f"harness generation {key}: only greedy decoding is supported"])
            for start in range(0, len(contexts), self.batch_size):
                chunk = contexts[start : start + self.batch_size]
                encoded = [self.tokenizer.encode(c)[-(self.max_length - max_gen_toks) :] for c in chunk]
                length = max(len(ids) for ids in encoded)
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
                input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in encoded])
                mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded])
                rows = len(self.slots) * len(chunk)
                stopping = stop_sequences_criteria(self.tokenizer, until, length, rows)
                with self.engine.routed(*self._routing(len(chunk))):
                    out = self.engine.model.generate(
                        input_ids=input_ids.repeat(len(self.slots), 1).to(self.engine.device),
                        attention_mask=mask.repeat(len(self.slots), 1).to(self.engine.device),
                        max_length=length + max_gen_toks, stopping_criteria=stopping, do_sample=False,
                        pad_token_id=pad, use_cache=True)
                self.forwards += 1
                texts = [postprocess_generated_text(self.tokenizer.decode(ids[length:].tolist(),
                                                                          skip_special_tokens=True), until, None)
                         for ids in out]
                for r, context in enumerate(chunk):
                    self.generations[(context, key)] = [texts[s * len(chunk) + r] for s in range(len(self.slots))]


class AdapterLM(TemplateLM):
    """One adapter's view of a `FusedHarness`: the `LM` the harness calls, answered from the shared cache."""

    def __init__(self, fused: FusedHarness, index: int):
        super().__init__()
        self.fused, self.index = fused, index
        self.tokenizer = fused.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # HFLM's: bos, else eos
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.fused.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            return self.tokenizer.encode(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        self.fused.score_tokens(pairs)
        return [self.fused.likelihoods[pair][self.index] for pair in pairs]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows_of = [
            [lm_utils.make_disjoint_window(window) for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            for (string,) in (request.args for request in requests)
        ]
        flat = [(None, context, continuation) for windows in windows_of for context, continuation in windows]
        values = iter(self._loglikelihood_tokens(flat))
        return [sum(next(values)[0] for _ in windows) for windows in windows_of]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        args = [(context, kwargs) for context, kwargs in (request.args for request in requests)]
        self.fused.generate(args)
        return [self.fused.generations[(c, json.dumps(k, sort_keys=True, default=str))][self.index] for c, k in args]


def task_manager(tasks: Sequence[str], include: Path | None = None, key: str = "--harness-tasks") -> Any:
    """The harness's TaskManager for `tasks`: only the local folder when it holds them all (indexing the harness's
    thousands of builtin tasks takes seconds), else the builtin tasks too; ConfigError naming each unknown task (as
    `key`, the option or sweep key that named it)."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        include_key = "eval.harness_include" if key.startswith("eval.") else "--harness-include"
        where = f"neither a harness task nor under {include}" if include else f"a local task needs {include_key}"
        raise ConfigError([f"{key}: unknown task {t!r} ({where})" for t in unknown])
    return manager


def run_tasks(lm: Any, tasks: Sequence[str], manager: Any, limit: int | None = None) -> dict[str, dict[str, float]]:
    """`simple_evaluate` of one LM on harness tasks -> {task: {metric: value}}: numbers only, ',none' dropped."""
    from lm_eval import simple_evaluate

    output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                             log_samples=False, verbosity="ERROR")
    scores: dict[str, dict[str, float]] = {}
    for task, values in (output or {}).get("results", {}).items():
        scores[task] = {metric.removesuffix(",none"): float(value) for metric, value in values.items()
                        if isinstance(value, int | float) and not isinstance(value, bool) and "stderr" not in metric}
    return scores


def max_length(model: Any) -> int:
    """The context the harness may use: the base's `max_position_embeddings` (2048 when it has none)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048


def evaluate_slots(engine: MultiLoraModel, slots: Sequence[int], labels: Sequence[str], tokenizer: Any,
                   tasks: Sequence[str], manager: Any, batch_size: int = 32, max_length: int = 2048,
                   limit: int | None = None, key: str = "--harness-tasks") -> dict[str, dict[str, dict[str, float]]]:
    """{label: {harness task: {metric: value}}} for the adapters already in `slots`, all scored together (`limit`:
    the first examples of each task only). A task whose data cannot be loaded (offline, a missing file, a field its
    YAML names) is a ConfigError line under `key`, for every adapter alike."""
    fused = FusedHarness(engine, slots, tokenizer, batch_size, max_length)
    try:
        return {label: run_tasks(view, tasks, manager, limit) for label, view in zip(labels, fused.views())}
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ConfigError([f"{key}: lm-evaluation-harness failed: {type(exc).__name__}: {first_line(exc)}"]) from exc
