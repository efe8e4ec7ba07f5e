"""int4 quality: perplexity on held-out text of a small model trained here, fp32 against int8 and int4.

    .venv/bin/python bench/int4_quality.py [--steps 150]

Trains a small shape (dim 128, 2 layers, ffn 384, vocab 16,008; every input width a multiple of 64) from scratch with AdamW on this
repository's documentation (README.md, docs/*.md except ARCHITECTURE.md, bench/README.md), tokenized with the demo
tokenizer, then measures perplexity on docs/ARCHITECTURE.md (never trained on) for the fp32 model and for its
int8, int4 group-64 and int4 group-32 quantizations (`quantize_model`, the kernels the CLI uses). A few minutes on
2 cores. The trained model is tiny and memorises its corpus; what the figure shows is how much quantization moves
a model that has learnt something, against fp32, on text it has not seen.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aquila.checkpoint import build_model  # noqa: E402
from aquila.config import ModelArgs  # noqa: E402
from aquila.inference.int4 import prepare_int4  # noqa: E402
from aquila.inference.quantize import quantize_model  # noqa: E402
from aquila.tokenizer import Tokenizer  # noqa: E402


def ids_of(tok: Tokenizer, paths: list[Path]) -> torch.Tensor:
    return torch.tensor([i for p in paths for i in tok.encode(p.read_text())], dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq - 1, seq):
        chunk = ids[start : start + seq + 1]
        logits = model(chunk[None, :-1])["logits"].float()
        total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += seq
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(ROOT / "examples" / "aquila" / "demo_tokenizer")
    held_out = [ROOT / "docs" / "ARCHITECTURE.md"]
    train_files = [ROOT / "README.md", ROOT / "bench" / "README.md"]
    train_files += [p for p in sorted((ROOT / "docs").glob("*.md")) if p not in held_out]
    train, test = ids_of(tok, train_files), ids_of(tok, held_out)
    margs = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=64, max_seq_len=args.seq)
    model = build_model(margs, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    t = time.perf_counter()
    for step in range(args.steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        batch = torch.stack([train[s : s + args.seq + 1] for s in starts])
        logits = model(batch[:, :-1])["logits"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    model.eval()
    print(f"\ntrain tokens {len(train)}, held-out tokens {len(test)} (docs/ARCHITECTURE.md), seq {args.seq}")
    ref = perplexity(model, test, args.seq)
    print("| weights | held-out perplexity | vs fp32 |\n|---|---:|---:|")
    print(f"| fp32 | {ref:.2f} | 1.000 |")
    variants = {
        "int8 (per channel)": dict(bits=8),
        "int4 group 64": dict(bits=4, group_size=64),
        "int4 group 32": dict(bits=4, group_size=32),
    }
    for name, kw in variants.items():
        q = prepare_int4(quantize_model(copy.deepcopy(model), **kw))
        ppl = perplexity(q, test, args.seq)
        print(f"| {name} | {ppl:.2f} | {ppl / ref:.3f} |", flush=True)


if __name__ == "__main__":
    main()
