"""Run-folder writes: atomic, and readable by others as any other file would be (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mlora_cli.files import atomic_directory, write_json, write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_and_folders_get_the_usual_modes(tmp_path: Path) -> None:
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"x": 1})
    with atomic_directory(tmp_path / "adapter") as folder:
        (folder / "weights").write_text("w")
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o777 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "adapter", "b.json"]  # no temporary names left
