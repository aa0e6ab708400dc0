"""builtin:tiny: the pretrained weights shipped in the package, their check, and the script that makes them."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MINIMAL_SWEEP, REPO, mlora, write_sweep

from mlora_cli.errors import ConfigError
from mlora_cli.model.base import build_builtin, load_base
from mlora_cli.spec import models as weights_module
from mlora_cli.spec.models import PRETRAINED_WEIGHTS, WEIGHTS_DIR


def test_shipped_weights_match_their_recorded_sha256() -> None:
    file_name, expected = PRETRAINED_WEIGHTS["builtin:tiny"]
    path = WEIGHTS_DIR / file_name
    assert path.stat().st_size < 16 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_tiny_is_pretrained_and_tiny_random_is_not() -> None:
    pretrained, _ = build_builtin("builtin:tiny")
    random_init, _ = build_builtin("builtin:tiny-random")
    assert pretrained.config.to_dict() == random_init.config.to_dict()
    weights = dict(pretrained.named_parameters())
    assert all(not torch.equal(weights[n], p) for n, p in random_init.named_parameters())
    # The pretrained model writes English from the prose it read: it knows "the" after "of ".
    base = load_base("builtin:tiny")
    ids = base.tokenizer("the value of th", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = base.model(input_ids=ids).logits[0, -1].argmax()
    assert base.tokenizer.decode([int(next_id)]) == "e"


def test_a_corrupt_weights_file_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file_name, _ = PRETRAINED_WEIGHTS["builtin:tiny"]
    data = bytearray((WEIGHTS_DIR / file_name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / file_name).write_bytes(bytes(data))
    monkeypatch.setattr(weights_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ConfigError) as error:
        build_builtin("builtin:tiny")
    [problem] = error.value.problems
    assert problem.startswith(f"base_model: builtin:tiny: weights file {tmp_path / file_name} is corrupt")
    assert "scripts/pretrain_tiny.py" in problem
    (tmp_path / file_name).unlink()
    with pytest.raises(ConfigError, match="cannot read its weights"):
        build_builtin("builtin:tiny")


def test_a_corrupt_weights_file_stops_validate_and_run_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_name, _ = PRETRAINED_WEIGHTS["builtin:tiny"]
    (tmp_path / file_name).write_bytes(b"not a safetensors file")
    monkeypatch.setattr(weights_module, "WEIGHTS_DIR", tmp_path)
    sweep = write_sweep(tmp_path, MINIMAL_SWEEP + f"base_model: builtin:tiny\noutput_dir: {tmp_path / 'runs'}\n")
    for command in (["validate", sweep], ["run", sweep, "--no-plots"]):
        result = mlora(*command)
        assert result.exit_code == 2, result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith(f"base_model: builtin:tiny: weights file {tmp_path / file_name} is corrupt")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_pretraining_script_is_deterministic(tmp_path: Path) -> None:
    """Two short runs of scripts/pretrain_tiny.py with the same seed write byte-identical files."""
    digests = []
    for run in range(2):
        out = tmp_path / f"tiny-{run}.safetensors"
        subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_tiny.py"), "--steps", "2", "--batch", "4",
                        "--length", "32", "--out", str(out)], check=True, capture_output=True, timeout=300)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_validate_knows_the_builtin_names(tmp_path: Path) -> None:
    result = mlora("validate", write_sweep(tmp_path, MINIMAL_SWEEP + "base_model: builtin:tiny-randm\n"))
    assert result.exit_code == 2
    assert "did you mean 'builtin:tiny-random'" in result.output
