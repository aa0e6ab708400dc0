"""The fused layer is exact: mixed batch == each adapter alone == PEFT with the same weights.

All in fp32 on a micro Llama built in code. Covers the per-adapter path (the CPU's), the
batched-matmul path (the GPU's, for equal groups), unequal groups, mixed ranks and alphas,
and gradient isolation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from mlora_cli.model.base import build_builtin
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import AdapterConfig

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
ADAPTERS = [
    AdapterConfig(rank=2, alpha=4.0, target_modules=TARGETS),
    AdapterConfig(rank=4, alpha=16.0, target_modules=TARGETS),
    AdapterConfig(rank=8, alpha=8.0, target_modules=("q_proj", "v_proj")),  # fewer targets
]


def make_engine() -> tuple[MultiLoraModel, torch.nn.Module]:
    model, _ = build_builtin("builtin:micro")
    model.eval()
    reference = copy.deepcopy(model)
    engine = MultiLoraModel(model, sorted({t for a in ADAPTERS for t in a.target_modules}), len(ADAPTERS), 8)
    generator = torch.Generator().manual_seed(5)
    for slot, config in enumerate(ADAPTERS):
        engine.load_slot(slot, config, max_grad_norm=None, seed=slot)
        # B starts at zero; make it non-zero so the LoRA term is really tested.
        with torch.no_grad():
            for layer in engine.layers.values():
                layer.b_block(slot, config.rank).copy_(
                    torch.randn(layer.out_features, config.rank, generator=generator) * 0.1)
    for name in engine.targeted_layers(ADAPTERS[2]):
        assert name.endswith(("q_proj", "v_proj"))
    return engine, reference


def peft_model(reference: torch.nn.Module, engine: MultiLoraModel, slot: int) -> torch.nn.Module:
    config = ADAPTERS[slot]
    peft = get_peft_model(
        copy.deepcopy(reference),
        LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                   target_modules=list(config.target_modules)),
    )
    weights = engine.slot_weights(slot, config)
    # Only targeted layers are in the checkpoint; padded or untargeted parts must be zero.
    for layer_name, layer in engine.layers.items():
        if f"base_model.model.{layer_name}.lora_A.weight" not in weights:
            assert layer.scale[slot] == 0
    result = set_peft_model_state_dict(peft, weights)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    peft.eval()
    return peft


def batch(rows: int, seed: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding
    return ids, mask


def loss_of(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-100)


@pytest.mark.parametrize("per_adapter", [True, False], ids=["per-adapter", "batched"])
@pytest.mark.parametrize("rows", [[2, 2, 2], [3, 1, 2]], ids=["uniform", "unequal"])
def test_mixed_batch_matches_alone_and_peft(rows: list[int], per_adapter: bool) -> None:
    engine, reference = make_engine()
    engine.routing.per_adapter = per_adapter  # the CPU's path, or the GPU's (batched when groups are equal)
    parts = [batch(n, seed=i) for i, n in enumerate(rows)]
    ids = torch.cat([p[0] for p in parts])
    mask = torch.cat([p[1] for p in parts])

    with engine.routed([0, 1, 2], rows):
        mixed = engine.model(input_ids=ids, attention_mask=mask).logits
        losses = [loss_of(chunk, *part) for chunk, part in zip(mixed.split(rows), parts)]
    sum(losses).backward()
    mixed_grads = {n: (layer.lora_A.grad.clone(), layer.lora_B.grad.clone()) for n, layer in engine.layers.items()}
    engine.zero_grad()

    for slot, (part_ids, part_mask) in enumerate(parts):
        with engine.routed([slot], [rows[slot]]):
            alone = engine.model(input_ids=part_ids, attention_mask=part_mask).logits
        torch.testing.assert_close(mixed.split(rows)[slot], alone, atol=1e-5, rtol=0)

        peft = peft_model(reference, engine, slot)
        peft_logits = peft(input_ids=part_ids, attention_mask=part_mask).logits
        torch.testing.assert_close(mixed.split(rows)[slot], peft_logits, atol=1e-5, rtol=0)

        # The fused gradient of this slot equals PEFT's gradient of this adapter's own loss.
        loss_of(peft_logits, part_ids, part_mask).backward()
        rank = ADAPTERS[slot].rank
        for name, module in peft.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                layer_name = name.removeprefix("base_model.model.")
                grad_a, grad_b = mixed_grads[layer_name]
                layer = engine.layers[layer_name]
                torch.testing.assert_close(layer.a_block(slot, rank, grad_a), module.lora_A["default"].weight.grad,
                                           atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(layer.b_block(slot, rank, grad_b), module.lora_B["default"].weight.grad,
                                           atol=1e-5, rtol=1e-4)
                # The unused rest of the slot's rows gets exactly zero gradient, so it stays zero.
                assert grad_a[slot, rank:].abs().sum() == 0
                assert grad_b[slot, layer.out_features * rank :].abs().sum() == 0


def test_gradients_reach_only_the_owning_slot_and_never_the_base() -> None:
    engine, _ = make_engine()
    ids, mask = batch(4, seed=3)
    for owner in range(len(ADAPTERS)):
        with engine.routed([0, 1, 2], [2, 1, 1]):
            logits = engine.model(input_ids=torch.cat([ids, ids[:0]]), attention_mask=mask).logits
        rows = [2, 1, 1]
        loss_of(logits.split(rows)[owner], ids.split(rows)[owner], mask.split(rows)[owner]).backward()
        for layer in engine.layers.values():
            for other in range(len(ADAPTERS)):
                if other != owner:
                    assert layer.lora_A.grad[other].abs().max() == 0
                    assert layer.lora_B.grad[other].abs().max() == 0
        assert any(layer.lora_B.grad[owner].abs().max() > 0 for layer in engine.layers.values())
        for parameter in engine.model.parameters():
            if not any(parameter is p for layer in engine.layers.values() for p in (layer.lora_A, layer.lora_B)):
                assert not parameter.requires_grad and parameter.grad is None
        engine.zero_grad()


@pytest.mark.parametrize("per_adapter", [True, False], ids=["per-adapter", "batched"])
def test_a_slot_in_two_groups_gets_the_sum_of_their_gradients(per_adapter: bool) -> None:
    """Slot 1's rows split around slot 0's (groups [1, 0, 1]) train it as the same rows together do."""
    engine, _ = make_engine()
    engine.routing.per_adapter = per_adapter
    ids, mask = batch(6, seed=4)
    grads = []
    # Rows 0, 1, 4, 5 are slot 1's: as groups [1, 0, 1] in this order, or as [1, 0] reordered.
    for slots, rows, order, own in (([1, 0, 1], [2, 2, 2], [0, 1, 2, 3, 4, 5], [0, 1, 4, 5]),
                                    ([1, 0], [4, 2], [0, 1, 4, 5, 2, 3], [0, 1, 2, 3])):
        with engine.routed(slots, rows):
            logits = engine.model(input_ids=ids[order], attention_mask=mask[order]).logits
        loss_of(logits[own], ids[order][own], mask[order][own]).backward()
        grads.append([p.grad.clone() for layer in engine.layers.values() for p in (layer.lora_A, layer.lora_B)])
        engine.zero_grad()
    for split, together in zip(*grads):
        torch.testing.assert_close(split, together, atol=1e-6, rtol=1e-5)
        assert split[0].abs().max() == 0  # slot 0's rows are not in the loss
    assert any(split[1].abs().max() > 0 for split in grads[0])


def test_zero_b_equals_base() -> None:
    model, _ = build_builtin("builtin:micro")
    model.eval()
    reference = copy.deepcopy(model)
    engine = MultiLoraModel(model, ["q_proj", "v_proj"], 2, 4)
    engine.load_slot(0, AdapterConfig(rank=4, target_modules=("q_proj", "v_proj")), None, seed=0)
    engine.load_slot(1, AdapterConfig(rank=2, target_modules=("q_proj",)), None, seed=1)
    ids, mask = batch(4, seed=1)
    with engine.routed([0, 1], [2, 2]):
        fused = engine.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, reference(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_per_adapter_path_under_bf16_autocast_gives_fp32_gradients_close_to_fp32() -> None:
    """The GPU trains under bf16 autocast, and unequal groups take the per-adapter path there:
    its backward must run under the forward's autocast (bf16 matmuls on bf16 activations) and
    hand fp32 gradients to the fp32 LoRA weights. Checked with the CPU's autocast."""
    rows = [3, 1, 2]
    ids, mask = batch(sum(rows), seed=7)
    grads = {}
    for precision in ("fp32", "bf16"):
        engine, _ = make_engine()
        with engine.routed([0, 1, 2], rows), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = engine.model(input_ids=ids, attention_mask=mask).logits
            loss = loss_of(logits.float(), ids, mask)
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for layer in engine.layers.values()
                                      for p in (layer.lora_A, layer.lora_B)])
        assert all(p.grad.dtype == torch.float32 for layer in engine.layers.values()
                   for p in (layer.lora_A, layer.lora_B))
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99, cosine
