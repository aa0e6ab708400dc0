"""Continual-learning strategies, per slot, inside the fused step.

Each adapter picks one `adapter.strategy`; a sweep may mix them, and all still co-train in
one fused step. What each adds (theta: the adapter's LoRA weights):

- naive:  nothing; keep fine-tuning the same adapter.
- replay: a buffer of `buffer_size` training examples from each finished task; each batch
          draws `round(batch_size * replay_ratio)` rows from it (`replayed_rows`), data only; on
          an RL task they are prompts, sampled and scored by their own task's reward.
- l2:     + l2_lambda/2 * ||theta - theta_prev||^2, theta_prev = the adapter at the end of
          the previous task.
- ewc:    + ewc_lambda/2 * sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017,
          https://arxiv.org/abs/1612.00796); F = diagonal empirical Fisher, the mean of the
          per-example squared gradients of `fisher_samples` training examples of the task just
          finished; online (Schwarz et al. 2018):
          F <- ewc_gamma * F + F_new, theta* <- theta.
- lwf:    + lwf_lambda * T^2 * KL(p_prev^T || p^T) on the current inputs (Li & Hoiem 2016,
          https://arxiv.org/abs/1606.09282), per predicted token, softmax temperature T. The
          teacher is the frozen snapshot of the adapter in a spare slot of the same engine:
          one no-grad pass of the shared base, no model copy.
- olora:  a fresh LoRA per task inside the same slot (the slot's rank grows by `rank` each
          task); earlier ranks are frozen and still applied (Wang et al. 2023,
          https://arxiv.org/abs/2310.14152); + olora_lambda1 * sum_layers |A_old A_new^T|_1
          + olora_lambda2 * ||A_new||^2.

The l2, ewc and olora terms are added straight to the gradients (their exact derivatives),
vectorized over slots, before per-adapter clipping: the same as adding them to the loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlora_cli import seeds
from mlora_cli.data.batches import Row, TokenizedTask, to_device
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.routing import on_device
from mlora_cli.spec.schema import AdapterConfig


def engine_shape(adapters: Sequence[AdapterConfig], slots: int, task_count: int) -> tuple[int, int]:
    """(engine slots, largest rank) for `slots` adapters trained at once.

    O-LoRA stacks one LoRA per task in its slot, so its slot needs rank x tasks; LwF keeps a
    frozen teacher per student in a spare slot, so any LwF adapter doubles the slots.
    """
    max_rank = max(a.rank * (task_count if a.strategy == "olora" else 1) for a in adapters)
    teachers = any(a.strategy == "lwf" for a in adapters)
    return slots * (2 if teachers else 1), max_rank


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class Strategies:
    """Per-slot strategy state for one engine; `student_slots` slots train, the rest teach."""

    def __init__(self, engine: MultiLoraModel, student_slots: int):
        self.engine = engine
        self.student_slots = student_slots
        slots = engine.num_slots
        self.l2 = torch.zeros(slots)
        self.ewc = torch.zeros(slots)
        self.olora1 = torch.zeros(slots)
        self.olora2 = torch.zeros(slots)
        self.anchor: list[torch.Tensor] | None = None  # theta_prev / theta*, like the params
        self.fisher: list[torch.Tensor] | None = None
        self.teacher_of: dict[int, int] = {}  # student slot -> slot holding its frozen snapshot
        self.lwf: dict[int, tuple[float, float]] = {}  # student slot -> (lambda, temperature)
        self.replay_buffer: dict[int, list[tuple[int, int]]] = {}  # slot -> (task index, row index) kept
        self.replay_rng: dict[int, random.Random] = {}  # slot -> which buffered rows each batch draws

    @property
    def params(self) -> list[torch.Tensor]:
        return self.engine.optimizer.params

    def start(self, slot: int, config: AdapterConfig, seed: int) -> None:
        """A new adapter in `slot`: no buffer, anchor, Fisher or teacher yet."""
        self.replay_buffer.pop(slot, None)
        self.replay_rng.pop(slot, None)
        if config.strategy == "replay":
            self.replay_buffer[slot] = []
            self.replay_rng[slot] = random.Random(seeds.replay_draws(seed))
        for tensor in (self.l2, self.ewc, self.olora1):
            tensor[slot] = 0.0
        self.olora2[slot] = config.olora_lambda2 if config.strategy == "olora" else 0.0
        self.teacher_of.pop(slot, None)
        self.lwf.pop(slot, None)
        for state in (self.anchor or []) + (self.fisher or []):
            state[slot].zero_()

    def replayed_rows(
        self, slot: int, config: AdapterConfig, batch_size: int, tasks: Sequence[TokenizedTask]
    ) -> list[Row]:
        """The rows of this step's batch that replay draws from the buffer (none for other strategies)."""
        return [tasks[t].train[i] for t, i in self.replayed_items(slot, config, batch_size)]

    def replayed_items(self, slot: int, config: AdapterConfig, batch_size: int) -> list[tuple[int, int]]:
        """(task index, row index) of the buffered rows this step replays; on an RL task, their prompts are
        sampled and scored by their own task's reward."""
        buffer = self.replay_buffer.get(slot)
        if not buffer:
            return []
        count = min(round(batch_size * config.replay_ratio), len(buffer))
        return self.replay_rng[slot].sample(buffer, count)

    @torch.no_grad()
    def end_task(
        self, slot: int, config: AdapterConfig, task_index: int, seed: int,
        squared_gradients: Callable[[], list[torch.Tensor]], train_rows: int,
    ) -> None:
        """Called when the adapter in `slot` finished task `task_index` (of `train_rows` rows) and a next task
        follows."""
        strategy = config.strategy
        if strategy == "replay":
            keep = random.Random(seeds.replay_buffer(seed, task_index))
            picked = keep.sample(range(train_rows), min(config.buffer_size, train_rows))
            self.replay_buffer[slot].extend((task_index, i) for i in picked)
        elif strategy in ("l2", "ewc"):
            if self.anchor is None:
                self.anchor = [torch.zeros_like(p) for p in self.params]
            if strategy == "ewc":
                if self.fisher is None:
                    self.fisher = [torch.zeros_like(p) for p in self.params]
                for fisher, new in zip(self.fisher, squared_gradients()):
                    fisher[slot].mul_(config.ewc_gamma).add_(new[slot])
                self.ewc[slot] = config.ewc_lambda
            else:
                self.l2[slot] = config.l2_lambda
            for anchor, p in zip(self.anchor, self.params):
                anchor[slot].copy_(p[slot])
        elif strategy == "lwf":
            teacher = self.student_slots + slot
            self.engine.copy_slot(slot, teacher)
            self.teacher_of[slot] = teacher
            self.lwf[slot] = (config.lwf_lambda, config.lwf_temperature)
        elif strategy == "olora":
            self.engine.ranks.freeze_all(slot)
            generator = torch.Generator().manual_seed(seeds.olora_task_init(seed, task_index))
            self.engine.grow_slot(slot, config, generator)  # a fresh optimizer for the fresh LoRA, too
            self.olora1[slot] = config.olora_lambda1

    @torch.no_grad()
    def add_gradients(self) -> None:
        """Add the l2 / ewc / olora penalty gradients of every slot to the LoRA gradients."""
        optimizer = self.engine.optimizer
        if bool(self.engine.ranks.frozen.any()):
            # O-LoRA's earlier blocks are not trainable: drop their gradient so it does not count
            # in the adapter's clipping norm (as with requires_grad=False in the reference code).
            for p, unfrozen in zip(self.params, optimizer.trainable()):
                if p.grad is not None:
                    p.grad.masked_fill_(~unfrozen, 0.0)
        # The per-slot weights go to the device once per step where used, through pinned memory (a copy from
        # pageable memory to a GPU would wait for the backward queued before it).
        device = self.params[0].device
        if self.anchor is not None and bool((self.l2 > 0).any() or (self.ewc > 0).any()):
            l2, ewc = (to_device(t, device) for t in (self.l2, self.ewc))
            fishers = self.fisher or [None] * len(self.params)
            for p, anchor, fisher in zip(self.params, self.anchor, fishers):
                if p.grad is None:
                    continue
                weight = _col(l2, p)
                if fisher is not None:
                    weight = weight + _col(ewc, p) * fisher
                p.grad.add_(weight * (p - anchor))
        if bool((self.olora1 > 0).any() or (self.olora2 > 0).any()):
            olora1, olora2 = (to_device(t, device) for t in (self.olora1, self.olora2))
            frozen = self.engine.ranks.frozen
            in_use = torch.tensor(self.engine.slot_rank)
            ranks = torch.arange(self.engine.max_rank).view(1, -1)
            new = to_device((ranks >= frozen.view(-1, 1)) & (ranks < in_use.view(-1, 1)), device)
            old = to_device(ranks < frozen.view(-1, 1), device)
            for layer in self.engine.layers.values():
                a = layer.lora_A
                if a.grad is None:
                    continue
                overlap = torch.bmm(a, a.transpose(1, 2))
                pairs = (new.unsqueeze(2) & old.unsqueeze(1)).to(a.dtype)
                a.grad.add_(torch.bmm(torch.sign(overlap) * pairs * _col(olora1, a), a))
                a.grad.add_(2 * _col(olora2, a) * a * new.unsqueeze(2).to(a.dtype))

    def distillation(
        self, student_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
        slots: list[int], counts: list[int],
    ) -> torch.Tensor | None:
        """LwF terms, one per group (zero for groups without a teacher), or None."""
        groups = [g for g, slot in enumerate(slots) if slot in self.teacher_of]
        if not groups:
            return None
        starts = [sum(counts[:g]) for g in range(len(counts))]
        rows = on_device([i for g in groups for i in range(starts[g], starts[g] + counts[g])], input_ids.device)
        with torch.no_grad(), self.engine.routed([self.teacher_of[slots[g]] for g in groups],
                                                 [counts[g] for g in groups]):
            teacher_logits = self.engine.model(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).logits
        terms = torch.zeros(len(slots), device=student_logits.device)
        offset = 0
        for g in groups:
            lam, temperature = self.lwf[slots[g]]
            student = student_logits[starts[g] : starts[g] + counts[g], :-1].float() / temperature
            teacher = teacher_logits[offset : offset + counts[g], :-1].float() / temperature
            offset += counts[g]
            mask = attention_mask[starts[g] : starts[g] + counts[g], 1:].float()
            kl = torch.nn.functional.kl_div(
                student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="none"
            ).sum(-1)
            terms[g] = lam * temperature**2 * (kl * mask).sum() / mask.sum().clamp(min=1)
        return terms

    def slot_state(self, slot: int) -> dict[str, Any]:
        """A slot's strategy state (for checkpoints): coefficients, anchors, Fisher, teacher."""
        teacher = self.teacher_of.get(slot)
        return {
            "coefficients": [float(t[slot]) for t in (self.l2, self.ewc, self.olora1, self.olora2)],
            "anchor": [a[slot].cpu().clone() for a in self.anchor] if self.anchor is not None else None,
            "fisher": [f[slot].cpu().clone() for f in self.fisher] if self.fisher is not None else None,
            "teacher": self.engine.slot_state(teacher) if teacher is not None else None,
            "lwf": self.lwf.get(slot),
            "replay_buffer": self.replay_buffer.get(slot),
            "replay_rng": self.replay_rng[slot].getstate() if slot in self.replay_rng else None,
        }

    @torch.no_grad()
    def load_slot_state(self, slot: int, state: dict[str, Any]) -> None:
        for tensor, value in zip((self.l2, self.ewc, self.olora1, self.olora2), state["coefficients"]):
            tensor[slot] = value
        for name in ("anchor", "fisher"):
            if state[name] is not None:
                if getattr(self, name) is None:
                    setattr(self, name, [torch.zeros_like(p) for p in self.params])
                for target, saved in zip(getattr(self, name), state[name]):
                    target[slot].copy_(saved)
        if state["teacher"] is not None:
            teacher = self.student_slots + slot
            self.engine.load_slot_state(teacher, state["teacher"])
            self.teacher_of[slot] = teacher
            self.lwf[slot] = tuple(state["lwf"])  # type: ignore[assignment]
        if state.get("replay_buffer") is not None:
            self.replay_buffer[slot] = [tuple(item) for item in state["replay_buffer"]]  # type: ignore[misc]
        if state.get("replay_rng") is not None:
            rng = state["replay_rng"]
            self.replay_rng[slot].setstate((rng[0], tuple(rng[1]), rng[2]))
