"""`mlora bench` runs every mode on a micro sweep, agrees with the sequential baseline, and
writes its report. (Benchmark numbers are measured by `scripts/bench.sh`, never in tests.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import micro_sweep, mlora, write_sweep

# Mlora bench runs every mode as fresh processes: the slow tier.
pytestmark = pytest.mark.slow

SWEEP = micro_sweep(
    name="tinybench",
    adapter={"rank": 2, "alpha": 4},
    train={"steps_per_task": 2},
    eval={"max_new_tokens": 4},
    sweep={"grid": {"adapter.rank": [2, 4]}},
)


def test_bench_runs_agrees_and_writes_report(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP)
    result = mlora("bench", sweep, "--sequential-baseline", "--mode", "engine-serial", "--output", tmp_path / "out")
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
        assert verdict["max_early_loss_rel_delta"] < 1e-6 and verdict["max_loss_rel_delta"] < 1e-3
    assert "agree" in result.output and "fusion efficiency" in result.output


def test_bench_rejects_strategies_the_baseline_cannot_run(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP, adapter={**SWEEP["adapter"], "strategy": "ewc"})
    result = mlora("bench", sweep, "--sequential-baseline", "--output", tmp_path)
    assert result.exit_code == 2
    assert "naive fine-tuning" in result.output and "Traceback" not in result.output


def test_bad_input_found_in_a_modes_process_is_its_lines_and_exit_2(tmp_path: Path) -> None:
    """A problem only the loaded model shows (a target that matches no layer) surfaces in the bench's first mode's
    `mlora run` process: the bench prints that process's lines and exits 2, as `mlora run` would."""
    sweep = write_sweep(tmp_path, SWEEP)
    result = mlora("bench", sweep, "adapter.target_modules=[nope]", "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "failed; see" not in result.output
    assert "adapter.target_modules: 'nope' matches no linear layer of builtin:micro" in result.stderr
    taken = tmp_path / "a-file"
    taken.write_text("")
    result = mlora("bench", sweep, "--output", taken)
    assert result.exit_code == 2 and "--output: cannot make" in result.stderr


def test_agreement_needs_the_early_steps_to_match_and_the_finals_to_be_close() -> None:
    from mlora_cli.bench.bench import agreement

    final = {"copy": {"loss": 1.0, "exact_match": 0.5}}
    sequential = {"final": {"a": final, "b": final, "c": final}, "early_losses": {n: [3.0, 2.0] for n in "abc"}}
    concurrent = {
        "final": {"a": {"copy": {"loss": 1.05, "exact_match": 0.53}},  # grown rounding: close enough
                  "b": {"copy": {"loss": 1.0, "exact_match": 0.5}},
                  "c": {"copy": {"loss": 1.2, "exact_match": 0.5}}},  # 20% apart at the end
        "early_losses": {"a": [3.0, 2.0000001], "b": [3.0, 2.01], "c": [3.0, 2.0]},  # b: a different step 2
    }
    verdicts = agreement(concurrent, sequential)
    assert [verdicts[n]["agree"] for n in "abc"] == [True, False, False]
    assert verdicts["b"]["max_early_loss_rel_delta"] == pytest.approx(0.005)


RL_SWEEP = micro_sweep(
    name="rlbench", base_model="builtin:tiny", devices="cpu",
    tasks=[{"name": "warmup", "source": "builtin:reverse", "max_len": 4, "train_examples": 16, "eval_examples": 3,
            "steps": 2},
           {"name": "rl", "source": "builtin:reverse", "max_len": 4, "train_examples": 16, "eval_examples": 3,
            "steps": 6, "objective": "grpo", "reward": "char_accuracy"}],
    adapter={"rank": 4, "alpha": 8, "lr": 3e-3, "target_modules": "all-linear"},
    train={"batch_size": 2, "rl": {"group_size": 3, "max_new_tokens": 5, "kl_beta": 0.05}},
    eval={"metrics": ["reward", "pass_at_k", "loss"], "max_new_tokens": 5, "samples": 3, "pass_k": 2},
    sweep={"grid": {"train.rl.temperature": [0.8, 1.0]}},
)


def test_rl_bench_samples_what_mlora_samples_and_reports_rewards(tmp_path: Path) -> None:
    """The plain-PEFT RL baseline (HF generate with mlora's per-row noise) draws the same completions: the
    mean sampled reward of every early RL step is equal, and so is the base's pass@k (the same seeds)."""
    sweep = write_sweep(tmp_path, RL_SWEEP)
    result = mlora("bench", sweep, "--sequential-baseline", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "out").iterdir()
    report = json.loads((folder / "bench.json").read_text())
    assert report["agree"] is True
    for name, verdict in report["agreement"].items():
        assert verdict["max_early_reward_delta"] == 0.0 and verdict["max_early_loss_rel_delta"] < 1e-5
        assert len(report["rl_rewards"]["concurrent"][name]) == len(report["rl_rewards"]["sequential"][name]) == 6
    for key in ("fusion_efficiency_sample", "fusion_efficiency_rl_train", "prompt_sharing_speedup_sample",
                "prompt_sharing_speedup_rl_train"):
        assert report["fusion"][key] > 0
    run_dir = next((folder / "concurrent").glob("rlbench-*"))
    ours = json.loads((run_dir / "results.json").read_text())["adapters"]
    for name in ours:
        theirs = json.loads((folder / "sequential" / f"{name}.json").read_text())
        assert ours[name]["matrix"]["pass_at_k"][0] == theirs["matrix"]["pass_at_k"][0]  # the base, same seeds
    assert "RL learning" in result.output and "RL sampling" in result.output and "each prompt once" in result.output


def test_bench_fusion_matrix_times_every_cell_and_writes_it(tmp_path: Path) -> None:
    import os

    sweep = write_sweep(tmp_path, SWEEP)
    result = mlora("bench", sweep, "--fusion-matrix", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "out").iterdir()
    report = json.loads((folder / "fusion-matrix.json").read_text())
    assert report["ranks"] == [2, 4] and report["equal_rank"] == 3
    cells = {(c["threads"], c["targets"], c["ranks"], c["dropout"]) for c in report["cells"]}
    assert cells == {(t, targets, ranks, p) for t in {1, os.cpu_count() or 1} for targets in ("q,v", "all-linear")
                     for ranks in ("equal", "mixed") for p in (0.0, 0.05)}
    for cell in report["cells"]:
        assert cell["fused_ms"] > 0 and cell["union_ms"] > 0 and cell["peft_union_ms"] > 0
        assert ("dropout_cost" in cell) == (cell["dropout"] > 0)
    assert "training-step fusion on the CPU" in result.output


def test_bench_fusion_matrix_is_not_combined_with_the_modes(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP)
    result = mlora("bench", sweep, "--fusion-matrix", "--sequential-baseline", "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "--fusion-matrix: times the training step alone" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
