"""Decode at batch 1, medium model, eager fp32, through a given source tree: for old-vs-new comparisons.

    .venv/bin/python bench/ab_decode.py /path/to/old/tree     # e.g. `git archive main | tar -x -C /tmp/old`
    .venv/bin/python bench/ab_decode.py .

Uses that tree's `bench/generate.py` (`ours`, `measure`: TTFT = a 1-token call, decode rate from 32 vs 1 tokens,
best of 3), once with wall-clock time and once with this process's CPU time (steadier on a shared machine). Run
the trees interleaved (A B A B) and compare pairs only.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
sys.path[:0] = [root, os.path.join(root, "bench")]

import generate as g  # noqa: E402
import torch  # noqa: E402

from aquila.checkpoint import build_model  # noqa: E402

args = g.MODELS["medium (d512 L8, vocab 100008, 306 MB)"]
model = build_model(args, seed=0).eval()
torch.manual_seed(0)
prompts = [torch.randint(1, args.vocab_size, (16,)).tolist()]
out = []
for clock in ("wall", "cpu"):
    g.clock = g.CLOCK[clock]
    ttft, tps = g.measure(g.ours(model, prompts, False), 1, 32, 3)
    out.append(f"{clock}: TTFT {ttft * 1e3:.1f} ms, decode {tps:.1f} tok/s ({1e3 / tps:.1f} ms/token)")
print(root, "|", "; ".join(out), "|", g.load())
