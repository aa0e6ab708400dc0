"""The front end never crashes: random sweep files and overrides end in exit 0 or 2, never a traceback.

Hypothesis writes documents near the real schema (real keys with random values, random keys,
random nesting) and plain random text, and random `key=value` overrides; `mlora validate` and
`mlora run --dry-run` must accept them or reject them with lines, nothing else. Bounded in
examples and time, so it runs in CI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from helpers import mlora
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEYS = ["name", "tasks", "base_model", "model", "seed", "adapter", "train", "eval", "sweep", "devices",
        "max_concurrent", "output_dir", "rank", "lr", "r", "lora_alpha", "target_modules", "steps_per_task",
        "batch_size", "grid", "zip", "list", "seeds", "source", "prompt_field", "metrics", "dtype", "strategy",
        "adapter.rank", "train.lr", "devices[0]", "${adapter.rank}", "min_len", "max_len", "eval_source"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["builtin:copy", "builtin:nope", "jsonl:missing.jsonl", "hf:x", "cuda:0", "cpu:2", "auto",
                     "all-linear", "q_proj", ".*", "${name}", "${nope}", "builtin:tiny", "./no/model", "naive",
                     "ewc", "1e-3", "", "é", "exact_match"]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=5),
), max_leaves=25)
DOCUMENTS = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=8),
    st.fixed_dictionaries({"name": SCALARS, "tasks": VALUES}, optional={k: VALUES for k in KEYS[2:12]}),
)
OVERRIDES = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=10)),
    st.text(max_size=15),
), max_size=3)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
# Python's own header of a traceback: the output may quote the input back (`got 'Traceback'`), so
# only the header of a real traceback counts, and only when the input did not contain it already.
TRACEBACK_HEADER = "Traceback (most recent call last)"


def check(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        sweep = Path(folder) / "sweep.yaml"
        sweep.write_text(text)
        for command in (["validate", sweep, *overrides], ["run", sweep, *overrides, "--dry-run"]):
            result = mlora(*command)
            assert result.exit_code in (0, 2), (command, text, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit), (text, result.exception)
            if not any(TRACEBACK_HEADER in part for part in (text, *overrides)):
                assert TRACEBACK_HEADER not in result.output, (command, text, result.output)


@FUZZ
@given(document=DOCUMENTS, overrides=OVERRIDES)
def test_random_sweep_documents_and_overrides_end_in_exit_0_or_2(
    document: dict[str, Any], overrides: list[str]
) -> None:
    check(yaml.safe_dump(document, allow_unicode=True), [o for o in overrides if not o.startswith("-")])


@FUZZ
@given(text=st.text(max_size=200), overrides=OVERRIDES)
def test_random_text_ends_in_exit_0_or_2(text: str, overrides: list[str]) -> None:
    check(text, [o for o in overrides if not o.startswith("-")])
