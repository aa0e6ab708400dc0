"""The training-step fusion matrix of docs/benchmark.md: threads x targets x ranks x dropout, on CPU.

    python scripts/fusion_matrix.py [SWEEP] [OUT]   # default sweeps/bench.yaml and bench/: OUT/fusion-matrix.json
                                                    # (what mlora bench SWEEP --fusion-matrix measures)
    python scripts/fusion_matrix.py --profile 2,all-linear,equal,0 [SWEEP]   # where one cell's step time goes

Run it on an idle machine: each cell times the fused step, the union batch on mlora's engine and
the union batch in plain PEFT alternately (see mlora_cli/bench/fusion_matrix.py). `--profile
THREADS,TARGETS,RANKS,DROPOUT` (targets q,v is written qv) splits each of the three steps of one cell
into forward, backward (each with its LoRA term) and clipping + AdamW, from torch.profiler's ranges; for
mixed ranks it also times each module's LoRA term fused, as the union batch at the mean rank, and as the
rows split by rank (one adapter per rank: `lora_term_by_rank_class`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlora_cli.bench.fusion_matrix import fusion_matrix_report, lora_term_by_rank_class, profile_cell
from mlora_cli.report.benchmark import fusion_matrix_table
from mlora_cli.spec.load import load_sweep
from mlora_cli.spec.sweep import expand


def main(sweep: str = "sweeps/bench.yaml", out: str = "bench") -> None:
    """What `mlora bench SWEEP --fusion-matrix` does, written to OUT/fusion-matrix.json."""
    spec, _ = load_sweep(sweep)
    console = Console()
    Path(out).mkdir(parents=True, exist_ok=True)
    report = fusion_matrix_report(Path(sweep), spec, expand(spec), Path(out), progress=console.log)
    console.print(fusion_matrix_table(report))
    console.print(f"written to {Path(out) / 'fusion-matrix.json'}")


def profile(cell: str, sweep: str = "sweeps/bench.yaml") -> None:
    threads, targets, ranks, dropout = cell.split(",")
    spec, _ = load_sweep(sweep)
    parts = profile_cell(spec, expand(spec), Path(sweep).parent.resolve(), int(threads),
                         "q,v" if targets == "qv" else targets, ranks == "equal", float(dropout))
    table = Table(title=f"where a step's time goes: {threads} threads, {targets}, {ranks} ranks, dropout {dropout} "
                        "(ms per step; phases under torch.profiler, wall without it)")
    table.add_column("phase")
    for label in parts:
        table.add_column(label, justify="right")
    for phase in parts["fused"]:
        table.add_row(phase, *(f"{parts[label][phase]:.1f}" if parts[label][phase] else "-" for label in parts))
    Console().print(table)
    report: dict = {"phases": parts}
    if ranks == "mixed":  # whether the gap is fusing's or the ranks' own: the LoRA term against one call per rank
        by_module = lora_term_by_rank_class(spec, expand(spec), Path(sweep).parent.resolve(), int(threads),
                                            "q,v" if targets == "qv" else targets)
        table = Table(title="the LoRA term alone (forward + backward), first decoder layer, us: fused, the union "
                            "batch at the mean rank, and the rows split by rank (one adapter per rank)")
        for header in ("module", "fused", "union", "rank classes", "union / fused", "rank classes / fused"):
            table.add_column(header, justify="right")
        for module, m in by_module.items():
            table.add_row(module, f"{m['fused_us']:.0f}", f"{m['union_us']:.0f}", f"{m['rank_classes_us']:.0f}",
                          f"{m['efficiency']:.2f}", f"{m['vs_rank_classes']:.2f}")
        Console().print(table)
        report["lora_term_by_rank_class"] = by_module
    out = Path("bench") / f"fusion-profile-{cell.replace(',', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    Console().print(f"written to {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        profile(*sys.argv[2:4])
    else:
        main(*sys.argv[1:3])
