"""Stopping a worker between steps: Ctrl-C and SIGTERM set a flag the training loop reads (`run.worker`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from mlora_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers and `timeout` send

_sigterm_while_starting = 0  # a SIGTERM seen before the loop took over (defer_sigterm_while_starting)


def defer_sigterm_while_starting() -> None:
    """In a worker process, until the training loop takes over, SIGTERM is remembered, not raised.

    A worker spends seconds importing torch and transformers and loading the base. An exception
    raised from a signal handler there can land in a finalizer (`__del__`), where Python prints it
    with a traceback and carries on, the stop lost. The loop reads the remembered stop first thing
    (`ctrl_c_between_steps`) and leaves as it does between steps, with nothing started to save.
    """

    def remember(signum: int, frame: Any) -> None:
        global _sigterm_while_starting
        _sigterm_while_starting = signum

    signal.signal(signal.SIGTERM, remember)


@contextlib.contextmanager
def ctrl_c_between_steps(worker: Any) -> Iterator[None]:
    """Ctrl-C or SIGTERM only sets `worker.interrupted`, which the loop checks between steps.

    A KeyboardInterrupt raised mid-step (weights stepped, counters not; a task evaluated,
    its strategy bookkeeping not done; metrics not yet written) would be saved as a state
    that resumes wrong. A second Ctrl-C stops at once, without saving; a repeated SIGTERM
    (a scheduler may send it to every process, and the launcher forwards it too) does not.
    """

    def on_stop(signum: int, frame: Any) -> None:
        if worker.interrupted and signum == signal.SIGINT:
            raise Interrupted(signum)
        worker.interrupted = worker.interrupted or signum

    in_main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {signum: signal.signal(signum, on_stop) for signum in STOP_SIGNALS} if in_main_thread else {}
    # Read once the handlers moved, so that no SIGTERM falls between the two.
    worker.interrupted = worker.interrupted or _sigterm_while_starting
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
