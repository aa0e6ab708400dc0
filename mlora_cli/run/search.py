"""The Optuna study of a searched or pruned sweep, held by the worker that owns the queue (docs/search.md).

A sweep with `sweep.search.method: random | tpe` or a `sweep.prune.method` runs one Optuna
study, stored in the run folder (`search.db`, SQLite), where every adapter is one trial. The
worker calls it between steps, never mid-step:

    a slot frees      -> begin(slot)   ask: the adapter's trial (an existing one on resume), its parameters
    a measuring step  -> judge(...)    trial.report(objective, step); trial.should_prune()
    an adapter ends   -> outcome(...)  what results.json records of the trial
                         close(...)    study.tell(trial, value | PRUNED | FAIL), after its result is written

Random and TPE trials come from Optuna's own samplers through ask-and-tell: a trial is asked only
when a slot frees, so the sampler sees every result so far; pruning is decided by Optuna's own
pruners on the values reported. Nothing here touches training: a pruned adapter simply ends,
and its slot takes the next queued adapter as any finished one does.

Every worker process of a run opens the same study (Optuna supports that on one SQLite file);
a lock file serializes their study operations, so trial numbers and rung decisions never race.
The sampler is seeded per configuration (run seed, configuration index), so a trial's
parameters are a function of the seed and of the study's history when it was asked. A suggestion of parameters
already tried (with the same seed) is not trained again: it is told the earlier outcome (user attribute
`repeat_of`) and the sampler asked again.
Optuna is imported here only (the `optuna` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlora_cli.contract import MAX_REPEATS, SEARCH_DB, SEARCH_LOCK, Scores, TrialRecord
from mlora_cli.errors import ConfigError, StorageError
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.space import Dimension, space_size
from mlora_cli.spec.sweep import AdapterSpec, expand, search_envelope, search_space, trial_adapter


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(["sweep.search / sweep.prune: run through Optuna: pip install 'mlora-sweep[optuna]'"]) \
            from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial: the progress view and tables report
    return optuna


def storage_url(run_dir: Path) -> str:
    """The study's storage, as `optuna.load_study(study_name=None, storage=...)` takes it."""
    return f"sqlite:///{Path(run_dir).resolve() / SEARCH_DB}"


def minimize(spec: SweepSpec) -> bool:
    return spec.sweep.search.metric == "loss"


def objective(spec: SweepSpec, scores: Scores, trained: int) -> float:
    """The search's metric from one evaluation of every task, `trained` the index of the task being (or just) trained.

    seen: mean over tasks 0..trained (at the end, ACC); current: task `trained`; all: mean over every task.
    """
    search = spec.sweep.search
    names = [t.name for t in spec.tasks]
    chosen = {"seen": names[: trained + 1], "current": [names[trained]], "all": names}[search.over]
    values = [scores[name][search.metric or ""] for name in chosen]
    return sum(values) / len(values)


def distribution(optuna: Any, dimension: Dimension) -> Any:
    """Optuna's distribution for one searched parameter."""
    d = optuna.distributions
    if dimension.kind == "choice":
        return d.CategoricalDistribution(dimension.labels)
    if dimension.kind in ("int", "log_int"):
        return d.IntDistribution(int(dimension.low), int(dimension.high), log=dimension.kind == "log_int")
    return d.FloatDistribution(dimension.low, dimension.high, log=dimension.kind == "log_uniform")


def sampler_seed(seed: int, configuration: int) -> int:
    return int.from_bytes(hashlib.sha256(f"search/{seed}/{configuration}".encode()).digest()[:4], "big")


def make_pruner(optuna: Any, spec: SweepSpec) -> Any:
    prune = spec.sweep.prune
    if prune.method == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=prune.min_steps,
                                                      reduction_factor=prune.reduction_factor)
    if prune.method == "median":
        median = optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=prune.min_steps)
        return after_trained_trials(optuna, median, prune.startup_trials)
    return optuna.pruners.NopPruner()


def after_trained_trials(optuna: Any, pruner: Any, startup: int) -> Any:
    """`pruner`, deciding only once `startup` trained trials have completed (the median pruner's n_startup_trials).

    Optuna's own n_startup_trials counts every COMPLETE trial, and a repeated suggestion told its earlier trial's
    value (`Search._ask_unseen`) is one without being trained: counted, it would let pruning start early. In a study
    without repeats this decides as `MedianPruner(n_startup_trials=startup)`; repeats carry no intermediate values,
    so the medians themselves are over trained trials already.
    """
    complete = optuna.trial.TrialState.COMPLETE

    class AfterTrainedTrials(optuna.pruners.BasePruner):  # type: ignore[misc]
        def prune(self, study: Any, trial: Any) -> bool:
            trained = sum("repeat_of" not in t.user_attrs for t in study.get_trials(deepcopy=False, states=(complete,)))
            return trained >= startup and bool(pruner.prune(study, trial))

    return AfterTrainedTrials()


def make_sampler(optuna: Any, spec: SweepSpec, seed: int) -> Any:
    if spec.sweep.search.method == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random; grid trials are enqueued, never sampled


def grid_distributions(optuna: Any, adapters: list[AdapterSpec]) -> dict[str, Any]:
    """A grid sweep's parameters as Optuna records them: each varied key, a choice of the values it takes."""
    values: dict[str, dict[Any, None]] = {}
    for adapter in adapters:
        for key, value in adapter.varied.items():
            values.setdefault(key, {})[Dimension("choice", choices=(value,)).labels[0]] = None
    return {key: optuna.distributions.CategoricalDistribution(tuple(seen)) for key, seen in values.items()}


class Search:
    """One worker's handle on the run's study; see the module doc."""

    def __init__(self, spec: SweepSpec, run_dir: Path | None, resume: bool = False):
        if resume and run_dir is not None and not (run_dir / SEARCH_DB).is_file() and any(
                (run_dir / "state").glob("*")):
            raise ConfigError([f"{run_dir / SEARCH_DB}: missing; it holds the search's trials so far, which --resume "
                               "continues: put it back, or start the sweep again"])
        self.optuna = optuna = import_optuna()
        self.spec, self.run_dir = spec, run_dir
        self.searched = spec.sweep.search.method != "grid"
        self.space_size: int | None = None  # configurations a searched space holds; None: a float range in it
        if self.searched:
            space = search_space(spec)
            self.distributions = {key: distribution(optuna, d) for key, d in space.items()}
            self.space_size = space_size(space)
        else:
            self.distributions = grid_distributions(optuna, expand(spec))
        self.trials: dict[str, Any] = {}  # adapter name -> its running optuna.Trial
        self.reported: dict[str, set[int]] = {}  # adapter name -> steps reported (before a stop too)
        storage = storage_url(run_dir) if run_dir is not None else None  # None: in memory (a worker without a folder)
        with self.lock():
            self.study = optuna.create_study(
                study_name=spec.name, storage=storage, load_if_exists=True, pruner=make_pruner(optuna, spec),
                sampler=make_sampler(optuna, spec, spec.seed), direction="minimize" if minimize(spec) else "maximize")
            # A trial asked when the run was killed, before `begin` named its adapter: no adapter will ever be it.
            for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if not {"adapter", "repeat_of"} & set(trial.user_attrs):
                    self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Every study operation under one lock file: worker processes of a run take turns."""
        if self.run_dir is None:
            yield
            return
        import fcntl

        with open(self.run_dir / SEARCH_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            except Exception as exc:
                problem = self.storage_problem(exc)
                if problem is None:
                    raise
                raise problem from exc
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def storage_problem(self, exc: Exception) -> Exception | None:
        """The study's file failing (a full disk, a damaged file) as mlora's one-line errors; None for anything else."""
        import sqlite3

        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, (self.optuna.exceptions.StorageInternalError, SQLAlchemyError, sqlite3.Error)):
            return None
        cause = exc.__cause__ if isinstance(exc.__cause__, (SQLAlchemyError, sqlite3.Error)) else exc
        reason = (str(getattr(cause, "orig", None) or cause).splitlines() or [""])[0][:160]
        path = (self.run_dir or Path(".")) / SEARCH_DB
        if "malformed" in reason or "not a database" in reason:
            return ConfigError([f"{path}: cannot be read ({reason}); the search's study is damaged: restore it, or "
                                "start the sweep again"])
        return StorageError(path, reason)

    def shape(self) -> list[Any]:
        """Adapter configs the worker's engine must fit besides its adapters' own: every trial the search may ask."""
        return search_envelope(self.spec) if self.searched else []

    def _latest(self, **attributes: Any) -> Any:
        """The newest trial whose user attributes include `attributes`, or None."""
        found = [t for t in self.study.get_trials(deepcopy=False)
                 if all(t.user_attrs.get(k) == v for k, v in attributes.items())]
        return max(found, key=lambda t: t.number) if found else None

    def begin(self, slot: AdapterSpec) -> AdapterSpec:
        """The adapter `slot` becomes: its trial's (asked now, or resumed) parameters applied."""
        optuna = self.optuna
        with self.lock():
            frozen = self._latest(adapter=slot.name)
            if frozen is not None and frozen.state == optuna.trial.TrialState.RUNNING:
                trial = optuna.trial.Trial(self.study, frozen._trial_id)  # resumed: report on as before the stop
                self.reported[slot.name] = set(frozen.intermediate_values)
            else:
                attributes = {"adapter": slot.name, "seed": slot.seed, "configuration": slot.trial}
                asked = None  # a trial the sampler gave already (searched and new), or None: asked below
                if frozen is not None:  # its result was deleted to train it again: a new trial, same parameters
                    self.study.enqueue_trial(frozen.params, user_attrs=attributes)
                elif not self.searched:
                    self.study.enqueue_trial({k: Dimension("choice", choices=(v,)).labels[0]
                                              for k, v in slot.varied.items()}, user_attrs=attributes)
                elif (sibling := self._latest(configuration=slot.trial)) is not None:  # another seed of it
                    self.study.enqueue_trial(sibling.params, user_attrs=attributes)
                else:
                    self.study.sampler = make_sampler(optuna, self.spec, sampler_seed(self.spec.seed, slot.trial or 0))
                    asked = self._ask_unseen(slot.seed)
                trial = asked if asked is not None else self.study.ask({k: v for k, v in self.distributions.items()
                                                 if self.searched or k in slot.varied})
                for key, value in attributes.items():
                    trial.set_user_attr(key, value)
            self.trials[slot.name] = trial
            return trial_adapter(self.spec, slot, trial.params) if self.searched else slot

    def _ask_unseen(self, seed: int) -> Any:
        """A trial asked from the sampler whose parameters no trial of this seed has had.

        A sampler may suggest a configuration again (TPE over a few choices often does), and training it again
        would give the same result (an adapter's results depend on its settings and seed only). So a repeat is told
        the earlier trial's outcome at once, as Optuna's FAQ does it, or when that trial ends if it is still running
        (`close`), and the sampler is asked again; after MAX_REPEATS repeats in a row the repeat is trained after all.
        Once every configuration of a finite space has been tried, the first suggestion is trained at once: asking
        MAX_REPEATS more would only add that many told trials to the study (and each ask costs more with every trial
        the study holds).
        """
        states = self.optuna.trial.TrialState
        tried = {tuple(sorted(t.params.items())) for t in self.study.get_trials(deepcopy=False)
                 if t.user_attrs.get("seed") == seed and "adapter" in t.user_attrs}
        used_up = self.space_size is not None and len(tried) >= self.space_size
        repeats = 0
        while True:
            trial = self.study.ask(self.distributions)
            earlier = [t for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("seed") == seed
                       and "adapter" in t.user_attrs and t.params == trial.params]
            if not earlier or used_up or repeats == MAX_REPEATS:  # this one is trained (left running)
                return trial
            original = min(earlier, key=lambda t: t.number)
            trial.set_user_attr("repeat_of", original.number)
            if original.state != states.RUNNING:  # else it stays RUNNING, told when the original ends (`close`)
                self._tell_as(trial, original.state, original.value)
            repeats += 1

    def _tell_as(self, trial: Any, state: Any, value: float | None) -> None:
        states = self.optuna.trial.TrialState
        if state == states.COMPLETE:
            self.study.tell(trial, value, skip_if_finished=True)
        else:
            self.study.tell(trial, state=states.PRUNED if state == states.PRUNED else states.FAIL,
                            skip_if_finished=True)

    def judge(self, name: str, step: int, value: float) -> dict[str, Any] | None:
        """Report the objective at `step`; what the pruner compared (step, value, rung, its values) if it prunes.

        A decision to prune is kept in the study (user attribute `pruned`) before the adapter's result is written: a
        run stopped in between (a kill, a full disk) decides the same on resume, where asking the pruner again would
        not (ASHA counts the rung as passed once it has judged it)."""
        trial, reported = self.trials[name], self.reported.setdefault(name, set())
        with self.lock():
            decided = trial.user_attrs.get("pruned")
            if decided is not None and decided["step"] == step:
                return dict(decided)
            if any(later > step for later in reported):
                # Judged before the stop, and kept (it reported on): the pruner, which reads the trial's latest
                # report, would now judge that one.
                return None
            if step not in reported:  # a state saved before this step's evaluation repeats it on resume
                trial.report(value, step)
                reported.add(step)
            if not trial.should_prune():
                return None
            record = {"step": step, "value": value, **self._compared(trial, step, value)}
            trial.set_user_attr("pruned", record)
            return record

    def decided(self, name: str) -> dict[str, Any] | None:
        """What pruned the adapter's trial before a stop (its result unwritten), or None."""
        with self.lock():
            decided = self.trials[name].user_attrs.get("pruned") if name in self.trials else None
        return dict(decided) if decided is not None else None

    def _compared(self, trial: Any, step: int, value: float) -> dict[str, Any]:
        """The values the pruner weighed the trial against: ASHA's rung (every trial that completed it, this one
        included), or the median pruner's completed trials at this step."""
        trials = self.study.get_trials(deepcopy=False)
        if self.spec.sweep.prune.method == "asha":
            # Optuna's SuccessiveHalvingPruner keeps a trial's value at each rung it reached as completed_rung_k
            # (a NaN value is pruned before it enters its rung).
            reached = [k for k in trials[trial.number].system_attrs if k.startswith("completed_rung_")]
            rung = len(reached) - (0 if math.isnan(value) else 1)
            key = f"completed_rung_{rung}"
            return {"rung": rung, "rung_values": [t.system_attrs[key] for t in trials if key in t.system_attrs]}
        complete = self.optuna.trial.TrialState.COMPLETE
        return {"rung": None, "rung_values": [t.intermediate_values[step] for t in trials
                                               if t.state == complete and step in t.intermediate_values]}

    def outcome(self, name: str, value: float | None, pruned: dict[str, Any] | None) -> TrialRecord:
        """The trial's part of the adapter's results entry."""
        trial = self.trials[name]
        with self.lock():
            frozen = self.study.get_trials(deepcopy=False)[trial.number]  # numbered 0, 1, ... in order
        return {"number": trial.number, "params": dict(frozen.params), "metric": self.spec.sweep.search.metric or "",
                "over": self.spec.sweep.search.over, "direction": "minimize" if minimize(self.spec) else "maximize",
                "objective": value, "reports": [{"step": s, "value": v} for s, v in sorted(
                    frozen.intermediate_values.items())], "pruned": pruned}

    def close(self, name: str, status: str, value: float | None) -> None:
        """Tell Optuna how the adapter's trial ended: its objective (done), pruned or failed."""
        states = self.optuna.trial.TrialState
        trial = self.trials.pop(name, None)
        self.reported.pop(name, None)
        if trial is None:
            return
        with self.lock():
            done = status == "done" and value is not None and math.isfinite(value)
            state = states.COMPLETE if done else states.PRUNED if status == "pruned" else states.FAIL
            self._tell_as(trial, state, value)
            # Trials suggesting its parameters again while it ran (by any worker of the run): the same outcome.
            for repeat in self.study.get_trials(deepcopy=False, states=(states.RUNNING,)):
                if repeat.user_attrs.get("repeat_of") == trial.number:
                    self._tell_as(self.optuna.trial.Trial(self.study, repeat._trial_id), state, value)

    def resumed(self, entry: dict[str, Any]) -> None:
        """An adapter whose result was written before the stop: its trial ends as the result says, if not yet told."""
        with self.lock():
            frozen = self._latest(adapter=entry["name"])
        if frozen is not None and frozen.state == self.optuna.trial.TrialState.RUNNING:
            self.trials[entry["name"]] = self.optuna.trial.Trial(self.study, frozen._trial_id)
            self.close(entry["name"], entry["status"], (entry.get("trial") or {}).get("objective"))
