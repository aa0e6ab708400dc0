"""A frozen causal LM with fused LoRA slots: inject, fill a slot, run mixed batches, save.

`MultiLoraModel` replaces every targeted linear layer of a transformers model (`nn.Linear`,
or GPT-2's `Conv1D`) with a `MultiLoraLinear` holding S slots. An adapter occupies one slot
while it trains; when it finishes, the slot can take the next adapter without touching the
base. Adapters are saved in PEFT's format, so `PeftModel.from_pretrained(base, path)` loads
them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from mlora_cli import seeds
from mlora_cli.errors import ConfigError
from mlora_cli.model.base import autocast, enable_checkpointing, is_checkpointing
from mlora_cli.model.multi_lora import MultiLoraLinear
from mlora_cli.model.optim import SlotAdamW
from mlora_cli.model.routing import Routing
from mlora_cli.model.slots import SlotRanks
from mlora_cli.spec.schema import AdapterConfig


def matches_target(module_name: str, targets: Sequence[str], output_layer: str | None) -> bool:
    """PEFT's rule: a name matches a target when equal to it or ending in '.<target>'."""
    if "all-linear" in targets:
        return module_name != output_layer
    return any(module_name == t or module_name.endswith(f".{t}") for t in targets)


def lora_a_init(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """kaiming_uniform_(a=sqrt(5)) on an (r, d_in) weight, as PEFT and nn.Linear do, from `generator`."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def is_linear(module: nn.Module) -> bool:
    """An `nn.Linear`, or transformers' `Conv1D` (GPT-2): a linear layer with a transposed weight."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module)]


def check_targets(model: nn.Module, targets: Sequence[str], model_name: str,
                  key: str = "adapter.target_modules") -> None:
    """ConfigError for each target name that matches no linear layer (the model is known only now); `key`: what
    the lines name as the targets' source."""
    names = linear_layer_names(model)
    missing = [t for t in targets if t != "all-linear" and not any(matches_target(n, [t], None) for n in names)]
    if missing:
        short = ", ".join(dict.fromkeys(name.rpartition(".")[2] for name in names))
        raise ConfigError([f"{key}: '{t}' matches no linear layer of {model_name} "
                           f"(its linear layers: {short})" for t in missing])


def output_layer_name(model: nn.Module) -> str | None:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is output:
            return name
    return None


class MultiLoraModel:
    def __init__(self, model: nn.Module, targets: Sequence[str], num_slots: int, max_rank: int,
                 autocast_dtype: torch.dtype | None = None, share_prompts: bool = True):
        self.model = model
        # RL sampling and training run each group's prompt once (model.share_prompts; see prompt_sharing.py).
        self.share_prompts = share_prompts
        # Every routed forward (training, evaluation, sampling, teachers) runs under this autocast (model.autocast).
        self.autocast_dtype = autocast_dtype
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.routing = Routing()
        self.output_layer = output_layer_name(model)
        config = getattr(model, "config", None)
        check_targets(model, targets, getattr(config, "name_or_path", "") or type(model).__name__)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if is_checkpointing(model):
            # Recomputed layers must see the routing of their forward (see Routing.checkpoint_contexts).
            enable_checkpointing(model, self.routing.checkpoint_contexts)
        self.layers: dict[str, MultiLoraLinear] = {}
        for name in linear_layer_names(model):
            if matches_target(name, targets, self.output_layer):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                layer = MultiLoraLinear(getattr(parent, child), num_slots, max_rank, self.routing)
                setattr(parent, child, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no linear layer matches target_modules {list(targets)}")
        params = [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]
        layouts = [layout for layer in self.layers.values() for layout in (layer.a_layout, layer.b_layout)]
        self.ranks = SlotRanks(num_slots)
        self.optimizer = SlotAdamW(params, num_slots, layouts, self.ranks)
        self.device = next(model.parameters()).device
        # On the CPU, per-adapter matmuls cost about what the padded bmm wastes, and they make
        # every adapter bit-identical to PEFT alone (see multi_lora.py).
        self.routing.per_adapter = self.device.type == "cpu"

    # -- slots ---------------------------------------------------------------------------

    @property
    def slot_rank(self) -> list[int]:
        """Rank in use per slot (O-LoRA grows it task by task)."""
        return self.ranks.in_use

    def targeted_layers(self, config: AdapterConfig) -> list[str]:
        return [name for name in self.layers if matches_target(name, config.target_modules, self.output_layer)]

    @torch.no_grad()
    def load_slot(self, slot: int, config: AdapterConfig, max_grad_norm: float | None, seed: int) -> None:
        """Put a fresh adapter in `slot`: A as PEFT initialises it, B = 0, new optimizer state.

        A is drawn from a generator seeded by the adapter's own seed, layer by layer in a
        fixed order, so an adapter's start does not depend on which slot or neighbours it has.
        """
        if config.rank > self.max_rank:
            raise ValueError(f"rank {config.rank} exceeds the engine's max rank {self.max_rank}")
        for layer in self.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.scale[slot] = 0.0
        self.ranks.clear(slot)
        self.grow_slot(slot, config, torch.Generator().manual_seed(seeds.lora_init(seed)))
        self.optimizer.reset_slot(slot, config.weight_decay, config.beta1, config.beta2, config.eps, max_grad_norm)

    @torch.no_grad()
    def grow_slot(self, slot: int, config: AdapterConfig, generator: torch.Generator) -> None:
        """Append `config.rank` fresh LoRA ranks to a slot: A as PEFT initialises it, B = 0.

        The slot's optimizer moments restart: B's block is laid out for its rank, so a
        larger rank moves the existing columns (see multi_lora.Block).
        """
        start, stop = self.slot_rank[slot], self.slot_rank[slot] + config.rank
        if stop > self.max_rank:
            raise ValueError(f"rank {stop} exceeds the engine's max rank {self.max_rank}")
        if start:  # every layer's B, targeted now or before, moves its columns to the new width
            for layer in self.layers.values():
                columns = layer.b_block(slot, start).clone()
                layer.lora_B[slot].zero_()
                layer.b_block(slot, stop)[:, :start].copy_(columns)
        for name in self.targeted_layers(config):
            layer = self.layers[name]
            layer.a_block(slot, stop)[start:].copy_(lora_a_init(config.rank, layer.in_features, generator))
            layer.b_block(slot, stop)[:, start:].zero_()
            layer.scale[slot] = config.scale
        self.ranks.grow(slot, config.rank)
        self.optimizer.restart_moments(slot)

    @torch.no_grad()
    def copy_slot(self, source: int, target: int) -> None:
        """Make `target` an exact copy of `source`'s adapter (weights and scale)."""
        for layer in self.layers.values():
            layer.lora_A[target].copy_(layer.lora_A[source])
            layer.lora_B[target].copy_(layer.lora_B[source])
            layer.scale[target] = layer.scale[source]
        self.ranks.copy(source, target)

    def slot_state(self, slot: int) -> dict[str, object]:
        """Everything of one slot needed to resume it exactly: weights, scales, rank, optimizer."""
        return {
            "lora_A": [layer.lora_A[slot].detach().cpu().clone() for layer in self.layers.values()],
            "lora_B": [layer.lora_B[slot].detach().cpu().clone() for layer in self.layers.values()],
            "scale": [float(layer.scale[slot]) for layer in self.layers.values()],
            "rank": self.slot_rank[slot],
            "optimizer": {k: [t.cpu() for t in v] if isinstance(v, list) else v
                          for k, v in self.optimizer.slot_state(slot).items()},
        }

    @torch.no_grad()
    def load_slot_state(self, slot: int, state: dict[str, object]) -> None:
        saved = [tuple(t.shape) for pair in zip(state["lora_A"], state["lora_B"]) for t in pair]  # type: ignore[call-overload]
        if saved != [tuple(p[slot].shape) for p in self.optimizer.params]:
            raise ValueError("the saved training state does not fit this engine "
                             "(another model, maximum rank, or an older mlora's layout)")
        for layer, a, b, scale in zip(self.layers.values(), state["lora_A"], state["lora_B"], state["scale"]):  # type: ignore[call-overload]
            layer.lora_A[slot].copy_(a)
            layer.lora_B[slot].copy_(b)
            layer.scale[slot] = scale
        self.ranks.in_use[slot] = int(state["rank"])  # type: ignore[call-overload]
        self.optimizer.load_slot_state(slot, state["optimizer"])  # type: ignore[arg-type]

    def slot_weights(self, slot: int, config: AdapterConfig) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT's key names (without the adapter name)."""
        weights, rank = {}, self.slot_rank[slot]
        for name in self.targeted_layers(config):
            layer = self.layers[name]
            weights[f"base_model.model.{name}.lora_A.weight"] = layer.a_block(slot, rank).detach().clone()
            weights[f"base_model.model.{name}.lora_B.weight"] = layer.b_block(slot, rank).detach().clone()
        return weights

    @torch.no_grad()
    def set_slot_weights(self, slot: int, config: AdapterConfig, weights: dict[str, torch.Tensor]) -> None:
        """Load a saved adapter's weights (PEFT key names) into `slot`; ConfigError if they are shaped for
        another base or rank (checked before anything is written)."""
        for name in self.targeted_layers(config):
            layer = self.layers[name]
            lora_a, lora_b = (weights.get(f"base_model.model.{name}.lora_{part}.weight") for part in "AB")
            if lora_a is None or lora_b is None:
                raise ConfigError([f"{name}: no saved weights for this targeted layer"])
            rank = lora_a.size(0)
            if not (lora_a.dim() == lora_b.dim() == 2 and rank <= layer.lora_A.size(1)
                    and tuple(lora_a.shape) == (rank, layer.in_features)
                    and tuple(lora_b.shape) == (layer.out_features, rank)):
                raise ConfigError([f"{name}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not "
                                   f"fit the base's layer ({layer.in_features} -> {layer.out_features}) at rank <= "
                                   f"{layer.lora_A.size(1)}: saved for another base model or rank"])
        for layer in self.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.scale[slot] = 0.0
        for name in self.targeted_layers(config):
            layer = self.layers[name]
            lora_a = weights[f"base_model.model.{name}.lora_A.weight"]
            layer.a_block(slot, lora_a.size(0)).copy_(lora_a)
            layer.b_block(slot, lora_a.size(0)).copy_(weights[f"base_model.model.{name}.lora_B.weight"])
            layer.scale[slot] = config.scale
            self.ranks.in_use[slot] = lora_a.size(0)

    def save_slot(self, slot: int, config: AdapterConfig, directory: Path, base_model: str) -> None:
        """Write the adapter in `slot` as a PEFT LoRA checkpoint (written, then renamed)."""
        from safetensors.torch import save_file

        from mlora_cli.files import atomic_directory

        layers = self.targeted_layers(config)
        targets = "all-linear" if "all-linear" in config.target_modules else sorted(
            {name.rpartition(".")[2] for name in layers}
        )
        # PEFT keeps lora_A (r, d_in) and lora_B (d_out, r) for a Conv1D as for a Linear; its
        # fan_in_fan_out=True only transposes the delta when merging into Conv1D's (d_in, d_out)
        # weight. It forces the flag per layer type on load (warning when it differs); say it here.
        fan_in_fan_out = any(not isinstance(self.layers[name].base, nn.Linear) for name in layers)
        # O-LoRA's stacked per-task LoRAs are one LoRA of the total rank at the same scale.
        rank = self.slot_rank[slot]
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": config.alpha * rank / config.rank,
            "lora_dropout": config.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
        }
        weights = {k: v.cpu().contiguous() for k, v in self.slot_weights(slot, config).items()}
        with atomic_directory(directory) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
            save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    # -- running mixed batches -----------------------------------------------------------

    @contextlib.contextmanager
    def routed(
        self,
        slots: Sequence[int],
        rows: Sequence[int],
        dropout: Sequence[float] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> Iterator[None]:
        """Run the model with rows grouped as `rows[g]` rows for slot `slots[g]`, under the engine's autocast."""
        self.routing.set(list(slots), list(rows), [self.slot_rank[s] for s in slots], self.device,
                         list(dropout) if dropout else None, list(generators) if generators else None)
        try:
            with autocast(self.autocast_dtype, self.device):
                yield
        finally:
            self.routing.clear()

    def grad_norms(self, slots: Sequence[int]) -> torch.Tensor:
        """Each slot's gradient norm, shape (S,); on the CPU bit-identical to `clip_grad_norm_` on the adapter alone."""
        if not self.routing.per_adapter:
            return self.optimizer.grad_norms()
        scales = torch.stack([layer.scale for layer in self.layers.values()]).tolist()  # (layers, S)
        in_use = [(slot, [bool(row[slot]) for row in scales for _ in ("A", "B")]) for slot in slots]
        return self.optimizer.grad_norms(in_use)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
