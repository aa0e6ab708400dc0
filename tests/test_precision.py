"""One precision control, `model.autocast`, reaching every forward; what can be checked of the GPU path on the CPU.

- the setting resolves per device (bf16 only on GPUs that compute it natively);
- under bf16 autocast the batched path (the GPU's) and the per-adapter path (the CPU's) compute the same
  LoRA term, logits and gradients, in bf16, with the fp32 weights' gradients in fp32;
- a run with `model.autocast: bfloat16` trains and evaluates under it (the eval loss moves with it), and records it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, write_sweep
from test_multi_lora import ADAPTERS, batch, loss_of, make_engine
from torch.utils._python_dispatch import TorchDispatchMode

from mlora_cli.data.batches import Row
from mlora_cli.model import base as base_module
from mlora_cli.model.base import autocast_dtype


class DispatchCount(TorchDispatchMode):
    """Counts the ops dispatched inside it: on a GPU, each is a kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_auto_is_bf16_only_on_gpus_that_compute_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("off", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") == torch.bfloat16 and autocast_dtype("float16", "cpu") == torch.float16
    monkeypatch.setattr(base_module.torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert autocast_dtype("auto", "cuda:0") is None  # a T4/V100 emulates bf16: fp32 instead
    monkeypatch.setattr(base_module.torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert autocast_dtype("auto", "cuda:0") == torch.bfloat16
    assert autocast_dtype("off", "cuda:0") is None


def test_the_base_is_stored_in_the_autocast_dtype_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlora_cli.model.base import base_dtype
    from mlora_cli.spec.schema import ModelConfig

    monkeypatch.setattr(base_module.torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert base_dtype(ModelConfig(), "cuda:0") == torch.bfloat16  # what every forward computes in there
    assert base_dtype(ModelConfig(), "cpu") == torch.float32
    assert base_dtype(ModelConfig(autocast="bfloat16"), "cpu") == torch.bfloat16
    assert base_dtype(ModelConfig(autocast="off"), "cuda:0") == torch.float32
    assert base_dtype(ModelConfig(dtype="float32"), "cuda:0") == torch.float32  # asked for: kept
    monkeypatch.setattr(base_module.torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert base_dtype(ModelConfig(), "cuda:0") == torch.float32


def test_batched_and_per_adapter_paths_agree_under_bf16_autocast() -> None:
    results = {}
    for per_adapter in (True, False):
        engine, _ = make_engine()
        engine.autocast_dtype = torch.bfloat16
        engine.routing.per_adapter = per_adapter
        parts = [batch(2, seed=i) for i in range(len(ADAPTERS))]
        ids, mask = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with engine.routed([0, 1, 2], [2, 2, 2]):  # equal groups: the batched bmm path when not per-adapter
            logits = engine.model(input_ids=ids, attention_mask=mask).logits
            assert logits.dtype == torch.bfloat16  # the LoRA term did not pull the output up to fp32
        sum(loss_of(chunk.float(), *part) for chunk, part in zip(logits.split([2, 2, 2]), parts)).backward()
        grads = [g for layer in engine.layers.values() for g in (layer.lora_A.grad, layer.lora_B.grad)]
        assert all(g.dtype == torch.float32 for g in grads)
        results[per_adapter] = logits.float(), torch.cat([g.flatten() for g in grads])
    (logits_a, grads_a), (logits_b, grads_b) = results[True], results[False]
    torch.testing.assert_close(logits_a, logits_b, atol=0.05, rtol=0.02)  # bf16: 8 bits of mantissa
    assert (grads_a - grads_b).norm() <= 0.03 * grads_a.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_of_a_half_precision_input_rounds_once_as_peft(dtype: torch.dtype) -> None:
    """PEFT casts a bf16 input to its fp32 weights' dtype before dropout, so x * keep / (1 - p) is computed in
    fp32 and rounded to bf16 once; a mask scaled in bf16 would round the scale first (1 / 0.95 -> 1.0547)."""
    from torch import nn

    from mlora_cli.model.multi_lora import MultiLoraLinear
    from mlora_cli.model.routing import Routing

    routing = Routing(per_adapter=True)
    layer = MultiLoraLinear(nn.Linear(64, 16), 2, 4, routing)
    routing.set([0, 1], [3, 2], [4, 4], torch.device("cpu"), dropout=[0.05, 0.3],
                generators=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_(True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer._dropout(x)
    assert out.dtype == dtype
    # Kept for backward: the 0/1 mask in x's dtype (2 bytes an entry) and the per-row scales, no fp32 mask.
    assert [t.dtype for t in saved if t.numel() == x.numel()] == [dtype]
    x, out = x.detach(), out.detach()
    for rows, p in ((slice(0, 3), 0.05), (slice(3, 5), 0.3)):
        keep = (out[rows] != 0).float()
        expected = (x[rows].float() * keep * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)).to(dtype)
        assert torch.equal(out[rows], expected)
        assert 0.5 < keep.mean() < 1.0


@pytest.mark.slow
def test_a_run_under_bf16_autocast_evaluates_under_it_too(tmp_path: Path) -> None:
    sweep = micro_sweep(tasks=builtin_tasks("copy", train_examples=8, eval_examples=4, steps=2),
                        eval={"metrics": ["loss"]})
    losses = {}
    for setting in ("off", "bfloat16"):
        folder = tmp_path / setting
        folder.mkdir()
        result = mlora("run", write_sweep(folder, sweep, model={"autocast": setting}), "--no-plots")
        assert result.exit_code == 0, result.output
        (run_dir,) = (folder / "runs").iterdir()
        entry = next(iter(json.loads((run_dir / "results.json").read_text())["adapters"].values()))
        losses[setting] = entry["matrix"]["loss"][0][0]  # the base, before training: evaluation alone
        assert json.loads((run_dir / "base.json").read_text())["autocast"] == setting
    assert losses["bfloat16"] != losses["off"] and losses["bfloat16"] == pytest.approx(losses["off"], rel=0.02)


# Lines in the GPU path of a step that `host_waits` flags but that never wait for a GPU: reads of host tensors by
# design, and `.to()` of tensors already on the device (the recorder cannot tell them from host ones on the CPU).
HOST_TENSOR_READS = {
    ("optim.py", "any_frozen = bool(self.ranks.frozen.any())"),  # SlotRanks live on the host
    ("strategies.py", "if bool(self.engine.ranks.frozen.any()):"),
    ("strategies.py", "if self.anchor is not None and bool((self.l2 > 0).any() or (self.ewc > 0).any()):"),  # host
    ("strategies.py", "if bool((self.olora1 > 0).any() or (self.olora2 > 0).any()):"),  # coefficients
    ("optim.py", "active = active.to(device)"),  # made on the device by the step
    ("optim.py", "lrs = lrs.to(device=device, dtype=torch.float64)"),  # on_device'd by the step, in float64
    ("optim.py", "step = (self.steps if self.device_steps is None else self.device_steps).to("),  # device_steps
    ("strategies.py", "return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))"),
    # a dropout mask's seed, from the adapter's host generator
    ("multi_lora.py", 'seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator '
                      'else "cpu"))'),
}


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_the_gpu_path_of_a_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch, objective: str) -> None:
    """The batched (GPU) path emulated on the CPU: `step_on_device` calls no .item() / .tolist() / .cpu() /
    bool() / int() / float() on a tensor from mlora's code, except reads of host tensors by design. On a GPU
    each would wait for the device. (`fused_step` then reads back what it logs, once.) The RL step: groups of
    3 samples of one prompt, each prompt run once (model.share_prompts), with the KL reference pass."""
    from mlora_cli.model.prompt_sharing import shares_prompts
    from mlora_cli.spec.schema import RLConfig
    from mlora_cli.train.step import StepInput, step_on_device

    engine, _ = make_engine()
    engine.routing.per_adapter = False  # the GPU's LoRA path
    engine.optimizer.per_slot_fused = False  # and its optimizer: one masked update of all slots
    ids, _ = batch(3 * 4, seed=1)
    if objective == "sft":
        rows = [[Row(tuple(int(t) for t in ids[3 * k + i]), 4, "x") for i in range(3)] for k in range(3)]
        inputs = [StepInput(slot, rows[slot], 1e-3, 0.1 if slot == 1 else 0.0, torch.Generator().manual_seed(slot))
                  for slot in range(3)]
    else:  # each part one prompt (row 3k's first 4 tokens) sampled 3 times
        rows = [[Row(tuple(int(t) for t in torch.cat([ids[3 * k, :4], ids[3 * k + i, 4:]])), 4, "x")
                 for i in range(3)] for k in range(3)]
        inputs = [StepInput(slot, rows[slot], 1e-3, 0.0, None, [1.0, -0.5, -0.5], RLConfig(group_size=3, kl_beta=0.1))
                  for slot in range(3)]
        # Slot 0 reuses its samples (num_iterations > 1): pi_old of each completion token comes from the host.
        inputs[0].old_log_probs = [[-1.0] * (row.tokens - row.prompt_len) for row in rows[0]]
        inputs[1].record_log_probs = True  # and slot 1 records its pi_old for reuse (read after the step)
        assert all(shares_prompts(part) for part in rows)  # the step takes the shared-prompt passes
    step_on_device(engine, inputs, 0)  # warm up: lazily built state is not the step
    unexpected = host_waits(monkeypatch, lambda: step_on_device(engine, inputs, 0))
    assert not unexpected, "\n".join(f"{f}: {line}" for f, line in unexpected)


def host_waits(monkeypatch: pytest.MonkeyPatch, run: Any) -> list[tuple[str, str]]:
    """The lines of mlora's code that `run` makes wait for a GPU: reads of a tensor (.item() / .tolist() / .cpu() /
    bool() / int() / float()) and copies of a host tensor to the device from pageable memory (`torch.tensor(...,
    device=)`, a blocking `.to(device)`), except reads of host tensors by design."""
    import inspect

    reads: list[tuple[str, str]] = []

    def record() -> None:
        caller = inspect.stack()[2]
        if "mlora_cli" in caller.filename:
            reads.append((Path(caller.filename).name, (caller.code_context or [""])[0].strip()))

    def recording(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            record()
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    # A host list or tensor made a device tensor directly is a copy from pageable memory: on a GPU it waits for
    # every kernel queued before it (on_device / to_device go through pinned memory, without blocking).
    make_tensor, move = torch.tensor, torch.Tensor.to

    def tensor(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            record()
        return make_tensor(*args, **kwargs)

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        moves = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)
        if moves and not kwargs.get("non_blocking"):
            record()
        return move(self, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "to", to)
    try:
        run()
    finally:
        monkeypatch.undo()
    return sorted(set(read for read in reads if read not in HOST_TENSOR_READS))


def test_the_gpu_path_of_a_step_with_strategies_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the strategies a run passes to every step: l2's anchor pull, an LwF teacher's pass, O-LoRA's
    frozen ranks and penalty."""
    from mlora_cli.model.base import build_builtin
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.spec.schema import AdapterConfig
    from mlora_cli.train.step import StepInput, step_on_device
    from mlora_cli.train.strategies import Strategies

    targets = ("q_proj", "v_proj")
    configs = [AdapterConfig(rank=4, alpha=8.0, target_modules=targets, strategy=strategy, l2_lambda=1.0)
               for strategy in ("l2", "lwf", "olora")]
    engine = MultiLoraModel(build_builtin("builtin:micro")[0], targets, 6, 8)  # 3 students, 3 spare slots
    engine.routing.per_adapter = False
    engine.optimizer.per_slot_fused = False
    strategies = Strategies(engine, 3)
    for slot, config in enumerate(configs):
        engine.load_slot(slot, config, 1.0, seed=slot)
        strategies.start(slot, config, slot)
        strategies.end_task(slot, config, 0, slot, lambda: [], train_rows=0)
    assert strategies.anchor is not None and strategies.teacher_of and bool(engine.ranks.frozen.any())
    ids, _ = batch(6, seed=1)
    inputs = [StepInput(slot, [Row(tuple(int(t) for t in ids[2 * slot + i]), 4, "x") for i in range(2)], 1e-3, 0.0,
                        None) for slot in range(3)]
    step_on_device(engine, inputs, 0, strategies)  # warm up
    unexpected = host_waits(monkeypatch, lambda: step_on_device(engine, inputs, 0, strategies))
    assert not unexpected, "\n".join(f"{f}: {line}" for f, line in unexpected)


def test_the_masked_update_is_a_fixed_number_of_ops_whatever_the_layers() -> None:
    """Finding 4 of the GPU review: the masked AdamW (the GPU's) runs over flat buffers, so a step's optimizer,
    gradient norms and zero_grad dispatch the same ops for 1 targeted projection as for all seven (before: ~20 per
    stacked tensor). Counted with a dispatch mode on the CPU emulation of the GPU path."""
    from mlora_cli.model.base import build_builtin
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.spec.schema import AdapterConfig

    counts = {}
    for targets in (("q_proj",), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
        model, _ = build_builtin("builtin:micro")
        engine = MultiLoraModel(model, targets, 2, 4)
        engine.routing.per_adapter = False
        engine.optimizer.per_slot_fused = False
        for slot in range(2):
            engine.load_slot(slot, AdapterConfig(rank=4, target_modules=targets), max_grad_norm=1.0, seed=slot)
        ids, mask = batch(4, seed=0)
        for _ in range(2):  # the second step is the one counted: lazily built state is not the step
            engine.zero_grad()
            with engine.routed([0, 1], [2, 2]):
                loss_of(engine.model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
            with DispatchCount() as count:
                norms = engine.grad_norms([0, 1])
                engine.optimizer.step(torch.tensor([True, True]), torch.tensor([1e-3, 2e-3], dtype=torch.float64),
                                      norms)
                engine.zero_grad()
        assert engine.optimizer.flat is not None
        storage = engine.optimizer.flat.grads.untyped_storage().data_ptr()
        assert all(p.grad is not None and p.grad.untyped_storage().data_ptr() == storage
                   for p in engine.optimizer.params)  # the gradients are views of the flat buffer
        counts[len(targets)] = count.ops
    assert counts[1] == counts[7] and counts[7] < 80, counts  # per stacked tensor (before): 189 and 1185


def test_the_gpu_lora_path_is_a_fixed_number_of_ops_for_unequal_groups() -> None:
    """A decode step after some rows ended has groups of unequal rows: the GPU's path pads them to the longest
    and keeps its two batched matmuls (a loop over G groups launches ~3 G kernels per layer), with the
    per-adapter path's logits. Counted with a dispatch mode on the CPU emulation."""
    from mlora_cli.model.base import build_builtin
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.spec.schema import AdapterConfig

    model, _ = build_builtin("builtin:micro")
    engine = MultiLoraModel(model, ["all-linear"], 8, 4)
    for slot in range(8):
        engine.load_slot(slot, AdapterConfig(rank=4, target_modules=("all-linear",)), None, seed=slot)
        with torch.no_grad():  # a nonzero B: the LoRA term counts
            for layer in engine.layers.values():
                layer.lora_B[slot].normal_(0, 0.1, generator=torch.Generator().manual_seed(slot))
    counts, logits = {}, {}
    for rows in ([3, 2, 2, 1], [2, 2, 1, 2, 1, 2, 2, 2]):
        ids, mask = batch(sum(rows), seed=2, length=1)  # one token per row, as a decode step
        for per_adapter in (True, False):
            engine.routing.per_adapter = per_adapter
            with torch.no_grad(), engine.routed(list(range(len(rows)))[::-1], rows), DispatchCount() as count:
                logits[per_adapter] = engine.model(input_ids=ids, attention_mask=mask).logits
            counts[(len(rows), per_adapter)] = count.ops
        assert engine.routing.padded_rows is None  # cleared with the routing
        torch.testing.assert_close(logits[False], logits[True], atol=1e-6, rtol=1e-5)
    assert counts[(4, False)] == counts[(8, False)] < counts[(8, True)], counts


def test_the_batched_lora_term_under_bf16_keeps_the_exact_scale() -> None:
    """The GPU's batched path under bf16 autocast: s = alpha / r is applied in fp32 (folded into B), so the term
    has no bias; scaling the bf16 product would round s itself (16 / 12 -> 1.3359, 16 / 6 -> 2.6719: +0.2%)."""
    from torch import nn

    from mlora_cli.model.multi_lora import MultiLoraLinear
    from mlora_cli.model.routing import Routing

    generator = torch.Generator().manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(64, 256), 2, 12, Routing(per_adapter=False))
    with torch.no_grad():
        for slot, rank in ((0, 12), (1, 6)):
            layer.a_block(slot, rank).copy_(torch.randn(rank, 64, generator=generator))
            layer.b_block(slot, rank).copy_(torch.randn(256, rank, generator=generator))
            layer.scale[slot] = 16.0 / rank
    layer.routing.set([0, 1], [4, 4], [12, 6], torch.device("cpu"))
    assert layer.routing.batched
    x = torch.randn(8, 16, 64, generator=generator)
    with torch.no_grad():
        exact = layer.lora_term(x)  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = layer.lora_term(x.bfloat16()).float()
    for rows in (slice(0, 4), slice(4, 8)):
        ratio = (rounded[rows] * exact[rows]).sum() / (exact[rows] * exact[rows]).sum()
        assert abs(float(ratio) - 1.0) < 5e-4, float(ratio)


@pytest.mark.parametrize("olora", [False, True], ids=["plain", "frozen-ranks"])
def test_the_masked_update_in_chunks_is_the_update_in_one(monkeypatch: pytest.MonkeyPatch, olora: bool) -> None:
    """The GPU's masked AdamW runs over the flat buffers in column chunks (bounded temporaries): elementwise, so
    every chunking gives the same numbers, inactive slots and O-LoRA's frozen ranks untouched."""
    from mlora_cli.model import optim
    from mlora_cli.model.base import build_builtin
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.spec.schema import AdapterConfig

    targets = ("q_proj", "v_proj", "down_proj")
    finals = []
    for chunk in (2**22, 37):  # one chunk; many, of an odd width
        monkeypatch.setattr(optim, "FLAT_CHUNK_ELEMENTS", chunk)
        engine = MultiLoraModel(build_builtin("builtin:micro")[0], targets, 3, 4)
        engine.routing.per_adapter = False
        engine.optimizer.per_slot_fused = False
        for slot in range(3):
            engine.load_slot(slot, AdapterConfig(rank=4, target_modules=targets), max_grad_norm=1.0, seed=slot)
        if olora:
            engine.ranks.frozen[1] = 2
        ids, mask = batch(6, seed=0)
        for step in range(3):
            with engine.routed([0, 1, 2], [2, 2, 2]):
                loss_of(engine.model(input_ids=ids, attention_mask=mask).logits, ids, mask).backward()
            norms = engine.grad_norms([0, 1, 2])
            active = torch.tensor([True, True, step != 1])  # slot 2 sits out a step
            engine.optimizer.step(active, torch.tensor([1e-2, 2e-2, 3e-2], dtype=torch.float64), norms)
            engine.zero_grad()
        assert engine.optimizer.flat is not None
        finals.append([t.clone() for t in (engine.optimizer.flat.params, engine.optimizer.flat.exp_avg,
                                           engine.optimizer.flat.exp_avg_sq)])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
