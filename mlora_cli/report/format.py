"""How metrics read in tables and plots: units, direction, short headers."""

from __future__ import annotations

# Metrics stored as fractions and shown in percent (eval.metrics.higher_is_better says which way is better).
PERCENT_METRICS = {"exact_match", "token_accuracy", "pass_at_k", "choice_accuracy"}

# The width every table fits when its caller gives none: a plain terminal, a log file, a pipe.
DEFAULT_WIDTH = 80


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric in PERCENT_METRICS else f"{value:.4f}"


def metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT_METRICS else metric


# Short two-line headers of the per-metric columns, and what the caption says they are.
METRIC_SHORT = {"exact_match": "exact\n%", "token_accuracy": "token\nacc %", "loss": "loss", "reward": "reward",
                "pass_at_k": "pass@k\n%", "choice_accuracy": "choice\nacc %"}
METRIC_LEGEND = {"exact_match": "exact: exact match (greedy generation)", "token_accuracy": "token acc: token accuracy",
                 "reward": "reward: the task's reward of greedy generations (mean)",
                 "pass_at_k": "pass@k: examples solved (full reward) by one of k samples (eval.pass_k)",
                 "choice_accuracy": "choice acc: examples whose most likely choice is the reference"}


def metric_short(metric: str) -> str:
    return METRIC_SHORT.get(metric, metric_header(metric))
