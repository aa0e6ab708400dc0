"""Pretrain `builtin:tiny`: the small Llama that ships inside mlora, so LoRA has something to adapt.

    python scripts/pretrain_tiny.py                 # writes mlora_cli/model/weights/tiny.safetensors
    python scripts/pretrain_tiny.py --steps 200 --out /tmp/tiny.safetensors   # a quick try

Architecture: `builtin:tiny-random` (Llama, hidden 256, 4 layers, 4 heads, intermediate
1024, the 100-token character tokenizer), initialised from its fixed seed, then trained as
a plain causal LM (loss on every token) on a corpus of two halves:

- English prose that ships with Python itself: `pydoc_data.topics`, the text of the
  language reference behind `help()` (~465k characters), cut into random windows. It
  teaches characters, words and spacing, and copying from context (induction).
- Generic sequence games over lowercase letters and digits, several to a window, one per
  line ended by the end-of-sequence token: echo, mirror, order, rot-k for every k, twice,
  drop-vowels, first/last half, and numbers summed, each in three written forms
  (`mirror(abc) -> cba`, `mirror: abc | cba`, `[mirror] abc >> cba`).

The builtin tasks (`copy abc=`, `reverse abc=`, ...) are deliberately *not* in the corpus:
their words and their `prefix input=` shape never occur, so the base scores ~0 on them
zero-shot. What it has are the skills behind them under other names and forms, as a real
pretrained model has general skills and no knowledge of your task format; a LoRA adapter
then learns the mapping (the prefix word, the `=`, stopping at end-of-sequence) in tens of
steps, and plain fine-tuning on one task overwrites the previous mapping: forgetting.

Reproducibility: fixed seeds, data drawn from one `random.Random`, 2 torch threads. On the
machine it was made on (2-core AMD EPYC, torch 2.13.0+cpu, Python 3.11.7) a rerun writes
the same file (same SHA-256); other CPUs, thread counts or torch versions round
differently and give a slightly different (equally usable) model. Wall time there:
see WALL_TIME below. The weights are stored in bfloat16 (~8.4 MB); `load_base` checks
their SHA-256 and runs them in the sweep's `model.dtype` (float32 by default).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import string
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlora_cli.model.base import CHARACTERS, build_builtin  # noqa: E402

WALL_TIME = "865 s (14.5 min) for the default 1500 steps on 2 idle cores; a rerun wrote the same SHA-256"
DEFAULT_OUT = ROOT / "mlora_cli" / "model" / "weights" / "tiny.safetensors"
LETTERS = string.ascii_lowercase
VOWELS = set("aeiou")


def prose_corpus() -> str:
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    allowed = set(CHARACTERS)
    return "".join(c for c in text if c in allowed)


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(1, 10)))


def _rot(text: str, k: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in text)


def game(rng: random.Random) -> str:
    """One sequence-game line: an operation's name, its input and its output, in one of three forms."""
    kind = rng.randrange(9)
    x = _word(rng)
    if kind == 0:
        name, y = "echo", x
    elif kind == 1:
        name, y = "mirror", x[::-1]
    elif kind == 2:
        name, y = "order", "".join(sorted(x))
    elif kind == 3:
        k = rng.randint(1, 25)
        name, y = f"rot{k}", _rot(x, k)
    elif kind == 4:
        name, y = "twice", x + x
    elif kind == 5:
        name, y = "consonants", "".join(c for c in x if c not in VOWELS)
    elif kind == 6:
        name, y = "head", x[: (len(x) + 1) // 2]
    elif kind == 7:
        name, y = "tail", x[len(x) // 2 :]
    else:
        a, b = rng.randrange(10 ** rng.randint(1, 5)), rng.randrange(10 ** rng.randint(1, 5))
        name, x, y = "total", f"{a} {b}", str(a + b)
    form = rng.randrange(3)
    if form == 0:
        return f"{name}({x}) -> {y}"
    if form == 1:
        return f"{name}: {x} | {y}"
    return f"[{name}] {x} >> {y}"


class Corpus:
    """Windows of `length` token ids: half prose, half sequence games (one per line, each ended by eos)."""

    def __init__(self, tokenizer, length: int, seed: int):
        self.tokenizer = tokenizer
        self.length = length
        self.rng = random.Random(seed)
        self.prose = tokenizer(prose_corpus(), add_special_tokens=False)["input_ids"]

    def window(self) -> list[int]:
        if self.rng.random() < 0.5:
            start = self.rng.randrange(len(self.prose) - self.length)
            return self.prose[start : start + self.length]
        ids: list[int] = []
        while len(ids) < self.length:
            ids += self.tokenizer(game(self.rng), add_special_tokens=False)["input_ids"]
            ids.append(self.tokenizer.eos_token_id)
        return ids[: self.length]

    def batch(self, rows: int) -> torch.Tensor:
        return torch.tensor([self.window() for _ in range(rows)], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--length", type=int, default=96, help="tokens per window")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = build_builtin("builtin:tiny-random")
    model.train()
    corpus = Corpus(tokenizer, args.length, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:  # linear warmup, then cosine to a tenth
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.perf_counter()
    for step in range(args.steps):
        ids = corpus.batch(args.batch)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {schedule.get_last_lr()[0]:.2e}  {elapsed:7.1f} s",
                  flush=True)

    state = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata key only: safetensors writes a metadata mapping in no fixed order, and the
    # file's SHA-256 must not depend on it.
    save_file(state, str(args.out), metadata={"format": "pt"})
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) sha256 {digest} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
