"""Sampling completions for reinforcement learning: every adapter's prompts x group in one batched pass.

All rows (each adapter's prompts, each repeated `group_size` times) form one batch; each
group's prompt is prefilled once through the fused engine (left-padded, each adapter's prompts
through its own LoRA) and its KV cache repeated to the group's rows (`model.share_prompts`;
false: every row prefills its own copy), then one token per step is decoded from the KV cache
until every row has ended; a row that ends (end-of-sequence or its `max_new_tokens`) leaves the batch and its cache at
once, so long completions do not keep short ones' rows in every later step.
Each row samples with its adapter's temperature and top-p, and with its own noise: the
Gumbel-max trick, `argmax(logits / T + g)` with `g = -log(-log(u))` and `u` drawn from a
generator seeded by `seeds.rl_sample(adapter seed, step, prompt, sample)`, which samples
exactly from softmax(logits / T) (restricted to the top-p set). So a row's completion depends
on its adapter and its counters only, never on its neighbours or their padding. The generators
live on the engine's device: a run samples the same on every rerun on that kind of device, but a
GPU's generators (Philox) draw other numbers than the CPU's (Mersenne Twister).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from mlora_cli.data.batches import Row
from mlora_cli.model.base import cache_argument, last_position_only, model_cache
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.prompt_sharing import left_padded
from mlora_cli.model.routing import on_device


@dataclass
class RolloutRequest:
    slot: int
    prompts: list[Row]  # one per group; each is sampled `group_size` times
    group_size: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seeds: list[int]  # one per sampled row, prompt-major (prompt 0's samples first)


@dataclass
class Rollout:
    rows: list[Row]  # prompt + completion (+ end-of-sequence when it ended), loss on the completion
    completion_ids: list[list[int]]  # the sampled tokens, end-of-sequence excluded (the caller decodes them)
    truncated: list[bool]  # cut at max_new_tokens without ending


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """Per row, -inf outside the smallest set of tokens whose probability reaches the row's top_p (None: no
    row filters; the caller knows from its host numbers, so no per-token read of a device tensor)."""
    if top_p is None:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(1)  # a token is kept while the mass before it is short
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


def perturbed_scores(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor | None,
                     generators: list[torch.Generator]) -> torch.Tensor:
    """`logits / T` restricted to the top-p set, plus Gumbel noise: the argmax of each row is its sample.

    Noise is drawn from each row's own generator, on the generators' device (the logits'): one draw
    of a vocabulary's worth per token the row samples (finished rows have left the batch). On a GPU
    it never touches the host: drawn there and sent over, 256 rows of a 150k vocabulary would be
    ~40M host random numbers and 155 MB of copies per decoded token. The sequential baseline calls
    this from a `generate` logits processor, so both sample with the same arithmetic.
    """
    filtered = _top_p_filter(logits.float() / temperature, top_p)
    vocab = filtered.size(-1)
    uniform = torch.stack([torch.rand(vocab, generator=g, device=g.device) for g in generators])
    return filtered - torch.log(-torch.log(uniform.clamp(min=1e-20, max=1 - 1e-7)))


@torch.no_grad()
def sample(engine: MultiLoraModel, requests: list[RolloutRequest], pad_id: int, eos_id: int) -> list[Rollout]:
    """One Rollout per request, its rows prompt-major (prompt 0's group first)."""
    groups = [row.ids[: row.prompt_len] for r in requests for row in r.prompts]
    group_of_row = [g for g, size in enumerate(r.group_size for r in requests for _ in r.prompts) for _ in range(size)]
    prompts = [groups[g] for g in group_of_row]
    counts = [len(r.prompts) * r.group_size for r in requests]
    per_row = [(r.temperature, r.top_p, r.max_new_tokens) for r, n in zip(requests, counts) for _ in range(n)]
    device = engine.device
    generators = [torch.Generator(device=device).manual_seed(seed) for r in requests for seed in r.seeds]
    # The prefill: each group's prompt once, its cache then repeated to the group's rows (model.share_prompts).
    share = engine.share_prompts
    input_ids, mask, positions = left_padded(groups if share else prompts, pad_id, device)
    prefill = [(r.slot, len(r.prompts) * (1 if share else r.group_size)) for r in requests if r.prompts]
    with engine.routed([slot for slot, _ in prefill], [rows for _, rows in prefill]):
        output = engine.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              **last_position_only(engine.model))
    cache, logits = model_cache(output), output.logits[:, -1]
    if share:
        rows = on_device(group_of_row, device)
        cache.batch_select_indices(rows)
        logits, mask, positions = logits[rows], mask[rows], positions[rows]
    temperature = torch.tensor([t for t, _, _ in per_row], device=device).unsqueeze(1)
    nucleus = any(p < 1.0 for _, p, _ in per_row)
    top_p = torch.tensor([p for _, p, _ in per_row], device=device) if nucleus else None
    limit = [n for _, _, n in per_row]
    slot_of_row = [r.slot for r, n in zip(requests, counts) for _ in range(n)]
    cache_arg = cache_argument(engine.model)
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # rows still sampling, in batch order
    step_positions = positions[:, -1:]
    while True:
        scores = perturbed_scores(logits, temperature, top_p, [generators[i] for i in active])
        for i, token in zip(active, scores.argmax(-1).tolist()):
            generated[i].append(token)
        keep = [k for k, i in enumerate(active) if generated[i][-1] != eos_id and len(generated[i]) < limit[i]]
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch (and its KV cache) at once
            kept = on_device(keep, mask.device)
            cache.batch_select_indices(kept)
            mask, step_positions, temperature = mask[kept], step_positions[kept], temperature[kept]
            top_p = top_p[kept] if top_p is not None else None
            active = [active[k] for k in keep]
        step_input = torch.tensor([[generated[i][-1]] for i in active], device=device)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        step_positions = step_positions + 1
        runs = [(slot, len(list(rows))) for slot, rows in itertools.groupby(slot_of_row[i] for i in active)]
        with engine.routed([slot for slot, _ in runs], [count for _, count in runs]):
            output = engine.model(input_ids=step_input, attention_mask=mask, position_ids=step_positions,
                                  use_cache=True, **{cache_arg: cache})
        cache, logits = model_cache(output), output.logits[:, -1]
    return as_rollouts(requests, prompts, generated, eos_id)


def as_rollouts(requests: list[RolloutRequest], prompts: list[tuple[int, ...]], generated: list[list[int]],
                eos_id: int) -> list[Rollout]:
    """One Rollout per request from the sampled tokens of its rows (prompt-major; each may end with eos)."""
    out, start = [], 0
    for request in requests:
        size = len(request.prompts) * request.group_size
        rows, completion_ids, truncated = [], [], []
        for k in range(size):
            prompt, tokens = prompts[start + k], generated[start + k]
            reference = request.prompts[k // request.group_size]
            rows.append(Row(ids=tuple(prompt) + tuple(tokens), prompt_len=len(prompt),
                            completion=reference.completion, prompt=reference.prompt))
            completion_ids.append(tokens[:-1] if tokens and tokens[-1] == eos_id else tokens)
            truncated.append(not tokens or tokens[-1] != eos_id)
        out.append(Rollout(rows, completion_ids, truncated))
        start += size
    return out
