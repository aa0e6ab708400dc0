"""Run-folder writes that a crash cannot leave half done: write to a temporary name, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlora_cli.errors import ConfigError, unreadable


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp create private files (0600) and folders (0700); what the run folder holds
# gets the modes any other write would (0666 and 0777 less the umask), so others can read it.
_UMASK = _current_umask()
_FILE_MODE = 0o666 & ~_UMASK
_FOLDER_MODE = 0o777 & ~_UMASK


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a reader sees the old file or the new one)."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Append whole lines; a reader skips a torn last line after a crash."""
    if not records:
        return
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r, default=str) + "\n" for r in records))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` as a whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(_FOLDER_MODE)
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def exclusive_run_folder(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` (an advisory lock the OS drops when this process ends, however it ends).

    A second mlora on the same run folder (`--resume` twice at once) fails with one line rather
    than interleaving its writes with the first one's.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / ".lock").open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError([f"{folder}: in use by another mlora ({holder}); wait for it to end, or stop it "
                               "(its state is saved) and resume then"]) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def read_json(path: Path) -> Any:
    """A JSON file mlora wrote; one line naming the file when it is missing or cannot be parsed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError([unreadable(path, exc)]) from None


def new_folder(path: Path) -> Path:
    """Make `path`, or `path-2`, `path-3`, ... when it is taken (two runs started in the same second)."""
    candidate, suffix = Path(path), 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = Path(path).with_name(f"{Path(path).name}-{suffix}")
