"""`mlora bench`'s tables: modes side by side, co-training against its limits, agreement."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from mlora_cli.report.fit import Col, caption_text, drop_to_fit, fitted_table, left_out_notes, width_budget


def bench_tables(report: dict[str, Any], width: int | None = None) -> list[Table]:
    """`mlora bench`: modes side by side, co-training against its limits, agreement.

    At 100 columns and more the modes table adds each mode's mean experiment time against the sequential one
    (always in bench.json).
    """

    budget = width_budget(width)
    machine = report["machine"]
    header = f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}" + (
        f", {machine['gpu']}" if "gpu" in machine else "")
    modes = list(report["modes"].values())

    def ratio(key: str) -> list[str]:
        return [f"{m[key]:.2f}x" if key in m else "-" for m in modes]

    columns = [
        Col("mode", [escape(name) for name in report["modes"]], justify="left"),
        Col("wall\ns", [f"{m['wall_seconds']:.1f}" for m in modes]),
        Col("exps\nper h", [f"{m['experiments_per_hour']:,.0f}" for m in modes]),
        Col("mean\nexp s", [f"{m['mean_experiment_seconds']:.1f}" for m in modes]),
        Col("train\ntok/s", [f"{m['train_tokens_per_s']:,.0f}" for m in modes], drop=4),
        Col("eval\ns", [f"{m['eval_seconds']:.1f}" for m in modes], drop=2),
        Col("RSS\nMiB", [f"{m['peak_rss_mib']:,.0f}" for m in modes], drop=3),
        Col("speed\nvs seq", ratio("throughput_vs_sequential")),
    ]
    if budget >= 100:
        columns.append(Col("time\nvs seq", ratio("mean_experiment_time_vs_sequential"), drop=1))
    shown, dropped = drop_to_fit(columns, budget)
    headers = {c.header for c in shown}
    legend = [text for column, text in (
        ("wall\ns", "wall s: launch to exit"), ("exps\nper h", "exps per h: experiments (adapters trained) per hour"),
        ("mean\nexp s", "mean exp s: mean seconds from start to each adapter's end"),
        ("train\ntok/s", "tok/s: training tokens per second"), ("eval\ns", "eval s: seconds evaluating"),
        ("RSS\nMiB", "RSS: peak resident memory"),
        ("speed\nvs seq", "speed vs seq: experiments per hour against the sequential baseline"),
        ("time\nvs seq", "time vs seq: sequential mean experiment time / this mode's"),
    ) if column in headers]
    tables = [fitted_table(shown, title=f"mlora bench: {report['sweep']}, {report['adapters']} adapters",
                     caption=caption_text(header, "; ".join(legend), *left_out_notes(dropped, budget)))]

    fusion = report["fusion"]
    threads = fusion["torch_threads"]
    summary = Table(title="co-training against its limits", caption_justify="left")
    summary.add_column("figure", no_wrap=True)
    summary.add_column("value", justify="right", no_wrap=True)
    summary.add_column("meaning")
    plural = "s" if threads != 1 else ""
    passes = (("train", "train", "step", True), ("eval", "eval", "eval", False),
              ("sample", "RL sampling", "sample", False), ("rl_train", "RL train", "rl_step", True))
    for kind, label, part, ms in passes:
        if f"fusion_efficiency_{kind}" not in fusion:
            continue  # the RL passes: on a sweep with an RL task only
        union, fused = fusion[f"union_{part}_seconds"], fusion[f"fused_{part}_seconds"]
        seconds = (lambda t: f"{t * 1e3:.0f} ms") if ms else (lambda t: f"{t:.2f} s")
        rank = f" (rank {fusion['union_rank']})" if kind == "train" else ""
        threads_note = f" ({threads} thread{plural})" if kind == "train" else ""
        summary.add_row(f"fusion efficiency ({label})", f"{fusion[f'fusion_efficiency_{kind}']:.2f}",
                        f"union {label}{rank} {seconds(union)} / fused {seconds(fused)}{threads_note}")
    for kind, label, part in (("sample", "RL sampling", "sample"), ("rl_train", "RL train", "rl_step")):
        if f"prompt_sharing_speedup_{kind}" in fusion:
            summary.add_row(f"each prompt once ({label})", f"{fusion[f'prompt_sharing_speedup_{kind}']:.2f}x",
                            f"fused {label} with full rows {fusion[f'full_rows_{part}_seconds'] * 1e3:.0f} ms / "
                            f"sharing each group's prompt {fusion[f'fused_{part}_seconds'] * 1e3:.0f} ms")
    if "experiment_throughput_ratio" in report:
        summary.add_row("experiment throughput ratio", f"{report['experiment_throughput_ratio']:.2f}x",
                        "concurrent / sequential experiments per hour")
        summary.add_row("peak RSS below 2 sequential", "yes" if report["memory_below_two_sequential"] else "no",
                        f"{report['modes']['concurrent']['peak_rss_mib']:,.0f} MiB vs 2 x "
                        f"{report['modes']['sequential']['peak_rss_mib']:,.0f} MiB")
    if "throughput_vs_trl" in report:
        summary.add_row("experiment throughput vs TRL", f"{report['throughput_vs_trl']:.2f}x",
                        "concurrent / TRL GRPOTrainer experiments per hour")
    for level, per_hour in report.get("concurrency_curve", {}).items():
        summary.add_row(f"experiments/h, {level} at once", f"{per_hour:,.0f}", f"with max_concurrent {level}")
    tables.append(summary)

    if "rl_rewards" in report:
        tables.append(reward_table(report))
    if "agreement" in report:
        tol = report["agreement_tolerances"]
        names = list(report["agreement"])
        verdicts = list(report["agreement"].values())
        agree = fitted_table([
            Col("adapter", [escape(name) for name in names], justify="left"),
            Col("early\n|d loss|", [f"{v['max_early_loss_rel_delta']:.0e}" for v in verdicts]),
            Col("|d loss|\n%", [f"{100 * v['max_loss_rel_delta']:.3f}" for v in verdicts]),
            Col("|d exact|\npp", [f"{100 * v['max_exact_match_delta']:.1f}" for v in verdicts]),
            *([Col("early\n|d rew|", [f"{v['max_early_reward_delta']:.2g}" for v in verdicts]),
               Col("|d rew|", [f"{v['max_reward_delta']:.3f}" for v in verdicts])]
              if "rl_rewards" in report else []),
            Col("verdict", ["[green]agree[/]" if v["agree"] else "[red]disagree[/]" for v in verdicts], justify="left"),
        ], title="agreement: concurrent vs sequential",
           caption=f"early |d loss|: largest relative difference of the training loss over the first "
                   f"{tol['early_steps']} steps (within {tol['early_loss']:g}: rounding); |d loss|, |d exact|: "
                   "worst case over tasks of "
                   f"the final eval loss (relative, within {100 * tol['final_loss']:g}%) and exact match (points, "
                   f"within {100 * tol['exact_match']:g})"
                   + ("; early |d rew|: largest difference of the mean sampled reward over the first "
                      f"{tol['early_steps']} RL steps (must be 0: the same samples); |d rew|: final greedy reward, "
                      f"worst task (within {tol['reward']:g})" if "rl_rewards" in report else "")
                   + "; see docs/benchmark.md: training amplifies rounding")
        tables.append(agree)
    return tables


def reward_table(report: dict[str, Any]) -> Table:
    """Each mode's RL learning: mean sampled reward over the first and last 5 RL steps, and the final greedy reward."""
    names = list(report["rl_rewards"])

    def window(name: str, part: slice) -> str:
        values = [r for rewards in report["rl_rewards"][name].values() for r in rewards[part]]
        return f"{sum(values) / len(values):.3f}" if values else "-"

    finals = [report["final_reward"].get(name) for name in names]
    return fitted_table([
        Col("mode", [escape(name) for name in names], justify="left"),
        Col("sampled reward\nfirst 5 steps", [window(name, slice(0, 5)) for name in names]),
        Col("sampled reward\nlast 5 steps", [window(name, slice(-5, None)) for name in names]),
        Col("final greedy\nreward", ["-" if f is None else f"{f:.3f}" for f in finals]),
    ], title="RL learning, mean over adapters",
       caption="sampled reward: mean reward of the completions each RL step trained on (bench.json: rl_rewards, "
               "per step and adapter); final greedy reward: the task reward of greedy generations after the last "
               "task, mean over tasks")


def fusion_matrix_table(report: dict[str, Any], width: int | None = None) -> Table:
    """`mlora bench --fusion-matrix`: each cell's fused step against the union batch on mlora's engine and in PEFT."""
    budget = width_budget(width)
    cells = report["cells"]
    columns = [
        Col("threads", [str(c["threads"]) for c in cells]),
        Col("targets", [c["targets"] for c in cells], justify="left"),
        Col("ranks", [c["ranks"] for c in cells], justify="left"),
        Col("dropout", [f"{c['dropout']:g}" for c in cells]),
        Col("fused\nms", [f"{c['fused_ms']:.0f}" for c in cells]),
        Col("union\nms", [f"{c['union_ms']:.0f}" for c in cells]),
        Col("PEFT\nunion ms", [f"{c['peft_union_ms']:.0f}" for c in cells], drop=2),
        Col("effi-\nciency", [f"{c['efficiency']:.2f}" for c in cells]),
        Col("vs\nPEFT", [f"{c['vs_peft']:.2f}" for c in cells], drop=3),
        Col("dropout cost\n(PEFT)", [f"{c['dropout_cost']:.2f} ({c['peft_dropout_cost']:.2f})"
                                      if "dropout_cost" in c else "-" for c in cells], drop=1),
    ]
    shown, dropped = drop_to_fit(columns, budget)
    legend = ("efficiency: the union batch (every adapter's rows) through one adapter of the mean rank on mlora's "
              "engine / the fused step (1.0: co-training costs what the union batch costs); vs PEFT: that union "
              "batch in plain PEFT / the fused step; dropout cost: the step at that dropout / at 0, for mlora and "
              "(in brackets) PEFT; ratios are medians over alternating pairs (docs/benchmark.md)")
    return fitted_table(shown, title=f"training-step fusion on the CPU, {report['adapters']} adapters x "
                                     f"{report['rows_per_adapter']} rows (ranks {report['ranks']}; equal: all "
                                     f"{report['equal_rank']})",
                        caption=caption_text(legend, *left_out_notes(dropped, budget)))
