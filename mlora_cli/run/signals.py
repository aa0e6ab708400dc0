"""Stopping a worker between steps: Ctrl-C and SIGTERM set a flag the training loop reads (`run.worker`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from mlora_cli.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers and `timeout` send


@contextlib.contextmanager
def ctrl_c_between_steps(worker: Any) -> Iterator[None]:
    """Ctrl-C or SIGTERM only sets `worker.interrupted`, which the loop checks between steps.

    A KeyboardInterrupt raised mid-step (weights stepped, counters not; a task evaluated,
    its strategy bookkeeping not done; metrics not yet written) would be saved as a state
    that resumes wrong. A second Ctrl-C stops at once, without saving; a repeated SIGTERM
    (a scheduler may send it to every process, and the launcher forwards it too) does not.
    """
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def on_stop(signum: int, frame: Any) -> None:
        if worker.interrupted and signum == signal.SIGINT:
            raise Interrupted(signum)
        worker.interrupted = worker.interrupted or signum

    previous = {signum: signal.signal(signum, on_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
