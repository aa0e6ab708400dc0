"""The sweep schema's field helpers: `doc` (a field's one-line help and range check) and the range checks.

A check takes the field's value and returns None, or what is wrong with it (`spec.convert.build` prefixes the key).
Torch-free.
"""

from __future__ import annotations

import re
from typing import Any


def doc(help_text: str, check: Any = None) -> dict[str, Any]:
    return {"help": help_text, "check": check}


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def below_one(value: float) -> str | None:  # a dropout probability, an AdamW beta
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def non_empty(value: Any) -> str | None:
    return None if len(value) > 0 else "must not be empty"


def at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be >= 2 (a group's advantage compares its completions)"


def probability(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def optional_positive(value: Any) -> str | None:
    return None if value is None else positive(value)


REGEX_CHARACTERS = re.compile(r"[\\^$*+?()\[\]{}|]")


def choice_list(value: tuple[Any, ...] | None) -> str | None:
    """Fixed `choices`: distinct non-empty texts (numbers read as text); YAML's unquoted yes/no refused with a hint."""
    if value is not None and not value:
        return "must not be empty (list the answers, e.g. [positive, negative])"
    if any(isinstance(item, bool) for item in value or ()):
        return 'YAML reads unquoted yes/no/on/off/true/false as true/false; quote each choice, e.g. ["yes", "no"]'
    texts = [item for item in value or () if isinstance(item, (str, int, float))]
    if len(texts) < len(value or ()) or "" in texts:
        return "expected a list of non-empty strings"
    duplicates = sorted({str(t) for t in texts if [str(u) for u in texts].count(str(t)) > 1})
    return f"duplicate choice {duplicates[0]!r}" if duplicates else None


def module_names(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must not be empty"
    regexes = [name for name in value if REGEX_CHARACTERS.search(name)]
    if regexes:
        # PEFT reads a string target as a regex; mlora matches names by suffix only.
        return f"'{regexes[0]}' looks like a regex; list the module names instead (suffix match, or all-linear)"
    return None


def reduction(value: int) -> str | None:
    return None if value >= 2 else "must be >= 2 (each rung keeps 1/reduction_factor of the trials)"


def no_repeats(value: tuple[str, ...]) -> str | None:
    repeated = sorted({v for v in value if value.count(v) > 1})
    return f"'{repeated[0]}' is listed twice" if repeated else None


def optional_non_empty(value: str | None) -> str | None:
    return None if value is None else non_empty(value)
