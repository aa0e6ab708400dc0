"""mlora: co-train a sweep of LoRA adapters over one shared frozen base model."""

import time

__version__ = "0.1.0"

# When this process started mlora (imports included): experiment times count from here; a worker process counts
# from its launcher's start instead (`count_from`).
PROCESS_START = time.perf_counter()


def started_at() -> float:
    """PROCESS_START on the wall clock (seconds since the epoch): what a worker process is told to count from."""
    return time.time() - (time.perf_counter() - PROCESS_START)


def count_from(wall_start: float) -> None:
    """This (worker) process counts experiment times from `wall_start`, its launcher's `started_at()`: an adapter's
    `finished_after_s` then includes what the launcher did before the worker started (imports, task data, the
    process start), as it does when the launcher trains the adapters itself."""
    global PROCESS_START
    PROCESS_START = time.perf_counter() - (time.time() - wall_start)
