"""The one user-error type: every problem a user can fix, as lines `key.path: message`.

It crosses process boundaries (a worker, a Ray actor) and is printed by the CLI as one line
per problem with exit code 2. It pickles as its list of problems, not as the joined text.
"""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT) or SIGTERM, after saving its training state between steps."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM

    def __reduce__(self) -> tuple[type[Interrupted], tuple[int]]:
        return (Interrupted, (self.signum,))


class ConfigError(Exception):
    """One or more problems in user input, each a line `key.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Exception pickles as cls(*self.args), and args holds the joined text: rebuild from the list.
        return (ConfigError, (self.problems,))


class StorageError(Exception):
    """A write into the run folder failed (a full disk, a lost mount): the run stops, what was saved stays whole."""

    def __init__(self, path: object, error: OSError | str):
        reason = error.strerror or str(error) if isinstance(error, OSError) else str(error)
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self) -> tuple[type[StorageError], tuple[str, str]]:
        return (StorageError, (self.path, self.reason))


def unreadable(path: object, error: BaseException, fix: str = "") -> str:
    """The line for a file mlora wrote but cannot read back (truncated, corrupt, edited by hand)."""
    reason = (str(error).splitlines() or [""])[0][:120]
    return f"{path}: cannot be read ({type(error).__name__}: {reason})" + (f"; {fix}" if fix else "")
