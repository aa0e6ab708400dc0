"""Bench modes that run one fresh process per experiment (the sequential baseline, TRL), timed from launch to exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlora_cli.errors import ConfigError
from mlora_cli.spec.sweep import AdapterSpec


class ModeFailed(Exception):
    """A bench mode's process exited non-zero; the message names its log."""


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Run `command` to completion; (wall seconds, peak RSS MiB of that process). Its output goes to `log`; an exit
    of 2 (bad input found in the process, one line per problem on stderr) is raised as those lines."""
    start = time.perf_counter()
    errors = log.with_suffix(".stderr")
    with log.open("w") as out, errors.open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, "COLUMNS": "200"})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    stderr = errors.read_text()
    errors.unlink()
    with log.open("a") as out:  # the log keeps everything, stderr after stdout
        out.write(stderr)
    problems = [line for line in stderr.splitlines() if line.strip()]
    if code == 2 and problems and not any(line.startswith("Traceback") for line in problems):
        raise ConfigError(problems[-20:])
    if code != 0:
        raise ModeFailed(f"{' '.join(command[:4])} ... failed; see {log}")
    return wall, usage.ru_maxrss / 1024


def run_processes(mode: str, module: str, resolved_sweep: Path, data_dir: Path, adapters: list[AdapterSpec],
                  out: Path, progress: Callable[[str], None], early_steps: int = 0) -> dict[str, Any]:
    """One `python -m MODULE SWEEP ADAPTER OUT.json DATA_DIR` process per adapter, one after another; the mode's
    figures, with each adapter's first `early_steps` training losses (what agreement compares)."""
    out.mkdir(parents=True, exist_ok=True)
    walls, rss, results = [], [], {}
    start = time.perf_counter()
    for adapter in adapters:
        progress(f"{mode}: {adapter.name}")
        result_file = out / f"{adapter.name}.json"
        command = [sys.executable, "-m", module, str(resolved_sweep), adapter.name, str(result_file), str(data_dir)]
        wall, peak = timed(command, out / f"{adapter.name}.log")
        walls.append(wall)
        rss.append(peak)
        results[adapter.name] = json.loads(result_file.read_text())
    return {
        "mode": mode,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mib": max(rss),
        "experiments": len(adapters),
        "experiment_seconds": walls,
        "train_tokens": sum(r["train_tokens"] for r in results.values()),
        "eval_seconds": sum(r["eval_seconds"] for r in results.values()),
        "final": {name: r["final"] for name, r in results.items()},
        "early_losses": {name: r.get("train_losses", [])[:early_steps] for name, r in results.items()},
        "rl_rewards": {name: r["rl_rewards"] for name, r in results.items() if r.get("rl_rewards")},
    }
