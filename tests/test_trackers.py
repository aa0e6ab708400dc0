"""Experiment trackers against the real libraries: a micro run's config, steps, evaluations, CL metrics and heatmaps,
read back with each library's own reader (TensorBoard's EventAccumulator, MlflowClient, `wandb leet inspect`,
trackio's local store); `--resume` continues the same tracker runs. Each test skips when its library is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import micro_sweep, mlora, stop_mid_run, write_sweep

from mlora_cli.report.trackers import TRACKERS, hyperparameters, step_scalars
from mlora_cli.spec.load import load_sweep, parse_spec
from mlora_cli.spec.sweep import expand

INSTALLED = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
SWEEP = micro_sweep(devices="cpu", eval={"metrics": ["loss", "exact_match"], "max_new_tokens": 4, "every_steps": 2},
                    sweep={"grid": {"adapter.rank": [4, 8]}}, logging={"trackers": INSTALLED})
NAMES = ["r4", "r8"]


def needs(library: str) -> None:
    if library not in INSTALLED:
        pytest.skip(f"{library} is not installed (pip install 'mlora-sweep[{library}]')")


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run_in(folder: Path) -> Path:
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


# -- the logging section: checked like every other section; a missing library stops the run at its start ------


def test_the_logging_section_is_checked_like_every_other(tmp_path: Path) -> None:
    bad = write_sweep(tmp_path, micro_sweep(logging={"trackers": ["tensorbord", "mlflow"], "projct": "x",
                                                     "wandb_mode": "ofline"}))
    result = mlora("validate", bad)
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "logging.projct: unknown key (did you mean 'project'?)",
        "logging.trackers[0]: must be one of tensorboard, mlflow, wandb, trackio, got 'tensorbord' (did you mean "
        "'tensorboard'?)",
        "logging.wandb_mode: must be one of offline, online, got 'ofline' (did you mean 'offline'?)",
    ]
    twice = mlora("validate", write_sweep(tmp_path, micro_sweep(logging={"trackers": ["mlflow", "mlflow"]})))
    assert (twice.exit_code, twice.output.strip()) == (2, "logging.trackers: 'mlflow' is listed twice")
    spec, _ = load_sweep(write_sweep(tmp_path, micro_sweep(logging={"trackers": "tensorboard"})))
    assert spec.logging.trackers == ("tensorboard",) and spec.logging.wandb_mode == "offline"


def test_a_tracker_not_installed_stops_the_run_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = mlora("run", write_sweep(tmp_path, micro_sweep(logging={"trackers": ["wandb"]})))
    assert result.exit_code == 2
    assert result.output.strip() == "logging.trackers: wandb is not installed: pip install 'mlora-sweep[wandb]'"
    assert not (tmp_path / "runs").exists()


def test_an_adapter_s_hyperparameters_are_its_expanded_config() -> None:
    adapter = expand(parse_spec(micro_sweep(sweep={"grid": {"adapter.rank": [4, 8], "train.rl.group_size": [2]}})))[1]
    params = hyperparameters(adapter)
    assert (params["adapter.rank"], params["train.steps_per_task"], params["train.rl.group_size"], params["seed"]) == (
        8, 3, 2, 0)
    assert "train.rl" not in params and params["adapter.target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert step_scalars({"adapter": "a", "task": "copy", "task_index": 0, "step": 3, "loss": 1.5, "tokens": 7,
                         "reward_mean": 0.25}) == {"train/task_index": 0.0, "train/loss": 1.5, "train/tokens": 7.0,
                                                   "train/reward_mean": 0.25}


# -- one run with every installed tracker, read back by each library ------------------------------------------


@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """trackio's store (it reads TRACKIO_DIR once, at import): a temporary one unless trackio was imported before."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
        for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep W&B out of $HOME
            patch.setenv(variable, str(tmp_path_factory.mktemp(variable.lower())))
        if "trackio" not in INSTALLED:
            yield None
            return
        import trackio.utils

        yield Path(trackio.utils.TRACKIO_DIR)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, trackio_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """A micro run (2 adapters, 2 tasks, mid-task evaluations) logged to every installed tracker."""
    if not INSTALLED:
        pytest.skip("no tracker library installed (pip install 'mlora-sweep[tensorboard]', ...)")
    folder = tmp_path_factory.mktemp("tracked")
    result = mlora("run", write_sweep(folder, SWEEP))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output, result.output
    run_dir = only_run_in(folder)
    return run_dir, json.loads((run_dir / "results.json").read_text())


def lines_of(run_dir: Path, adapter: str) -> list[dict[str, Any]]:
    return [r for r in metric_lines(run_dir) if r["adapter"] == adapter]


def eval_points(entry: dict[str, Any], task: str, metric: str) -> list[tuple[int, float]]:
    """(step, score) of every evaluation after a task (the rows of R), in step order."""
    return [(p["step"], p["scores"][task][metric]) for p in entry["curve"] if p["after_task"] is not None]


def same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal up to float32 (TensorBoard stores float32)."""
    return [s for s, _ in actual] == [s for s, _ in expected] and [v for _, v in actual] == pytest.approx(
        [v for _, v in expected], rel=1e-6)


@pytest.mark.slow
def test_tensorboard_gets_config_steps_evaluations_cl_metrics_and_heatmaps(tracked) -> None:
    needs("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, results = tracked
    for name in NAMES:
        events = EventAccumulator(str(run_dir / "tensorboard" / name), size_guidance={"scalars": 0, "images": 0})
        events.Reload()
        scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        lines, entry = lines_of(run_dir, name), results["adapters"][name]
        for field in ("loss", "lr", "grad_norm", "tokens", "seconds"):
            assert same_points(scalars[f"train/{field}"], [(r["step"], r[field]) for r in lines])
        assert same_points(scalars["eval/copy/loss"], eval_points(entry, "copy", "loss"))
        assert [step for step, _ in scalars["curve/reverse/exact_match"]] == [p["step"] for p in entry["curve"]]
        assert same_points(scalars["cl/loss/bwt"], [(entry["steps"], entry["cl_metrics"]["loss"]["bwt"])])
        assert scalars["final_mean/exact_match"][0][1] == pytest.approx(entry["final_mean"]["exact_match"])
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["adapter.rank"].number_value == int(name[1:])
        assert start.hparams["train.schedule"].string_value == "constant"
        assert [image.step for image in events.Images("heatmap/loss")] == [entry["steps"]]


@pytest.mark.slow
def test_mlflow_gets_a_child_run_per_adapter_with_params_metrics_and_heatmaps(tracked) -> None:
    needs("mlflow")
    from mlflow import MlflowClient

    run_dir, results = tracked
    saved = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    assert client.get_experiment(saved["experiment_id"]).name == "micro"  # logging.project, else the sweep's name
    parent = client.get_run(saved["parent_run_id"])
    assert (parent.info.run_name, parent.info.status) == (run_dir.name, "FINISHED")
    for name in NAMES:
        run = client.get_run(saved["runs"][name])
        entry = results["adapters"][name]
        assert (run.info.run_name, run.info.status) == (name, "FINISHED")
        assert run.data.tags["mlflow.parentRunId"] == saved["parent_run_id"]
        assert (run.data.params["adapter.rank"], run.data.params["train.rl.loss"]) == (name[1:], "dapo")
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in lines_of(run_dir, name)]
        evals = client.get_metric_history(run.info.run_id, "eval/reverse/exact_match")
        assert [(m.step, m.value) for m in evals] == eval_points(entry, "reverse", "exact_match")
        assert run.data.metrics["cl/loss/acc"] == pytest.approx(entry["cl_metrics"]["loss"]["acc"])
        plots = [f.path for f in client.list_artifacts(run.info.run_id, "plots")]
        assert plots == [f"plots/{name}-exact_match-heatmap.png", f"plots/{name}-loss-heatmap.png"]


def wandb_records(path: Path) -> list[dict[str, Any]]:
    """A .wandb transaction log's records, through W&B's own reader (`wandb leet inspect --json`)."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                          capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def wandb_history(records: list[dict[str, Any]], key: str) -> list[tuple[int, Any]]:
    return [(r["history"]["item"]["step"], r["history"]["item"][key]) for r in records
            if r["type"] == "history" and key in r["history"]["item"]]


@pytest.mark.slow
def test_wandb_offline_gets_a_run_per_adapter_in_the_run_s_group(tracked) -> None:
    needs("wandb")
    run_dir, results = tracked
    ids = json.loads((run_dir / "trackers.json").read_text())["wandb"]["runs"]
    for name in NAMES:
        (log,) = (run_dir / "wandb").glob(f"offline-run-*-{ids[name]}/run-{ids[name]}.wandb")
        records = wandb_records(log)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        entry = results["adapters"][name]
        assert (run["display_name"], run["run_group"], run["project"]) == (name, run_dir.name, "micro")
        assert run["config"]["update"]["adapter"]["rank"] == int(name[1:])
        assert run["config"]["update"]["train"]["rl"]["loss"] == "dapo"
        assert wandb_history(records, "train/loss") == [(r["step"], r["loss"]) for r in lines_of(run_dir, name)]
        assert wandb_history(records, "eval/copy/loss") == eval_points(entry, "copy", "loss")
        assert wandb_history(records, "cl/exact_match/acc") == [(entry["steps"],
                                                                 entry["cl_metrics"]["exact_match"]["acc"])]
        assert wandb_history(records, "heatmap/loss._type") == [(entry["steps"], "image-file")]
        ((_, image),) = wandb_history(records, "heatmap/loss.path")
        assert (log.parent / "files" / image).is_file()


@pytest.mark.slow
def test_trackio_gets_a_run_per_adapter_in_its_local_store(tracked, trackio_dir: Path | None) -> None:
    needs("trackio")
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    run_dir, results = tracked
    names = json.loads((run_dir / "trackers.json").read_text())["trackio"]["runs"]
    configs = {run.name: run.config for run in trackio.Api().runs("micro")}
    for name in NAMES:
        entry = results["adapters"][name]
        assert names[name] == f"{run_dir.name}/{name}"
        assert configs[names[name]]["adapter.rank"] == int(name[1:])
        assert configs[names[name]]["_Group"] == run_dir.name
        logs = SQLiteStorage.get_logs("micro", names[name])
        assert [(log["step"], log["train/loss"]) for log in logs if "train/loss" in log] == [
            (r["step"], r["loss"]) for r in lines_of(run_dir, name)]
        assert [(log["step"], log["eval/copy/loss"]) for log in logs if "eval/copy/loss" in log] == eval_points(
            entry, "copy", "loss")
        (heatmap,) = [log["heatmap/loss"] for log in logs if "heatmap/loss" in log]
        assert (trackio_dir / "media" / heatmap["file_path"]).is_file()


@pytest.mark.slow
def test_a_tracker_that_fails_while_the_run_trains_is_one_warning_and_training_goes_on(tmp_path: Path) -> None:
    needs("mlflow")
    needs("tensorboard")
    sweep = micro_sweep(devices="cpu", logging={"trackers": ["mlflow", "tensorboard"], "mlflow_uri": "nosuch://store"})
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.output
    assert warnings[0].startswith("warning: logging.trackers: mlflow failed (starting default's run: "), warnings
    assert warnings[0].endswith("); it logs no more, training goes on")
    run_dir = only_run_in(tmp_path)
    assert (run_dir / "results.json").is_file() and list((run_dir / "tensorboard" / "default").iterdir())


# -- resume: the same tracker runs continue -----------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_the_same_tracker_runs(tmp_path: Path, tracked, trackio_dir: Path | None) -> None:
    """Stopped with Ctrl-C mid-task, then resumed: every tracker has each step once, in the same run."""
    first_run, _ = tracked
    # MLflow in the first run's store: a URI given in the sweep, and no second store to create.
    mlflow_uri = json.loads((first_run / "trackers.json").read_text()).get("mlflow", {}).get("tracking_uri")
    sweep = write_sweep(tmp_path, micro_sweep(name="resumed", devices="cpu", train={"steps_per_task": 6},
                                              eval={"metrics": ["loss"]},
                                              logging={"trackers": INSTALLED, "mlflow_uri": mlflow_uri}))
    env = {**os.environ, **({"TRACKIO_DIR": str(trackio_dir)} if trackio_dir else {})}
    stopped = stop_mid_run(tmp_path, sweep, signal.SIGINT, env=env, ready=lambda: any(
        json.loads(line)["step"] >= 3 for path in tmp_path.glob("runs/*/metrics.jsonl")
        for line in path.read_text().splitlines()[:-1]))
    run_dir = only_run_in(tmp_path)
    assert stopped.returncode == 130 and not (run_dir / "results.json").exists(), stopped.stdout
    before = json.loads((run_dir / "trackers.json").read_text())
    stop = max(r["step"] for r in metric_lines(run_dir))
    assert stop < 12, "the run ended before the stop: nothing to resume"

    resumed = mlora("run", "--resume", run_dir, "--no-plots")  # here: trackio's store is this process's
    assert resumed.exit_code == 0 and "warning" not in resumed.output, resumed.output
    after = json.loads((run_dir / "trackers.json").read_text())
    assert {t: after[t]["runs"] for t in INSTALLED} == {t: before[t]["runs"] for t in INSTALLED}  # the same runs
    steps = [(r["step"], r["loss"]) for r in metric_lines(run_dir)]
    assert [s for s, _ in steps] == list(range(1, 13))
    if "tensorboard" in INSTALLED:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tensorboard" / "default"), size_guidance={"scalars": 0})
        events.Reload()
        assert len(list((run_dir / "tensorboard" / "default").glob("events.out.tfevents.*"))) == 2
        assert same_points([(e.step, e.value) for e in events.Scalars("train/loss")], steps)
    if "mlflow" in INSTALLED:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_uri)
        run_id = after["mlflow"]["runs"]["default"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == steps
    if "wandb" in INSTALLED:
        run_id = after["wandb"]["runs"]["default"]
        logs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
        assert len(logs) == 2  # the part before the stop and the resumed one: one run id, two offline folders
        parts = [wandb_records(log) for log in logs]
        assert [r["run"]["run_id"] for part in parts for r in part if r["type"] == "run"] == [run_id, run_id]
        assert [point for part in parts for point in wandb_history(part, "train/loss")] == steps
        assert wandb_history(parts[0], "train/loss")[-1][0] == stop
    if "trackio" in INSTALLED:
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        name = after["trackio"]["runs"]["default"]
        assert [run.name for run in trackio.Api().runs("resumed")] == [name]
        logs = SQLiteStorage.get_logs("resumed", name)
        assert [(log["step"], log["train/loss"]) for log in logs if "train/loss" in log] == steps
