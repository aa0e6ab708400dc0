"""Rows that share a prompt: the prompt goes through the model once, and each row continues on its KV cache.

A GRPO group is G completions of one prompt. Run as G full rows, the prompt's tokens go through
the model G times with the same result: the base and the adapter are the same for every row of
the group, and training rows have no dropout here. Shared, each group's prompt (its prefix) runs
once, left-padded with `use_cache`; the cache and the logits of the prefix's last position are
repeated to the group's rows; then every row's remaining tokens (its suffix: the sampled
completion) run on that cache, right-padded, with positions continuing the prefix's:

    prefix pass:  P prefixes x Lp tokens                 -> logits[:, -1] (P, V), cache (P, ..., Lp, ...)
    suffix pass:  R suffixes x Ls tokens on cache[group]  -> logits (R, Ls, V)
    row r's token j of its suffix is predicted by prefix logits[group[r], -1] (j = 0) or suffix logits[r, j-1]

These are the logits of the full rows at the positions that predict the suffix, so every loss and
gradient equals the full rows' up to float rounding (the repeat's backward sums the group's
gradients into the shared prefix). The work falls from R x (Lp + Ls) tokens to P x Lp + R x Ls:
with G = 6 and prompts as long as completions, about 40% less. Prefix Grouper
(https://arxiv.org/abs/2506.05433) shares the prefix of GRPO groups the same way; vLLM's prefix
cache does it for sampling.

The caller decides where it applies, adapter by adapter (`model.share_prompts`; supervised rows,
rows with dropout or an LwF teacher, and trained spans inside the prompt take the full rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlora_cli.data.batches import IGNORE, Row, to_device
from mlora_cli.model.base import cache_argument, last_position_only, model_cache
from mlora_cli.model.routing import on_device


@dataclass(frozen=True)
class SharedRows:
    """Rows laid out as groups that share a prefix (consecutive rows of a part whose prompts are equal)."""

    prefixes: list[tuple[int, ...]]  # one per group
    group_of_row: list[int]
    suffixes: list[tuple[int, ...]]  # each row's tokens after its group's prefix
    first_label: list[int]  # per row: the first suffix position that carries loss (the completion's start)
    groups_per_part: list[int]  # groups of each part, in part order (the prefix pass's routing)
    rows_per_part: list[int]


def shared_rows(parts: Sequence[Sequence[Row]]) -> SharedRows:
    """Group each part's consecutive rows by prompt: a row joins the current group when its tokens start with
    the group's prompt and that prompt carries no loss in it (a cut completion whose whole row is prompt still
    joins: its suffix carries none)."""
    prefixes: list[tuple[int, ...]] = []
    group_of_row, suffixes, first_label, groups_per_part = [], [], [], []
    for rows in parts:
        groups = 0
        for i, row in enumerate(rows):
            prefix = prefixes[-1] if prefixes else ()
            joins = (i > 0 and row.prompt_len >= len(prefix) and row.ids[:len(prefix)] == prefix)
            if not joins:
                prefix = row.ids[:row.prompt_len]
                prefixes.append(prefix)
                groups += 1
            group_of_row.append(len(prefixes) - 1)
            suffixes.append(row.ids[len(prefix):])
            first_label.append(row.prompt_len - len(prefix))
        groups_per_part.append(groups)
    return SharedRows(prefixes, group_of_row, suffixes, first_label, groups_per_part, [len(rows) for rows in parts])


def shares_prompts(rows: Sequence[Row]) -> bool:
    """Whether one adapter's rows form groups that share a non-empty prompt (a sampled group of two or more), and
    train nothing inside their prompts (a conversation's earlier turns do)."""
    if any(row.trained or not row.prompt_len for row in rows):
        return False
    return len(shared_rows([rows]).prefixes) < len(rows)


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token ids, attention mask and positions of `sequences`, left-padded to the longest (built on the host,
    copied without waiting)."""
    length = max(map(len, sequences))
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        ids[i, length - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        mask[i, length - len(sequence):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return to_device(ids, device), to_device(mask, device), to_device(positions, device)


def right_padded_suffixes(layout: SharedRows, pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each row's suffix right-padded: token ids, attention mask, and targets (IGNORE before the row's completion
    and on padding)."""
    length = max(1, max(map(len, layout.suffixes)))
    suffix = torch.full((len(layout.suffixes), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(suffix)
    targets = torch.full_like(suffix, IGNORE)
    for r, (tokens, first) in enumerate(zip(layout.suffixes, layout.first_label)):
        suffix[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[r, :len(tokens)] = 1
        targets[r, first:len(tokens)] = suffix[r, first:len(tokens)]
    return to_device(suffix, device), to_device(mask, device), to_device(targets, device)


def suffix_logits(engine: Any, layout: SharedRows, slots: Sequence[int], pad_id: int,
                  routed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of every row's suffix: logits[r, j] predicts targets[r, j], which is IGNORE before the
    row's completion and on padding. Each part's rows run through its slot (`routed` False: the base alone).
    Every input is on its way to the device before the first forward, so the step never waits for a copy."""
    device = engine.device
    ids, mask, positions = left_padded(layout.prefixes, pad_id, device)
    suffix, suffix_mask, targets = right_padded_suffixes(layout, pad_id, device)
    groups = on_device(layout.group_of_row, device)
    prefix_mask = mask[groups]
    suffix_positions = prefix_mask.sum(1, keepdim=True) + torch.arange(suffix.size(1), device=device)
    with engine.routed(*((slots, layout.groups_per_part) if routed else ([], []))):
        prefix = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                              **last_position_only(engine.model))  # only its last position predicts a row's token
    cache = model_cache(prefix)
    cache.batch_select_indices(groups)  # each row gets its group's cache (an indexing op: autograd sums back)
    with engine.routed(*((slots, layout.rows_per_part) if routed else ([], []))):
        output = engine.model(input_ids=suffix, attention_mask=torch.cat([prefix_mask, suffix_mask], 1),
                              position_ids=suffix_positions, **{cache_argument(engine.model): cache})
    logits = torch.cat([prefix.logits[:, -1:][groups], output.logits[:, :-1]], 1)
    return logits, targets
