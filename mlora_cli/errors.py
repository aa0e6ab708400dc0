"""The one user-error type: every problem a user can fix, as lines `key.path: message`.

It crosses process boundaries (a worker, a Ray actor) and is printed by the CLI as one line
per problem with exit code 2. It pickles as its list of problems, not as the joined text.
"""

from __future__ import annotations


class ConfigError(Exception):
    """One or more problems in user input, each a line `key.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Exception pickles as cls(*self.args), and args holds the joined text: rebuild from the list.
        return (ConfigError, (self.problems,))
