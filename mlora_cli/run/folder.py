"""The run folder: a new one, and what `--resume` reads and tidies before it continues one.

Torch is imported only where a saved state is read: the launcher starts the workers before
the driver imports it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from mlora_cli.contract import (
    ADAPTERS,
    METRICS,
    RESOLVED_SWEEP,
    RUN_RECORD,
    adapter_record,
    load_resolved_sweep,
    result_path,
    state_path,
)
from mlora_cli.errors import ConfigError, unreadable
from mlora_cli.files import new_folder, read_json, write_json, write_text
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec


def new_run_dir(spec: SweepSpec, base: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = base / spec.output_dir if not Path(spec.output_dir).is_absolute() else Path(spec.output_dir)
    try:
        return new_folder(root / f"{spec.name}-{stamp}")
    except OSError as exc:  # a file where a folder must be, no permission, a path under /proc
        raise ConfigError([f"output_dir: cannot make the run folder in {root}: {exc.strerror or exc}"]) from None


def saved_steps(run_dir: Path, adapters: list[AdapterSpec]) -> dict[str, float]:
    """Before resuming: each adapter's last saved step (inf when it ended), reading every state and result once.

    A state or result that cannot be read (a kill mid-write on a filesystem without atomic
    rename, a disk error, a hand edit) is one line naming the file and what to do, for all
    such files at once.
    """
    import json

    import torch

    last_step: dict[str, float] = {}
    problems = []
    for adapter in adapters:
        result, state = result_path(run_dir, adapter.name), state_path(run_dir, adapter.name)
        try:
            if result.is_file():
                json.loads(result.read_text())
                last_step[adapter.name] = float("inf")
            elif state.is_file():
                last_step[adapter.name] = torch.load(state, weights_only=False)["step"]
        except Exception as exc:  # truncated or corrupt: torch and json raise several types
            broken = result if result.is_file() else state
            problems.append(unreadable(broken, exc, f"delete it to train {adapter.name} again from its last "
                                                    "readable point"))
    if problems:
        raise ConfigError(problems)
    return last_step


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and folders of writes a kill interrupted (`.NAME.tmp`, `.NAME.old`): never read, removed."""
    import shutil

    removed = []
    for path in sorted(run_dir.rglob(".*.tmp")) + sorted(run_dir.rglob(".*.old")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def keep_metrics_up_to_checkpoints(run_dir: Path, last_step: dict[str, float]) -> None:
    """Before resuming: drop metrics.jsonl lines past each adapter's last saved state (they will be redone)."""
    import json

    metrics = run_dir / METRICS
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if record["step"] <= last_step.get(record["adapter"], 0):
            kept.append(line + "\n")
    write_text(metrics, "".join(kept))


def record_trial(run_dir: Path, trial: AdapterSpec) -> None:
    """A searched trial's settings replace its slot's defaults in adapters.json (what `mlora eval` reads), once
    Optuna has given them."""
    entries = read_json(run_dir / ADAPTERS)
    write_json(run_dir / ADAPTERS, [adapter_record(trial) if e["name"] == trial.name else e for e in entries])


def load_run(run_dir: Path) -> tuple[SweepSpec, dict[str, Any], Path]:
    """A run folder's resolved sweep, for `--resume`: (spec, resolved data, the sweep file's folder)."""
    missing = [name for name in (RESOLVED_SWEEP, RUN_RECORD, ADAPTERS) if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError([f"{run_dir}: not a run folder mlora can resume (no {', '.join(missing)})"])
    sweep_dir = Path(read_json(run_dir / RUN_RECORD)["sweep_dir"])
    spec, resolved = load_resolved_sweep(run_dir / RESOLVED_SWEEP, sweep_dir)
    return spec, resolved, sweep_dir
