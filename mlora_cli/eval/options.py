"""`mlora eval`'s options checked together, one line per problem, before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

from mlora_cli.spec.plan import missing_cuda_devices, visible_cuda_devices


def option_problems(run_dir: Path | None, tasks: Path | None, base: str | None, adapters: list[Path], device: str,
                    harness_tasks: list[str] | None, harness_include: Path | None,
                    harness_every_task: bool) -> list[str]:
    problems = []
    if run_dir is None and not adapters:
        problems.append("give a RUN_DIR, or --base MODEL --adapter PATH ... --tasks FILE")
    if run_dir is not None and (adapters or base):
        problems.append("--base/--adapter evaluate adapters without a run folder; drop RUN_DIR or them")
    if adapters and (base is None or (tasks is None and harness_tasks is None)):
        problems.append("--adapter needs --base MODEL and --tasks FILE (or --harness-tasks)")
    if harness_include is not None and not harness_include.is_dir():
        problems.append(f"--harness-include {harness_include}: no such folder")
    if harness_include is not None and harness_tasks is None:
        problems.append("--harness-include needs --harness-tasks")
    if harness_every_task and (harness_tasks is None or run_dir is None):
        problems.append("--harness-every-task needs RUN_DIR and --harness-tasks")
    if run_dir is not None and not run_dir.is_dir():
        problems.append(f"{run_dir}: no such run folder")
    for path in adapters:
        if not (path / "adapter_config.json").is_file():
            problems.append(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
        problems.append(f"--device: expected cpu or cuda:N, got '{device}'")
    else:
        visible = visible_cuda_devices() if device.startswith("cuda") else 0
        problems += [line.replace("devices", "--device", 1).replace("use devices: auto, or cpu", "use --device cpu")
                     for line in missing_cuda_devices(device, visible)]
    return problems
