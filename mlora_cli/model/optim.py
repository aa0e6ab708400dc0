"""Per-slot AdamW over stacked LoRA parameters, and the learning-rate schedule.

Every parameter has shape (S, ...), one slice per slot. Each slot has its own lr, weight
decay, betas, eps, step count and gradient-norm clip, and the update for slot k is exactly
`torch.optim.AdamW` on that slot's slice. A slot that is not `active` in a step does not
change at all: no weight-decay drift, no moment decay, no step count.

On the CPU each active slot goes through torch's fused AdamW kernel (one call per slot, on
every parameter at once): bit-identical to `AdamW(fused=True)` on the adapter alone. On a
GPU the update is a handful of masked tensor ops over the whole stacks, AdamW's formula op
by op, whatever the number of slots (finding the active slots would be a host sync).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as LambdaLR would use."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


class SlotAdamW:
    """`params[i]` has shape (S, ...); `rank_dims[i]` is its LoRA-rank dimension.

    Rank entries below `frozen_rank[slot]` never change (O-LoRA keeps earlier tasks' LoRA
    frozen inside the same slot).
    """

    def __init__(self, params: list[torch.Tensor], num_slots: int, rank_dims: list[int]):
        self.params = params
        self.rank_dims = rank_dims
        self.num_slots = num_slots
        self.frozen_rank = torch.zeros(num_slots, dtype=torch.long)
        device = params[0].device
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

        def per_slot(value: float) -> torch.Tensor:
            return torch.full((num_slots,), value, dtype=torch.float64, device=device)

        self.steps = torch.zeros(num_slots, dtype=torch.long)
        self.weight_decay = per_slot(0.0)
        self.beta1 = per_slot(0.9)
        self.beta2 = per_slot(0.999)
        self.eps = per_slot(1e-8)
        self.max_grad_norm = per_slot(math.inf)
        # The update's form (see the module doc): fused kernel per slot, or masked over all slots.
        self.per_slot_fused = device.type == "cpu"
        # Each slot's views of the parameters and moments, made once (the tensors are only ever
        # updated in place): views cost more to make than the fused kernel takes on small slots.
        self.slot_views = [tuple([t[slot] for t in tensors] for tensors in (params, self.exp_avg, self.exp_avg_sq))
                           for slot in range(num_slots)]

    def reset_slot(
        self,
        slot: int,
        weight_decay: float,
        beta1: float,
        beta2: float,
        eps: float,
        max_grad_norm: float | None,
    ) -> None:
        """Fresh optimizer state for a new adapter in `slot`."""
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state[slot].zero_()
        self.steps[slot] = 0
        self.frozen_rank[slot] = 0
        self.weight_decay[slot] = weight_decay
        self.beta1[slot], self.beta2[slot], self.eps[slot] = beta1, beta2, eps
        self.max_grad_norm[slot] = math.inf if max_grad_norm is None else max_grad_norm

    def restart_moments(self, slot: int) -> None:
        """Zero a slot's moments and step count (a fresh optimizer for a fresh LoRA)."""
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state[slot].zero_()
        self.steps[slot] = 0

    def slot_state(self, slot: int) -> dict[str, object]:
        return {
            "exp_avg": [m[slot].clone() for m in self.exp_avg],
            "exp_avg_sq": [v[slot].clone() for v in self.exp_avg_sq],
            "step": int(self.steps[slot]),
            "frozen_rank": int(self.frozen_rank[slot]),
        }

    def load_slot_state(self, slot: int, state: dict[str, object]) -> None:
        for target, source in zip(self.exp_avg, state["exp_avg"]):  # type: ignore[call-overload]
            target[slot].copy_(source)
        for target, source in zip(self.exp_avg_sq, state["exp_avg_sq"]):  # type: ignore[call-overload]
            target[slot].copy_(source)
        self.steps[slot] = int(state["step"])  # type: ignore[call-overload]
        self.frozen_rank[slot] = int(state["frozen_rank"])  # type: ignore[call-overload]

    @torch.no_grad()
    def grad_norms(self, in_use: list[tuple[int, int, list[bool]]] | None = None) -> torch.Tensor:
        """The L2 norm of each slot's whole gradient, shape (S,).

        With `in_use` = [(slot, rank in use, whether each parameter belongs to the slot's
        adapter)], those slots' norms are computed as `clip_grad_norm_` computes them on the
        adapter's own unpadded tensors (the norm of the per-tensor norms), bit for bit; the
        default is one vectorized sum of squares over the padded stacks.
        """
        total = torch.zeros(self.num_slots, dtype=torch.float32, device=self.params[0].device)
        if in_use is None:
            for p in self.params:
                if p.grad is not None:
                    total += p.grad.float().pow(2).flatten(1).sum(1)
            return total.sqrt()
        # Per parameter, every slot's norm in one reduction: bit for bit the norm of the slot's
        # own contiguous tensor. Where the rank leads a slot's block (A), the block's zero
        # padding follows the adapter's entries and changes no rounding; where it does not (B:
        # zero columns between the entries), the slots' own columns are copied out first, one
        # copy per rank in use.
        device = total.device
        by_rank: dict[int, list[int]] = {}
        for slot, rank, _ in in_use:
            by_rank.setdefault(rank, []).append(slot)
        rank_groups = [(rank, torch.tensor(slots, device=device)) for rank, slots in by_rank.items()]
        per_parameter = []
        for p, rank_dim in zip(self.params, self.rank_dims):
            if p.grad is None:
                per_parameter.append(torch.zeros_like(total))
            elif rank_dim == 1:
                per_parameter.append(torch.linalg.vector_norm(p.grad.flatten(1), 2.0, dim=1))
            else:
                norms = torch.zeros_like(total)
                for rank, index in rank_groups:
                    own = p.grad.narrow(rank_dim, 0, rank).index_select(0, index)  # a gather: contiguous
                    norms[index] = torch.linalg.vector_norm(own.flatten(1), 2.0, dim=1)
                per_parameter.append(norms)
        table = torch.stack(per_parameter)  # (parameters, S)
        for slot, _, owned in in_use:
            rows = [i for i, (p, mine) in enumerate(zip(self.params, owned)) if mine and p.grad is not None]
            if rows:  # clip_grad_norm_: the norm of the per-tensor norms
                total[slot] = torch.linalg.vector_norm(table[rows, slot], 2.0)
        return total

    @torch.no_grad()
    def step(self, active: torch.Tensor, lrs: torch.Tensor, grad_norms: torch.Tensor) -> None:
        """One AdamW step for the slots where `active` (bool, (S,)) is true.

        `lrs` holds each slot's lr for this step; `grad_norms` comes from `grad_norms()`.
        Clipping matches `torch.nn.utils.clip_grad_norm_` per slot.
        """
        device = self.params[0].device
        active = active.to(device)
        self.steps += active.cpu().long()
        # clip_grad_norm_'s own fp32 arithmetic: max_norm / (norm + 1e-6), clamped to 1.
        clip = ((grad_norms.float() + 1e-6).reciprocal() * self.max_grad_norm.float()).clamp(max=1.0)
        if self.per_slot_fused:
            self._fused_step(active, lrs, clip)
            return
        # On a GPU, one masked update of the whole stacks, AdamW's formula op by op: no host
        # sync to find the active slots, and frozen O-LoRA ranks keep their values.
        any_frozen = bool(self.frozen_rank.any())
        step = self.steps.to(device=device, dtype=torch.float64).clamp(min=1)
        lrs = lrs.to(device=device, dtype=torch.float64)
        bias_correction1 = 1 - self.beta1**step
        bias_correction2_sqrt = (1 - self.beta2**step).sqrt()
        step_size = lrs / bias_correction1
        decay = 1 - lrs * self.weight_decay
        frozen = self.frozen_rank.to(device)
        for p, m, v, rank_dim in zip(self.params, self.exp_avg, self.exp_avg_sq, self.rank_dims):
            if p.grad is None:
                continue

            def col(t: torch.Tensor, like: torch.Tensor = p) -> torch.Tensor:
                return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

            grad = p.grad * col(clip)
            mask = col(active.float()).bool()
            if any_frozen:
                shape = [self.num_slots] + [1] * (p.dim() - 1)
                shape[rank_dim] = p.size(rank_dim)
                ranks = torch.arange(p.size(rank_dim), device=device).view(1, -1)
                mask = mask & (ranks >= frozen.view(-1, 1)).view(shape)
            new_p = p * col(decay)
            new_m = m.lerp(grad, col(1 - self.beta1))
            # AdamW's `v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)` as torch rounds it
            # (and 1 - beta2 in fp64: in fp32 it is off by 1e-5).
            new_v = (v * col(self.beta2)).addcmul(grad * col(1 - self.beta2), grad)
            denom = new_v.sqrt() / col(bias_correction2_sqrt) + col(self.eps)
            new_p = new_p - col(step_size) * new_m / denom
            p.copy_(torch.where(mask, new_p, p))
            m.copy_(torch.where(mask, new_m, m))
            v.copy_(torch.where(mask, new_v, v))

    def _fused_step(self, active: torch.Tensor, lrs: torch.Tensor, clip: torch.Tensor) -> None:
        """On the CPU: each active slot through torch's fused AdamW kernel, on its own slices.

        This is exactly `clip_grad_norm_` followed by `torch.optim.AdamW(fused=True)` on the
        adapter's own tensors: the kernel is elementwise, so the zero padding around a slot's
        rank is neither read into its update nor changed (zero weight, gradient and moments
        stay zero). One pass over memory instead of one per arithmetic op. Frozen O-LoRA
        ranks are put back as they were after the kernel has run over them.
        """
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        scales = clip.tolist()
        for slot in active.nonzero().flatten().tolist():
            params, exp_avgs, exp_avg_sqs = (views if len(with_grad) == len(views) else [views[i] for i in with_grad]
                                             for views in self.slot_views[slot])
            frozen = int(self.frozen_rank[slot])
            kept = [(view.narrow(self.rank_dims[i] - 1, 0, frozen), view.narrow(self.rank_dims[i] - 1, 0, frozen).clone())
                    for views in (params, exp_avgs, exp_avg_sqs) for i, view in zip(with_grad, views)] if frozen else []
            grads = [self.params[i].grad[slot] for i in with_grad]
            if scales[slot] < 1.0:  # as clip_grad_norm_ scales the gradients (by 1.0: no change)
                torch._foreach_mul_(grads, clip[slot])
            step = torch.tensor(float(self.steps[slot]))
            torch._fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, [], [step] * len(grads),
                lr=float(lrs[slot]), beta1=float(self.beta1[slot]), beta2=float(self.beta2[slot]),
                weight_decay=float(self.weight_decay[slot]), eps=float(self.eps[slot]), amsgrad=False, maximize=False,
            )
            for view, saved in kept:
                view.copy_(saved)
