"""Other spellings of sweep keys people reach for, rewritten to mlora's before validation. Torch-free.

- dotted keys in a grid, zip or list entry (`adapter.rank: [4, 8]`) mean the nested ones;
- `train.lr` means `adapter.lr`;
- PEFT's `LoraConfig` names `r`, `lora_alpha`, `lora_dropout` mean `rank`, `alpha`, `dropout`, wherever an
  adapter key is written (both spellings of one key in a file are an error) and in command-line overrides, where
  either spelling replaces the key whichever spelling the file used.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mlora_cli.errors import ConfigError


def nest_dotted(mapping: Any) -> Any:
    """`{"adapter.rank": [4]}` -> `{"adapter": {"rank": [4]}}`, so both spellings merge."""
    if not isinstance(mapping, dict):
        return mapping
    nested: dict[str, Any] = {}
    for key, value in mapping.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            value = nest_dotted(value)
            if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
                node[parts[-1]].update(value)
            else:
                node[parts[-1]] = value
    return nested


# PEFT's `LoraConfig` spellings of adapter keys, accepted wherever an adapter key is written.
PEFT_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def _rename_peft_keys(adapter: dict[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    renamed = dict(adapter)
    for alias, key in PEFT_ALIASES.items():
        if alias in renamed:
            if key in renamed:
                problems.append(f"{path}.{alias}: PEFT's name for {path}.{key}, which is also set; keep one")
            renamed[key] = renamed.pop(alias)
    return renamed


def apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Other spellings people reach for, rewritten to mlora's keys before validation.

    `train.lr` is accepted for `adapter.lr` (it wins when both are set), and PEFT's `r`,
    `lora_alpha`, `lora_dropout` for `rank`, `alpha`, `dropout`: in the adapter section and
    in the sweep's grid, zip and list.
    """
    problems: list[str] = []
    train, adapter = data.get("train"), data.get("adapter", {})
    if isinstance(train, dict) and "lr" in train and isinstance(adapter, dict):
        data["adapter"] = {**adapter, "lr": train["lr"]}
        data["train"] = {k: v for k, v in train.items() if k != "lr"}
    if isinstance(data.get("adapter"), dict):
        data["adapter"] = _rename_peft_keys(data["adapter"], "adapter", problems)
    sweep = data.get("sweep")
    if isinstance(sweep, dict):
        for axis in ("grid", "zip"):
            section = sweep.get(axis)
            if isinstance(section, dict) and isinstance(section.get("adapter"), dict):
                section["adapter"] = _rename_peft_keys(section["adapter"], f"sweep.{axis}.adapter", problems)
        entries = sweep.get("list")
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                entries[i] = nest_dotted(entry)
                if isinstance(entries[i].get("adapter"), dict):
                    entries[i]["adapter"] = _rename_peft_keys(entries[i]["adapter"], f"sweep.list[{i}].adapter",
                                                              problems)
    if problems:
        raise ConfigError(problems)
    return data


def canonical_override(conf: Any, item: str) -> str:
    """A `key=value` override with an adapter key in PEFT's spelling rewritten to mlora's (`adapter.r=4` ->
    `adapter.rank=4`), after dropping from `conf` the key's other spelling under that adapter section, so the
    override replaces it (`sweep.grid.adapter.r=[4, 8]` over a file's `adapter.rank: [...]` grid) instead of
    standing next to it."""
    key, _, value = item.partition("=")
    section, _, name = key.strip().rpartition(".")
    if section.rpartition(".")[2] != "adapter" or name not in {*PEFT_ALIASES, *PEFT_ALIASES.values()}:
        return item
    canonical = PEFT_ALIASES.get(name, name)
    node = OmegaConf.select(conf, section, default=None)
    if isinstance(node, DictConfig):
        for alias in (alias for alias, key in PEFT_ALIASES.items() if key == canonical):
            node.pop(alias, None)  # the override, merged in mlora's spelling, replaces the canonical key itself
    return f"{section}.{canonical}={value}"
