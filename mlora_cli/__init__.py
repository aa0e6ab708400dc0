"""mlora: co-train a sweep of LoRA adapters over one shared frozen base model."""

import time

__version__ = "0.1.0"

# When this process started mlora (imports included): experiment times count from here.
PROCESS_START = time.perf_counter()
