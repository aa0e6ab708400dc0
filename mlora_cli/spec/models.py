"""The builtin models' names, and the pretrained weights shipped in the package with their check.

Torch-free: `mlora validate` runs the check.

`builtin:tiny` is made by `scripts/pretrain_tiny.py`; its SHA-256 is recorded here and checked
before every load, so a corrupt, truncated or stale file is one clear line, not a silently
different model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "model" / "weights"
# model.base.BUILTIN_SPECS (built in code) plus SmolLM2, converted from a GGUF file.
BUILTIN_MODELS = ("builtin:tiny", "builtin:tiny-random", "builtin:micro", "builtin:small", "builtin:smollm2-135m")
PRETRAIN_SCRIPT = "scripts/pretrain_tiny.py"
# Pretrained builtin -> (file in WEIGHTS_DIR, its SHA-256).
PRETRAINED_WEIGHTS: dict[str, tuple[str, str]] = {
    "builtin:tiny": ("tiny.safetensors", "b3734ce797d3459c26228a29f9650cf2af9ce51204ccb510ab3b0728144cb58c"),
}


def read_checked(name: str, folder: Path | None = None) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) when its SHA-256 is the recorded one, else (None, one line naming the file
    and the fix)."""
    file_name, expected = PRETRAINED_WEIGHTS[name]
    path = (folder or WEIGHTS_DIR) / file_name
    fix = f"reinstall mlora-sweep, or rebuild the file with python {PRETRAIN_SCRIPT}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"base_model: {name}: cannot read its weights {path}: {exc.strerror or exc}; {fix}"
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        return None, (f"base_model: {name}: weights file {path} is corrupt or not the shipped one "
                      f"(SHA-256 {actual[:12]}..., expected {expected[:12]}...); {fix}")
    return data, None
