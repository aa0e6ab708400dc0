"""Batched ops where they round as the per-adapter ones: the CPU path's batched LoRA term and norms.

On the CPU a LoRA matmul of one adapter's rows is tiny (24 x 256 x 8 in a decode step), and most of
what it costs is the call, not the arithmetic: `torch.bmm` over 8 adapters' groups takes 0.2-0.5 of
the time of their 8 `mm` calls here. But the per-group `mm` is what an adapter trained alone makes
(PEFT's `linear`), and co-training must give each adapter those numbers bit for bit. MKL rounds
`bmm` as it rounds `mm` for most shapes and differently for some (here: an inner dimension of 1024
with 24 or more rows, where `mm` splits the sum between threads), and which ones depends on the
machine, the library build and the thread count, so it cannot be listed in advance.

So `bmm_or_loop` checks, once per shape class, which batched way gives exactly the bits of each group's
`mm` on its own operands (as the adapter alone has them: its own tensors, at the allocator's alignment,
in the same layout), on random operands laid out as the real ones (same shapes, strides and alignment,
same thread count and matmul settings; rounding depends on the order of the sums, which depends on
those and not on the values), and uses it for that class from then on, or the per-group loop where
none does. The ways, tried in order:

- `bmm`: one call over the groups;
- `split`: where `mm` splits the inner dimension between its threads (each thread sums its part, then
  the parts are added), the same split as one `bmm` per part, added in order. Here `mm` does that for
  an inner dimension of 1024 with 2 threads, and the split costs 0.55 of the loop (192 rows a group).

A check costs one product per way tried and one loop of the same size, once per process and class (a
decode step's classes repeat every step; a training step makes one per padded length).

`row_norms_are_exact` does the same for the gradient norms of clipping: one `vector_norm(dim=1)` over
every slot's block of a stacked gradient, where it gives each row the bits of `clip_grad_norm_`'s
norm of that block as its own tensor.
"""

from __future__ import annotations

import torch

# (shape class) -> the batched way that rounds as the per-group mm there, or None; filled on first use.
_EXACT: dict[tuple[object, ...], str | None] = {}
_EXACT_NORMS: dict[tuple[object, ...], bool] = {}  # the same for row norms
_ALIGNMENT = 64  # bytes: torch's CPU allocator's alignment, the widest a kernel could care about
_MKLDNN = torch.backends.mkldnn.is_available()  # whether torch was built with oneDNN (its use can be switched off)


def bmm_or_loop(left: torch.Tensor, right: torch.Tensor, loop: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """(G, m, n) = left (G, m, k) @ right (G, k, n) per group, with each group's result bit-identical to the `mm` of
    its own operands (`_own`): one batched way where one was checked to give that for this shape class (module
    doc), else (or with `loop`) those `mm` calls. Written into `out` (contiguous, (G, m, n)) if given."""
    if not loop:
        batched = exact_bmm(left, right, out)
        if batched is not None:
            return batched
    result = left.new_empty(left.size(0), left.size(1), right.size(2)) if out is None else out
    for group in range(left.size(0)):
        result[group] = _own(left[group]).mm(_own(right[group]))
    return result


def exact_bmm(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """`left @ right` per group by the batched way that rounds as each group's own `mm` (into `out` if given), or
    None where none does (the caller then makes the groups' products its own way)."""
    way = exact_way(left, right, out)
    return None if way is None else _batched(way, left, right, out)


def exact_way(left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None) -> str | None:
    """The first batched way (`bmm`, `split`; module doc) that gives each group of `left @ right` (into `out` if
    given) the bits of the `mm` of its own operands; None if none does. Checked once per shape class."""
    # Looked up for every batched matmul (a decode step makes hundreds): kept to cheap calls.
    key = (left.dtype, right.dtype, torch.get_num_threads(), torch.get_float32_matmul_precision(),
           _MKLDNN and torch._C._get_mkldnn_enabled(), left.shape, left.stride(), left.data_ptr() % _ALIGNMENT,
           right.shape, right.stride(), right.data_ptr() % _ALIGNMENT,
           None if out is None else out.data_ptr() % _ALIGNMENT)
    if key not in _EXACT:
        _EXACT[key] = None
        with torch.no_grad():
            sample_left, sample_right = _random_like(left), _random_like(right)
            sample_out = None if out is None else _random_like(out)
            alone = [_own(sample_left[g]).mm(_own(sample_right[g])) for g in range(left.size(0))]
            for way in _ways(left.size(2)):
                batched = _batched(way, sample_left, sample_right, sample_out)
                if all(torch.equal(batched[g], product) for g, product in enumerate(alone)):
                    _EXACT[key] = way
                    break
    return _EXACT[key]


def _ways(inner: int) -> list[str]:
    """The batched ways worth trying for an inner dimension `inner` (module doc)."""
    threads = torch.get_num_threads()
    return ["bmm", "split"] if threads > 1 and inner % threads == 0 and inner >= 2 * threads else ["bmm"]


def _batched(way: str, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`left @ right` per group the batched `way` (module doc), into `out` if given."""
    if way == "bmm":
        return torch.bmm(left, right) if out is None else torch.bmm(left, right, out=out)
    part = left.size(2) // torch.get_num_threads()
    pieces = [(left[:, :, start : start + part], right[:, start : start + part])
              for start in range(0, left.size(2), part)]
    result = torch.bmm(*pieces[0]) if out is None else torch.bmm(*pieces[0], out=out)
    for piece in pieces[1:]:
        result.add_(torch.bmm(*piece))
    return result


def row_norms_are_exact(rows: torch.Tensor) -> bool:
    """Whether `torch.linalg.vector_norm(rows, 2.0, dim=1)` gives each row of `rows` (G, n) the bits of
    `torch._foreach_norm` (what `clip_grad_norm_` uses) on that row as its own tensor."""
    key = (rows.dtype, torch.get_num_threads(), *_layout(rows))
    exact = _EXACT_NORMS.get(key)
    if exact is None:
        with torch.no_grad():
            sample = _random_like(rows)
            together = torch.linalg.vector_norm(sample, 2.0, dim=1)
            alone = torch._foreach_norm([_own(row) for row in sample], 2.0)
            exact = all(torch.equal(together[g], norm) for g, norm in enumerate(alone))
        _EXACT_NORMS[key] = exact
    return exact


def _layout(tensor: torch.Tensor) -> tuple[object, ...]:
    return tensor.shape, tensor.stride(), tensor.data_ptr() % _ALIGNMENT


def _own(operand: torch.Tensor) -> torch.Tensor:
    """One group's operand as the adapter alone has it (PEFT's weight, activation or gradient: its own tensor, so
    at the allocator's alignment), in the same layout: itself if it lies so, else a copy that does."""
    if operand.data_ptr() % _ALIGNMENT == 0:
        return operand
    return operand.clone(memory_format=torch.preserve_format)


def _random_like(tensor: torch.Tensor) -> torch.Tensor:
    """Normal noise with `tensor`'s shape, strides and alignment (the tensor may be a strided view)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    shift = (tensor.data_ptr() % _ALIGNMENT) // tensor.element_size()
    noise = torch.Generator(device=tensor.device).manual_seed(0)  # not the global generator: no draw of a run moves
    storage = torch.randn(span + shift, dtype=tensor.dtype, device=tensor.device, generator=noise)
    assert storage.data_ptr() % _ALIGNMENT == 0  # so the view's alignment is the tensor's
    return storage.as_strided(tensor.shape, tensor.stride(), shift)
