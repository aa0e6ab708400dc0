"""Experiment trackers: every adapter's run mirrored, as it happens, into TensorBoard, MLflow, W&B or trackio.

The launcher's event handler (the parent process, local workers or Ray alike) hands every event to
`Trackers.record`. Each tracker keeps one run per adapter, grouped by the run folder's name, with the adapter's
config as its hyperparameters; train/FIELD for every metrics.jsonl field at its step; eval/TASK/METRIC (harness/TASK/
METRIC too, with eval.harness_tasks) for each evaluation after a task; at the adapter's end cl/METRIC/{acc,bwt,...},
final/TASK/METRIC, final_mean/METRIC, curve/TASK/METRIC (with eval.every_steps) and the R heatmaps as images
(docs/outputs.md has the table).

Run ids go to RUN/trackers.json, so `mlora run --resume` continues the same tracker runs. Each library is imported
here only, in its tracker, behind its extra; a tracker that fails prints one warning line and stops; training goes on.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlora_cli.contract import TRACKERS_RECORD
from mlora_cli.eval.metrics import entry_cl_metrics
from mlora_cli.files import read_json, write_json
from mlora_cli.report import plots
from mlora_cli.spec.convert import to_plain
from mlora_cli.spec.schema import LoggingConfig
from mlora_cli.spec.sweep import AdapterSpec


def missing_trackers(trackers: Sequence[str]) -> list[str]:
    """One line per tracker whose library is not installed (each extra is named after its tracker)."""
    return [f"logging.trackers: {name} is not installed: pip install 'mlora-sweep[{name}]'"
            for name in trackers if importlib.util.find_spec(name) is None]


def hyperparameters(adapter: AdapterSpec) -> dict[str, Any]:
    """The adapter's expanded config as dotted keys: adapter.*, train.*, train.rl.*, seed."""
    train = to_plain(adapter.train)
    rl = train.pop("rl")
    return {**{f"adapter.{k}": v for k, v in to_plain(adapter.adapter).items()},
            **{f"train.{k}": v for k, v in train.items()}, **{f"train.rl.{k}": v for k, v in rl.items()},
            "seed": adapter.seed}


_ODD = re.compile(r"[^\w\-. /:]")  # what MLflow allows in a metric key; every tracker gets the same keys


def _key(*parts: str) -> str:
    return "/".join(_ODD.sub("_", part) for part in parts)


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line as train/FIELD scalars: every numeric field but the step itself."""
    return {_key("train", k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def score_scalars(prefix: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """One evaluation (task -> metric -> score) as PREFIX/TASK/METRIC scalars."""
    return {_key(prefix, task, metric): value for task, values in scores.items() for metric, value in values.items()}


def end_scalars(entry: dict[str, Any], task_names: Sequence[str]) -> dict[str, float]:
    """An adapter's results entry as scalars: CL metrics from its R, final scores and their means over the tasks."""
    values = {_key("cl", metric, name): value for metric, metrics in entry_cl_metrics(entry, task_names).items()
              for name, value in metrics.items() if value is not None}
    values.update(score_scalars("final", entry["final"]))
    values.update({_key("final_mean", metric): value for metric, value in entry["final_mean"].items()})
    return values


# -- one class per tracker: start_adapter(adapter, its run id from trackers.json or None, the step `--resume`
# continues it from or None) opens or reopens the adapter's run and returns its id; scalars, image, finish_adapter.


class _Tracker:
    """What every tracker is given; `record` is its part of trackers.json (`runs`: adapter -> run id)."""

    def __init__(self, config: LoggingConfig, run_dir: Path, project: str, metrics: Sequence[str],
                 record: dict[str, Any]):
        self.config, self.run_dir, self.project, self.metrics, self.record = config, run_dir, project, metrics, record
        self.group = run_dir.name
        self.runs: dict[str, Any] = {}  # adapter -> the library's open run (writer, run id, run object)

    def close(self, interrupted: bool) -> None:
        """The run stopped (or a run ended without its adapter_done): end what is open; `--resume` reopens it."""
        for adapter in list(self.runs):
            self.finish_adapter(adapter, failed=True)


class TensorBoard(_Tracker):
    """RUN/tensorboard/ADAPTER/ through torch's SummaryWriter; a resumed run appends event files to that folder. After
    a kill (Ctrl-C saves each adapter where it stopped) the steps since its saved state are trained and logged again:
    `purge_step` has TensorBoard drop the first copies."""

    name = "tensorboard"

    def start_adapter(self, adapter: AdapterSpec, run_id: str | None, resumed: int | None) -> str:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        folder = f"tensorboard/{adapter.name}"
        writer = SummaryWriter(str(self.run_dir / folder), purge_step=None if resumed is None else resumed + 1,
                               flush_secs=10)  # a kill loses at most 10 s of it, not the default 2 minutes
        if run_id is None:  # the HParams tab: the config, with each adapter's ACC and BWT as its columns
            plain = {k: v if isinstance(v, bool | int | float | str) else json.dumps(v)
                     for k, v in hyperparameters(adapter).items()}
            columns = {_key("cl", m, key): 0.0 for m in self.metrics for key in ("acc", "bwt")}
            for summary in hparams(plain, columns):
                writer.file_writer.add_summary(summary)
        self.runs[adapter.name] = writer
        return folder

    def scalars(self, adapter: str, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.runs[adapter].add_scalar(tag, value, step)

    def image(self, adapter: str, tag: str, png: Path, step: int) -> None:
        from matplotlib.image import imread

        self.runs[adapter].add_image(tag, imread(png), step, dataformats="HWC")

    def finish_adapter(self, adapter: str, failed: bool) -> None:
        self.runs.pop(adapter).close()


class MLflow(_Tracker):
    """A parent run per sweep run and a child run per adapter, through MlflowClient (the fluent API holds one active
    run per thread; co-trained adapters need theirs open together). Metrics go out in one batch per adapter every
    few seconds: a SQL store's cost is per call (about 8 ms), not per metric (0.1 ms)."""

    name = "mlflow"
    client: Any = None

    def session(self) -> Any:
        """The client, its experiment and the run's parent run, made when the first adapter's run starts."""
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store-creation lines would break the bars
        local = self.run_dir / "mlflow"
        if self.config.mlflow_uri is None:
            local.mkdir(parents=True, exist_ok=True)
        uri = self.config.mlflow_uri or f"sqlite:///{local / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            self.project, artifact_location=None if self.config.mlflow_uri else (local / "artifacts").as_uri())
        parent = self.record.get("parent_run_id")
        if parent is None:
            parent = client.create_run(experiment_id, run_name=self.group,
                                       tags={"mlora.run_dir": str(self.run_dir)}).info.run_id
        else:
            client.update_run(parent, "RUNNING")
        self.record.update(tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent)
        self.client, self.buffer, self.sent = client, {}, time.monotonic()
        return client

    def start_adapter(self, adapter: AdapterSpec, run_id: str | None, resumed: int | None) -> str:
        from mlflow.entities import Param

        client = self.client or self.session()
        if run_id is not None:
            client.update_run(run_id, "RUNNING")
        else:
            run_id = client.create_run(self.record["experiment_id"], run_name=adapter.name, tags={
                "mlflow.parentRunId": self.record["parent_run_id"], "mlora.adapter": adapter.name,
                "mlora.run": self.group}).info.run_id
            params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                      for k, v in hyperparameters(adapter).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100])
        self.runs[adapter.name] = run_id
        return run_id

    def scalars(self, adapter: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer.setdefault(adapter, []).extend(Metric(key, value, now, step) for key, value in values.items())
        if time.monotonic() - self.sent > 2.0:
            self.flush()

    def flush(self, adapters: Sequence[str] | None = None) -> None:
        for adapter in list(self.buffer) if adapters is None else adapters:
            metrics = self.buffer.pop(adapter, [])
            for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(self.runs[adapter], metrics=metrics[i:i + 1000])
        self.sent = time.monotonic()

    def image(self, adapter: str, tag: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.runs[adapter], str(png), artifact_path="plots")

    def finish_adapter(self, adapter: str, failed: bool) -> None:
        self.flush([adapter])
        self.client.set_terminated(self.runs.pop(adapter), "FAILED" if failed else "FINISHED")

    def close(self, interrupted: bool) -> None:
        if self.client is None:
            return
        self.flush()
        for adapter in list(self.runs):  # stopped mid-run: KILLED until `--resume` sets them RUNNING again
            self.client.set_terminated(self.runs.pop(adapter), "KILLED")
        self.client.set_terminated(self.record["parent_run_id"], "KILLED" if interrupted else "FINISHED")


class WandB(_Tracker):
    """One W&B run per adapter, offline by default (RUN/wandb/; `wandb sync` uploads it). Every value is logged with
    a `step` key that the charts use as their x axis, so values may arrive out of step order (the curves, at an
    adapter's end), which W&B's own step counter would drop."""

    name = "wandb"

    def start_adapter(self, adapter: AdapterSpec, run_id: str | None, resumed: int | None) -> str:
        import wandb

        run = wandb.init(
            project=self.project, group=self.group, name=adapter.name, id=run_id, resume="allow",
            dir=str(self.run_dir), mode=self.config.wandb_mode, reinit="create_new",
            config={"adapter": to_plain(adapter.adapter), "train": to_plain(adapter.train), "seed": adapter.seed},
            # No system metrics: one sampler per adapter would multiply with the sweep.
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        self.runs[adapter.name] = run
        return run.id

    def scalars(self, adapter: str, values: dict[str, float], step: int) -> None:
        self.runs[adapter].log({**values, "step": step})

    def image(self, adapter: str, tag: str, png: Path, step: int) -> None:
        import wandb

        self.runs[adapter].log({tag: wandb.Image(str(png)), "step": step})

    def finish_adapter(self, adapter: str, failed: bool) -> None:
        self.runs.pop(adapter).finish(exit_code=1 if failed else 0)


class Trackio(_Tracker):
    """One trackio run per adapter, named RUN_NAME/ADAPTER (trackio resumes a run by its name), in trackio's local
    store (TRACKIO_DIR, default ~/.cache/huggingface/trackio): `trackio show --project PROJECT`."""

    name = "trackio"
    context: Any = None

    def start_adapter(self, adapter: AdapterSpec, run_id: str | None, resumed: int | None) -> str:
        import trackio

        name = run_id or f"{self.group}/{adapter.name}"

        def init() -> Any:
            # trackio.init finishes the run current in its context (one at a time, as wandb.init once did): none is
            # current when it starts, so the adapters' runs stay open together. Its notices print as in any script.
            trackio.context_vars.current_run.set(None)
            return trackio.init(project=self.project, name=name, group=self.group, config=hyperparameters(adapter),
                                resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)

        if self.context is None:  # one context for all its runs: trackio's project banner prints once
            self.context = contextvars.copy_context()
        self.runs[adapter.name] = self.context.run(init)
        return name

    def scalars(self, adapter: str, values: dict[str, float], step: int) -> None:
        self.runs[adapter].log(values, step=step)

    def image(self, adapter: str, tag: str, png: Path, step: int) -> None:
        import trackio

        self.runs[adapter].log({tag: trackio.Image(str(png))}, step=step)

    def finish_adapter(self, adapter: str, failed: bool) -> None:
        self.runs.pop(adapter).finish()


TRACKERS = {cls.name: cls for cls in (TensorBoard, MLflow, WandB, Trackio)}


class Trackers:
    """Every configured tracker, fed the run's events; never raises for a tracker's own failure.

    The trackers' calls run in event order on a thread of their own: training never waits on a tracker (an MLflow
    store being created, a W&B run starting), `close` does. A daemon thread: a second Ctrl-C ends mlora even while
    a tracker hangs (a server that does not answer).
    """

    def __init__(self, config: LoggingConfig, run_dir: Path, sweep_name: str, adapters: Sequence[AdapterSpec],
                 task_names: Sequence[str], metrics: Sequence[str], images: bool = True):
        self.run_dir, self.task_names, self.images = run_dir, list(task_names), images
        self.adapters = {a.name: a for a in adapters}
        self.step: dict[str, int] = {}  # adapter -> its latest step
        self.resumed: dict[str, int] = {}  # adapter -> the saved step `--resume` continues it from
        path = run_dir / TRACKERS_RECORD
        self.saved: dict[str, Any] = read_json(path) if path.is_file() and config.trackers else {}
        project = config.project or sweep_name
        self.active = [TRACKERS[name](config, run_dir, project, metrics, self.saved.setdefault(name, {}))
                       for name in config.trackers]
        self.calls: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self.thread = threading.Thread(target=self.work, name="mlora-trackers", daemon=True)
        self.thread.start()

    def record(self, event: dict[str, Any]) -> None:
        if not self.active:
            return
        kind = event["event"]
        if kind == "step":
            for line in event["records"]:
                self.step[line["adapter"]] = line["step"]
                self.later(self.send, line["adapter"], "metrics", step_scalars(line), line["step"])
        elif kind == "trial":  # a searched trial's own settings, not its slot's defaults, are its run's parameters
            self.adapters[event["adapter"]] = event["spec"]
        elif kind == "resumed":
            self.step[event["adapter"]] = self.resumed[event["adapter"]] = event["step"]
        elif kind == "eval":
            name = event["adapter"]
            scalars = {**score_scalars("eval", event["scores"]), **score_scalars("harness", event.get("harness", {}))}
            self.later(self.send, name, "eval", scalars, self.step.get(name, 0))
        elif kind == "adapter_done":
            self.later(self.adapter_done, event["adapter"], event["result"])

    def adapter_done(self, name: str, entry: dict[str, Any]) -> None:
        """Its curves, CL metrics and heatmaps, then its tracker runs end (once: a resumed run skips what ended)."""
        due = [t for t in self.active if name not in t.record.get("done", [])]
        if not due:
            return
        step = entry["steps"]
        curve = sorted(entry["curve"], key=lambda point: point["step"])
        scalars = end_scalars(entry, self.task_names)
        heatmaps = self.heatmaps(name, entry) if self.images else []

        def end(tracker: Any) -> None:
            if any(point["after_task"] is None for point in curve):  # mid-task evaluations: the per-task curves
                for point in curve:
                    tracker.scalars(name, score_scalars("curve", point["scores"]), point["step"])
            tracker.scalars(name, scalars, step)
            for metric, png in heatmaps:
                tracker.image(name, f"heatmap/{metric}", png, step)
            tracker.finish_adapter(name, entry["status"] != "done")
            tracker.record.setdefault("done", []).append(name)

        for tracker in due:
            self.each(name, "the adapter's end", end, [tracker])
        self.save()

    def heatmaps(self, name: str, entry: dict[str, Any]) -> list[tuple[str, Path]]:
        """The adapter's R heatmaps, drawn now into plots/ (the run's end draws them again, the same)."""
        try:
            return [(metric, plots.heatmap(entry, metric, self.task_names,
                                           self.run_dir / "plots" / f"{name}-{metric}-heatmap.png"))
                    for metric in plots.PLOTTED_METRICS if entry.get("matrix", {}).get(metric)]
        except Exception as exc:  # a plot that fails costs the trackers its image, nothing more
            warn(f"logging.trackers: no heatmap images for {name} ({type(exc).__name__}: {exc})")
            return []

    def later(self, call: Callable[..., None], *args: Any) -> None:
        self.calls.put((call, *args))

    def work(self) -> None:
        """The trackers' thread: each call in order, until `close`."""
        while (item := self.calls.get()) is not None:
            item[0](*item[1:])

    def send(self, adapter: str, what: str, values: dict[str, float], step: int) -> None:
        self.each(adapter, what, lambda tracker: tracker.scalars(adapter, values, step))

    def each(self, adapter: str, what: str, call: Callable[[Any], None], trackers: list[Any] | None = None) -> None:
        """`call(tracker)` for every working tracker, the adapter's run opened (or resumed) first."""
        for tracker in list(self.active if trackers is None else trackers):
            doing = f"starting {adapter}'s run"
            try:
                if adapter not in tracker.runs:
                    runs = tracker.record.setdefault("runs", {})
                    runs[adapter] = tracker.start_adapter(self.adapters[adapter], runs.get(adapter),
                                                          self.resumed.get(adapter))
                    self.save()
                doing = what
                call(tracker)
            except Exception as exc:  # whatever the library raises, training goes on
                self.drop(tracker, doing, exc)

    def drop(self, tracker: Any, what: str, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        warn(f"logging.trackers: {tracker.name} failed ({what}: {type(exc).__name__}: {reason}); it logs no more, "
             "training goes on")
        if tracker in self.active:
            self.active.remove(tracker)
            with contextlib.suppress(Exception):  # flush what it can; it may be what failed
                tracker.close(True)

    def save(self) -> None:
        try:
            write_json(self.run_dir / TRACKERS_RECORD, self.saved)
        except OSError as exc:
            warn(f"logging.trackers: {exc}; --resume will start new tracker runs")

    def close(self, interrupted: bool = False) -> None:
        """Wait for the trackers, then end every tracker run still open (`--resume` continues those)."""
        self.later(self.end_all, interrupted)
        self.calls.put(None)
        self.thread.join()

    def end_all(self, interrupted: bool) -> None:
        for tracker in list(self.active):
            try:
                tracker.close(interrupted)
            except Exception as exc:
                self.drop(tracker, "closing", exc)


def warn(line: str) -> None:  # one line on stderr, above the progress bars while they show
    print(f"warning: {line}", file=sys.stderr, flush=True)
