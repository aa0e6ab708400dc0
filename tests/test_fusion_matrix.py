"""The fusion matrix's profile of mixed ranks (`lora_term_by_rank_class`) times what it says it times. (Its numbers
are measured by scripts/fusion_matrix.py, never in tests.)"""

from __future__ import annotations

from pathlib import Path

from helpers import micro_sweep, write_sweep

from mlora_cli.bench.fusion_matrix import ALL_LINEAR, lora_term_by_rank_class
from mlora_cli.spec.load import load_sweep
from mlora_cli.spec.sweep import expand


def test_the_lora_term_is_timed_fused_as_the_union_and_split_by_rank(tmp_path: Path) -> None:
    spec, _ = load_sweep(write_sweep(tmp_path, micro_sweep(sweep={"list": [{"adapter.rank": 2}, {"adapter.rank": 4},
                                                                            {"adapter.rank": 4}]})))
    adapters = expand(spec)
    report = lora_term_by_rank_class(spec, adapters, tmp_path, threads=1, targets="all-linear", rounds=3)
    assert list(report) == list(ALL_LINEAR)  # one entry per target module, in the first decoder layer
    rows = spec.train.batch_size
    for module in report.values():
        # The fused side routes every adapter's rows; the union and the rank classes the same rows in total, split
        # by rank: rank 2's one adapter, rank 4's two.
        assert module["rows"] == {"fused": 3 * rows, "union": 3 * rows, "rank 2": rows, "rank 4": 2 * rows}
        assert all(module[key] > 0 for key in ("fused_us", "union_us", "rank_classes_us", "efficiency",
                                               "vs_rank_classes"))
