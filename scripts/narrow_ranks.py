"""Why small LoRA ranks cost more than their share on the CPU, and which ways around it keep PEFT's bits.

    python scripts/narrow_ranks.py [THREADS]      # default: all cores

For the LoRA matmuls whose output has the rank as its width (the forward's x @ A^T, the backward's
grad^T @ hidden for B and grad @ B for the hidden state), on the shapes of `builtin:tiny`
(256 -> 256, 256 -> 1024, 1024 -> 256) and 92 / 184 / 736 rows:

1. time, per rank, one such matmul of 2 groups x 92 rows as one `bmm` (the fused path's run of two
   adapters), showing the narrow kernel MKL takes for 8 or fewer columns;
2. check, for every rank 1-32, whether two ways of making the product faster give each column the
   bits of the plain `mm` (what PEFT computes for the adapter alone): zero-padding the rank to the next
   multiple of 16 (or 8), and computing the transposed product.

docs/benchmark.md quotes a run of it. Timing is the median of 300 calls after a warm-up.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections import defaultdict

import torch

SHAPES = ((256, 256), (256, 1024), (1024, 256))


def median_us(run, calls: int = 300) -> float:
    for _ in range(20):
        run()
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds) * 1e6


def narrow_products_us(d_in: int, d_out: int, rank: int) -> dict[str, float]:
    """Each rank-wide LoRA matmul of 2 groups x 92 rows as one `bmm`, us."""
    x, a = torch.randn(2, 92, d_in), torch.randn(2, rank, d_in)
    grad, b, hidden = torch.randn(2, 92, d_out), torch.randn(2, d_out, rank), torch.randn(2, 92, rank)
    return {"x @ A^T": median_us(lambda: torch.bmm(x, a.transpose(1, 2))),
            "grad^T @ hidden (B's gradient)": median_us(lambda: torch.bmm(grad.transpose(1, 2), hidden)),
            "grad @ B (hidden's gradient)": median_us(lambda: torch.bmm(grad, b))}


def products(rows: int, d_in: int, d_out: int, rank: int, width: int, noise: torch.Generator) -> dict[str, bool]:
    """Whether each faster way gives the plain `mm`'s bits, for one shape (`width`: the padded rank)."""
    x, a = torch.randn(rows, d_in, generator=noise), torch.randn(rank, d_in, generator=noise)
    grad, b = torch.randn(rows, d_out, generator=noise), torch.randn(d_out, rank, generator=noise)
    hidden = torch.randn(rows, rank, generator=noise)
    a_wide, b_wide, hidden_wide = torch.zeros(width, d_in), torch.zeros(d_out, width), torch.zeros(rows, width)
    a_wide[:rank], b_wide[:, :rank], hidden_wide[:, :rank] = a, b, hidden
    return {
        "x @ A^T padded": torch.equal(x.mm(a.t()), x.mm(a_wide.t())[:, :rank]),
        "grad^T @ hidden padded": torch.equal(grad.t().mm(hidden), grad.t().mm(hidden_wide)[:, :rank]),
        "grad @ B padded": torch.equal(grad.mm(b), grad.mm(b_wide)[:, :rank]),
        "x @ A^T transposed": torch.equal(x.mm(a.t()), a.mm(x.t()).t()),
        "grad^T @ hidden transposed": torch.equal(grad.t().mm(hidden), hidden.t().mm(grad).t()),
    }


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"{threads} threads; one bmm of 2 groups x 92 rows, us (rank in columns):")
    ranks = (4, 8, 12, 15, 16, 32)
    print("matmul".ljust(34) + "".join(f"r{r}".rjust(8) for r in ranks))
    for d_in, d_out in SHAPES:
        timed = [narrow_products_us(d_in, d_out, rank) for rank in ranks]
        for name in timed[0]:
            print(f"{d_in}->{d_out} {name}".ljust(34) + "".join(f"{t[name]:8.0f}" for t in timed))
    print("\nexact (every column's bits as the plain mm) over 3 shapes x 3 row counts, by rank:")
    verdicts: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for (d_in, d_out), rank, rows_ in itertools.product(SHAPES, range(1, 33), (92, 184, 736)):
        width = 8 if rank < 8 else -(-rank // 16) * 16
        if width == rank:
            continue
        noise = torch.Generator().manual_seed(rank * 1000 + rows_)
        for way, exact in products(rows_, d_in, d_out, rank, width, noise).items():
            verdicts[(way, rank)].append(exact)
    for way in dict.fromkeys(way for way, _ in verdicts):
        always = [r for (w, r), v in verdicts.items() if w == way and all(v)]
        never = [r for (w, r), v in verdicts.items() if w == way and not any(v)]
        print(f"  {way} (padded: to 8 below rank 8, else to the next multiple of 16):\n"
              f"    exact at ranks {always}\n    never at ranks {never}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
