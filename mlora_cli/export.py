"""`mlora export RUN_DIR`: a run's adapters made ready to share and serve.

Every export writes a model card (`README.md`) into each selected adapter folder `RUN/adapters/NAME/`: its
config, base model, task sequence, final scores and CL metrics, and how to load it. On request it also writes
each adapter merged into the base (`merge_and_unload`, a plain transformers folder), the base itself as a
transformers folder (builtin bases are built in code and on no hub), checks each adapter against vLLM's
multi-LoRA serving rules, and uploads each adapter folder to the Hugging Face hub, one repo per adapter.

It reads only what the run wrote (results.json, sweep.resolved.yaml, base.json, adapters/): a run whose data
files have moved still exports.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlora_cli.contract import BASE_RECORD, RESOLVED_SWEEP, RESULTS, adapter_dir
from mlora_cli.errors import ConfigError
from mlora_cli.files import atomic_directory, read_json, write_text
from mlora_cli.report.format import format_metric, metric_header
from mlora_cli.spec.convert import build, did_you_mean
from mlora_cli.spec.load import read_yaml
from mlora_cli.spec.schema import ModelConfig

CARD = "README.md"


class ExportFailed(Exception):
    """A step that is not the user's mistake failed (an upload); the message is one line."""


@dataclass
class ExportRun:
    """What an export needs from a finished run folder."""

    run_dir: Path
    name: str
    base_model: str
    model: ModelConfig
    tasks: list[dict[str, Any]]  # as resolved: name, source, objective, steps, ...
    results: dict[str, Any]  # results.json
    base_info: dict[str, Any] = field(default_factory=dict)  # base.json ({} if the run never loaded the base)

    def adapter(self, name: str) -> dict[str, Any]:
        return self.results["adapters"][name]

    def saved_config(self, name: str) -> dict[str, Any]:
        """The adapter's PEFT `adapter_config.json` (its `r` is O-LoRA's grown rank)."""
        return read_json(adapter_dir(self.run_dir, name) / "adapter_config.json")

    @property
    def builtin(self) -> bool:  # built in code, on no hub
        return self.base_model.startswith("builtin:")


def load_run(run_dir: Path) -> ExportRun:
    if not run_dir.is_dir():
        raise ConfigError([f"{run_dir}: no such run folder"])
    if not (run_dir / RESULTS).is_file():
        if not (run_dir / RESOLVED_SWEEP).is_file():  # nothing of a run here
            raise ConfigError([f"{run_dir}: not a run folder (no {RESOLVED_SWEEP})"])
        raise ConfigError([f"{run_dir}: no {RESULTS}, not a finished run (continue it: mlora run --resume {run_dir})"])
    resolved = read_yaml(run_dir / RESOLVED_SWEEP)
    errors: list[str] = []
    model = build(ModelConfig, resolved.get("model") or {}, "model", errors)
    if errors:
        raise ConfigError([f"{run_dir / RESOLVED_SWEEP}: {problem}" for problem in errors])
    base_info = read_json(run_dir / BASE_RECORD) if (run_dir / BASE_RECORD).is_file() else {}
    return ExportRun(run_dir=run_dir, name=str(resolved.get("name", run_dir.name)),
                     base_model=str(resolved["base_model"]), model=model, tasks=list(resolved.get("tasks") or []),
                     results=read_json(run_dir / RESULTS), base_info=base_info)


def select(run: ExportRun, names: list[str]) -> list[str]:
    """The adapters to export: `names`, or every adapter with a final checkpoint; one line per unknown name."""
    known = list(run.results["adapters"])
    saved = [n for n in known if (adapter_dir(run.run_dir, n) / "adapter_config.json").is_file()]
    problems = []
    for name in names:
        if name not in known:
            problems.append(f"{name}: no such adapter in {run.run_dir}{did_you_mean(name, known)}")
        elif name not in saved:
            problems.append(f"{name}: no final adapter in {run.run_dir / 'adapters'} "
                            f"(status {run.adapter(name)['status']})")
    if problems:
        raise ConfigError(problems)
    if not names and not saved:
        raise ConfigError([f"{run.run_dir}: no final adapter under adapters/ (every adapter failed)"])
    return list(dict.fromkeys(names)) if names else saved


def output_problems(paths: list[Path]) -> list[str]:
    """Folders an export would replace as a whole: each must be absent, empty, or a model folder (config.json)."""
    return [f"{path}: exists and is not a model folder (no config.json); give a new folder"
            for path in paths if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file()]


# -- the model card ----------------------------------------------------------------------------

# The settings of each continual-learning strategy that a card lists (docs/strategies.md).
STRATEGY_KEYS = {"replay": ("buffer_size", "replay_ratio"), "l2": ("l2_lambda",),
                 "ewc": ("ewc_lambda", "ewc_gamma", "fisher_samples"), "lwf": ("lwf_lambda", "lwf_temperature"),
                 "olora": ("olora_lambda1", "olora_lambda2")}
CL_COLUMNS = (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "forgetting"),
              ("learning_acc", "learning acc"), ("min_acc", "min-ACC"), ("largest_dip", "largest dip"))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def config_rows(run: ExportRun, name: str) -> list[list[str]]:
    entry, saved = run.adapter(name), run.saved_config(name)
    adapter, train = entry["config"]["adapter"], entry["config"]["train"]
    rank = str(adapter["rank"])
    if saved["r"] != adapter["rank"]:  # O-LoRA stacks one rank-r LoRA per task into one LoRA of the total rank
        rank += f" per task; saved as one LoRA of rank {saved['r']} (lora_alpha {saved['lora_alpha']:g})"
    targets = saved["target_modules"]
    scale = adapter["alpha"] / adapter["rank"]
    rows = [["rank", rank], ["alpha", f"{adapter['alpha']:g} (scale alpha / rank = {scale:g})"],
            ["target modules", ", ".join(f"`{t}`" for t in ([targets] if isinstance(targets, str) else targets))],
            ["dropout", f"{adapter['dropout']:g}"],
            ["learning rate", f"{adapter['lr']:g} (AdamW, weight decay {adapter['weight_decay']:g}, "
                              f"{train['schedule']} schedule, {train['warmup_steps']} warmup steps)"],
            ["strategy", adapter["strategy"] + "".join(f", {k} {adapter[k]:g}"
                                                       for k in STRATEGY_KEYS.get(adapter["strategy"], ()))],
            ["batch size", f"{train['batch_size']} rows, up to {train['max_seq_len']} tokens"],
            ["seed", str(entry["seed"])]]
    if adapter.get("init_from"):
        rows.append(["warm start", f"`{adapter['init_from']}`"])
    if entry.get("varied"):
        rows.append(["set by the sweep", ", ".join(f"`{k}={v}`" for k, v in entry["varied"].items())])
    rl_tasks = [t["name"] for t in run.tasks if t.get("objective") == "grpo"]
    if rl_tasks:  # GRPO-family RL settings matter only where a task trains with them
        rows.append(["RL tasks", ", ".join(rl_tasks)])
        rows += [[f"rl.{key}", str(value)] for key, value in train["rl"].items()]
    return rows


def task_rows(run: ExportRun, name: str) -> list[list[str]]:
    default = run.adapter(name)["config"]["train"]["steps_per_task"]
    return [[str(i), t["name"], f"`{t['source']}`", t.get("objective", "sft"), str(t.get("steps") or default)]
            for i, t in enumerate(run.tasks, 1)]


def _score(metric: str, value: float | None, difference: bool = False) -> str:
    if value is None:
        return "-"
    text = format_metric(metric, value)
    return f"{'+' if value > 0 else ''}{text}" if difference else text


def score_lines(run: ExportRun, name: str) -> list[str]:
    entry = run.adapter(name)
    final = entry.get("final") or {}
    metrics = sorted({m for scores in final.values() for m in scores})
    lines = ["## Final scores", "", "On each task's eval split after the last task (percent for accuracies).", ""]
    rows = [[task, *(_score(m, final[task].get(m)) for m in metrics)] for task in final]
    rows.append(["**mean**", *(_score(m, entry.get("final_mean", {}).get(m)) for m in metrics)])
    lines += _table(["task", *(metric_header(m) for m in metrics)], rows)
    cl = entry.get("cl_metrics") or {}
    if cl:
        columns = [(key, title) for key, title in CL_COLUMNS if any(key in values for values in cl.values())]
        lines += ["## Continual-learning metrics", "",
                  "From the accuracy matrix R (row i: every task after training task i; row 0: the base alone). ACC "
                  "and learning accuracy in the metric's unit (percent for accuracies), the others as differences "
                  "(percentage points); BWT > 0 is good, forgetting > 0 is bad; for loss they are computed on -loss. "
                  "Definitions: mlora's docs/outputs.md, section Continual-learning metrics.", ""]
        lines += _table(["metric", *(title for _, title in columns)],
                        [[metric, *(_score(metric, values.get(key), key not in ("acc", "learning_acc", "min_acc"))
                                    for key, _ in columns)] for metric, values in sorted(cl.items())])
    return lines


def base_reference(run: ExportRun, base_out: Path | None) -> str:
    """What `from_pretrained` takes for the base: a hub id or folder, or `--base-out`'s folder for a builtin."""
    if base_out is not None:
        return str(base_out.resolve())
    return "BASE_DIR" if run.builtin else run.base_model


def model_card(run: ExportRun, name: str, base_out: Path | None = None, hub_repo: str | None = None,
               merged: Path | None = None) -> str:
    """The card of one adapter, Markdown with the hub's YAML header."""
    entry, saved = run.adapter(name), run.saved_config(name)
    hub_base = not run.builtin and not Path(run.base_model).exists()
    base = base_reference(run, base_out)
    where = hub_repo or str(adapter_dir(run.run_dir, name).resolve())
    lines = ["---", "library_name: peft", *([f"base_model: {run.base_model}"] if hub_base else []),
             "tags: [lora, peft, mlora, continual-learning]", "---", "", f"# {name}", "",
             f"A LoRA adapter for `{run.base_model}`, trained by mlora (package `mlora-sweep`) in the "
             f"run `{run.name}` (`{run.run_dir.resolve()}`) on {len(run.tasks)} task"
             f"{'s' if len(run.tasks) != 1 else ''} in order, co-trained with the run's other adapters over one "
             f"frozen base. Status: {entry['status']}, {entry['steps']} steps.", "", "## Configuration", ""]
    lines += _table(["setting", "value"], config_rows(run, name))
    lines += ["## Base model", ""]
    if run.builtin:
        info = run.base_info
        lines += [f"`{run.base_model}` is built in code by mlora ({info.get('model_class', 'a causal LM')}, "
                  f"{info.get('parameters', 0):,} parameters, weights SHA-256 `{info.get('weights_sha256', '?')}`); "
                  "it is on no hub. `mlora export RUN_DIR --base-out BASE_DIR` writes it as a transformers folder "
                  "(model and tokenizer), which `BASE_DIR` below stands for"
                  + (f": it was written to `{base}`." if base_out is not None else "."), ""]
    else:
        revision = run.base_info.get("revision")
        lines += [f"`{run.base_model}`" + (f" (revision `{revision}`)" if revision else "") + ".", ""]
    lines += ["## Task sequence", ""] + _table(["#", "task", "source", "objective", "steps"], task_rows(run, name))
    lines += score_lines(run, name)
    lines += ["## Load it with PEFT", "", "```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({base!r})",
              f"model = PeftModel.from_pretrained(base, {where!r})", "```", ""]
    if run.builtin:
        lines += ["With mlora installed, the builtin base loads without a folder: "
                  f"`from mlora_cli.model.base import load_base; base = load_base({run.base_model!r}).model`.", ""]
    if merged is not None:
        lines += ["A merged copy (the LoRA folded into the base weights, no PEFT needed) is at "
                  f"`{merged.resolve()}`: `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` "
                  "load it.", ""]
    rank = vllm_rank_for(saved["r"]) or saved["r"]
    lines += ["## Serve it with vLLM", "", "```bash",
              f"vllm serve {shlex.quote(base)} --enable-lora --max-lora-rank {rank} "
              f"--lora-modules {shlex.quote(f'{name}={where}')}", "```", "",
              f"`mlora export {run.run_dir} {name} --check-vllm` checks it against vLLM {VLLM_VERSION}'s rules.", ""]
    return "\n".join(lines)


def write_cards(run: ExportRun, names: list[str], base_out: Path | None = None, hub_repo: str | None = None,
                merge_out: Path | None = None) -> list[Path]:
    for name in names:
        write_text(adapter_dir(run.run_dir, name) / CARD, model_card(
            run, name, base_out, hub_repo and hub_repo_id(hub_repo, name), merge_out / name if merge_out else None))
    return [adapter_dir(run.run_dir, name) / CARD for name in names]


# -- merged models and the base as transformers folders -----------------------------------------


def _load_base(run: ExportRun) -> Any:
    from mlora_cli.model.base import load_base

    # Checkpointing and autocast shape training only; the weights and dtype are what a folder keeps.
    return load_base(run.base_model, "cpu", dataclasses.replace(run.model, gradient_checkpointing=False))


def write_base(run: ExportRun, out: Path) -> Path:
    """The base model and its tokenizer as a transformers folder (save_pretrained), written whole or not at all."""
    base = _load_base(run)
    with atomic_directory(out) as tmp:
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
    return out


def write_merged(run: ExportRun, names: list[str], out: Path, base_out: Path | None = None) -> list[Path]:
    """Each adapter folded into a fresh copy of the base (PEFT's merge_and_unload), saved as `out/NAME/`."""
    import copy

    from peft import PeftModel

    base = _load_base(run)
    written = []
    for name in names:
        model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(adapter_dir(run.run_dir, name)))
        merged = model.merge_and_unload()
        with atomic_directory(out / name) as tmp:
            merged.save_pretrained(tmp)
            base.tokenizer.save_pretrained(tmp)
            card = model_card(run, name, base_out, merged=out / name)
            (tmp / CARD).write_text(card.replace("library_name: peft", "library_name: transformers", 1))
        written.append(out / name)
    return written


# -- serving with vLLM -------------------------------------------------------------------------

# The rules vLLM 0.33.0 applies when it loads a LoRA adapter for multi-LoRA serving (vllm/config/lora.py,
# vllm/lora/peft_helper.py `validate_legal`, vllm/lora/utils.py, vllm/lora/lora_model.py).
VLLM_VERSION = "0.33.0"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values --max-lora-rank accepts
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Architectures whose vLLM model class does not implement SupportsLoRA: no adapter on them can be served.
VLLM_NO_LORA = frozenset({"GPT2LMHeadModel", "GPTJForCausalLM", "BloomForCausalLM", "FalconForCausalLM",
                          "StableLmForCausalLM", "DbrxForCausalLM", "OrionForCausalLM", "MambaForCausalLM",
                          "Mamba2ForCausalLM", "FalconMambaForCausalLM", "Gemma3nForCausalLM"})
# Architectures whose vLLM class lists lm_head and embed_tokens in `embedding_modules`: only there do LoRAs on
# them load (e.g. Qwen2 and Gemma do not list them). The common ones; others are flagged.
VLLM_EMBEDDING_LORA = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM",
                                 "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GraniteForCausalLM"})
# Any linear layer of vLLM's own implementation takes a LoRA; these are the decoder projections of the Llama,
# Mistral, Qwen, Gemma and Phi-3 families (q/k/v and gate/up are packed in vLLM, which splits the LoRA for them).
VLLM_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "qkv_proj", "gate_up_proj"})
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits that leave the base as it was


@dataclass
class VllmVerdict:
    name: str
    path: Path
    rank: int  # the saved r (O-LoRA: the total over tasks)
    problems: list[str]  # why vLLM would refuse it; empty: it loads
    notes: list[str]  # what the check could not decide


def vllm_rank_for(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`; None above its largest."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def lora_modules(folder: Path) -> set[str]:
    """The module names (last component) the adapter's weights hold LoRA for: vLLM checks these, not the config."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
    return {key.split(".lora_")[0].rpartition(".")[2] for key in keys if ".lora_" in key}


def vllm_problems(config: dict[str, Any], modules: set[str], architectures: list[str],
                  max_lora_rank: int) -> tuple[list[str], list[str]]:
    """(problems, notes) of one PEFT adapter under vLLM's rules, from its adapter_config.json and weight names."""
    problems, notes = [], []
    rank = max([int(config.get("r", 0)), *(config.get("rank_pattern") or {}).values()])
    if rank > max_lora_rank:
        needed = vllm_rank_for(rank)
        problems.append(f"rank {rank} > --max-lora-rank {max_lora_rank}" + (
            f" (serve it with --max-lora-rank {needed})" if needed else
            f" and > {VLLM_MAX_LORA_RANKS[-1]}, vLLM's largest max_lora_rank"))
    for key, message in (("use_dora", "DoRA (use_dora) is not supported"),
                         ("lora_bias", "LoRA bias (lora_bias) is not supported"),
                         ("layer_replication", "layer_replication is not supported")):
        if config.get(key):
            problems.append(message)
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: adapter bias is not supported")
    if [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        problems.append(f"modules_to_save {config['modules_to_save']}: not supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        problems.append(f"init_lora_weights {init!r} changes the base weights: not supported")
    problems += [f"{arch}: vLLM {VLLM_VERSION} has no LoRA support for this architecture"
                 for arch in architectures if arch in VLLM_NO_LORA]
    for module in sorted(modules):
        if module in ("lm_head", "embed_tokens"):
            if not any(arch in VLLM_EMBEDDING_LORA for arch in architectures):
                problems.append(f"{module}: vLLM loads a LoRA on it only for architectures that list it in "
                                f"embedding_modules (Llama, Mistral, Phi-3, Qwen3 do); not {', '.join(architectures)}")
        elif module not in VLLM_PROJECTIONS:
            notes.append(f"{module}: not a projection this check knows; vLLM takes it if its implementation of "
                         f"{', '.join(architectures) or 'the base'} has it as a linear layer")
    return problems, notes


def vllm_check(run: ExportRun, names: list[str], max_lora_rank: int) -> list[VllmVerdict]:
    verdicts = []
    for name in names:
        folder = adapter_dir(run.run_dir, name)
        config = run.saved_config(name)
        architectures = list(run.base_info.get("config", {}).get("architectures") or [])
        problems, notes = vllm_problems(config, lora_modules(folder), architectures, max_lora_rank)
        verdicts.append(VllmVerdict(name, folder.resolve(), int(config["r"]), problems, notes))
    return verdicts


def vllm_serve_command(base: str, verdicts: list[VllmVerdict]) -> str | None:
    """`vllm serve` with every adapter that loads, at the smallest --max-lora-rank that holds them; None: none."""
    ready = [v for v in verdicts if not v.problems]
    if not ready:
        return None
    rank = vllm_rank_for(max(v.rank for v in ready))
    modules = " ".join(shlex.quote(f"{v.name}={v.path}") for v in ready)
    return (f"vllm serve {shlex.quote(base)} --enable-lora --max-lora-rank {rank} --max-loras {len(ready)} "
            f"--lora-modules {modules}")


# -- the Hugging Face hub ------------------------------------------------------------------------


def hub_repo_id(repo: str, name: str) -> str:
    """One model repo per adapter: `REPO-NAME` (the hub shows each repo's README.md as its card)."""
    return f"{repo}-{name}"


def hub_problems(repo: str, names: list[str]) -> list[str]:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problems = []
    for name in names:
        try:
            validate_repo_id(hub_repo_id(repo, name))
        except HFValidationError as exc:
            problems.append(f"--push-to-hub: {hub_repo_id(repo, name)}: {str(exc).splitlines()[0]}")
    return problems


def push_to_hub(run: ExportRun, names: list[str], repo: str) -> list[str]:
    """Upload each adapter folder (weights, config, card) to its own model repo, made if missing; the repo ids."""
    from huggingface_hub import HfApi

    api = HfApi()
    pushed = []
    for name in names:
        repo_id = hub_repo_id(repo, name)
        try:
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(adapter_dir(run.run_dir, name)),
                              commit_message=f"mlora export: adapter {name} of run {run.name}")
        except Exception as exc:  # no token, offline, no permission: whatever the hub says, as one line
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportFailed(f"--push-to-hub: {repo_id}: {type(exc).__name__}: {reason}") from exc
        pushed.append(repo_id)
    return pushed
