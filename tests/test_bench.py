"""`mlora bench` runs every mode on a micro sweep, agrees with the sequential baseline, and
writes its report. (Benchmark numbers are measured by `scripts/bench.sh`, never in tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mlora_cli.cli import app

SWEEP = {
    "name": "tinybench",
    "base_model": "builtin:micro",
    "tasks": [
        {"name": "copy", "source": "builtin:copy", "train_examples": 16, "eval_examples": 4},
        {"name": "reverse", "source": "builtin:reverse", "train_examples": 16, "eval_examples": 4},
    ],
    "adapter": {"rank": 2, "alpha": 4, "lr": 1e-2},
    "train": {"steps_per_task": 2, "batch_size": 2, "max_seq_len": 24},
    "eval": {"max_new_tokens": 4},
    "sweep": {"grid": {"adapter.rank": [2, 4]}},
}


def test_bench_runs_agrees_and_writes_report(tmp_path: Path) -> None:
    sweep = tmp_path / "bench.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    args = ["bench", str(sweep), "--sequential-baseline", "--mode", "engine-serial", "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "out").iterdir()
    report = json.loads((folder / "bench.json").read_text())
    for key in ("experiment_throughput_ratio", "fusion_efficiency_train", "fusion_efficiency_eval", "agree", "modes"):
        assert key in report
    assert report["agree"] is True
    assert set(report["modes"]) == {"sequential", "concurrent", "engine-serial"}
    for figures in report["modes"].values():
        assert figures["experiments"] == 2 and figures["wall_seconds"] > 0 and figures["peak_rss_mib"] > 0
    assert report["experiment_throughput_ratio"] > 0 and report["fusion_efficiency_train"] > 0
    assert report["fusion"]["union_rank"] == 3  # the union adapter does the work of ranks 2 and 4: their mean
    # The concurrent and sequential runs trained the same experiments to the same results.
    for verdict in report["agreement"].values():
        assert verdict["max_loss_rel_delta"] < 1e-3
    assert "agree" in result.output and "fusion efficiency" in result.output


def test_bench_rejects_strategies_the_baseline_cannot_run(tmp_path: Path) -> None:
    sweep = tmp_path / "bench.yaml"
    sweep.write_text(yaml.safe_dump({**SWEEP, "adapter": {**SWEEP["adapter"], "strategy": "ewc"}}))
    result = CliRunner().invoke(app, ["bench", str(sweep), "--sequential-baseline", "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert "naive fine-tuning" in result.output and "Traceback" not in result.output
