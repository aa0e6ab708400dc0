"""From a plan to a run folder: the launcher (processes, devices, Ray), the worker loop, resume state."""
