"""Part `trainer` of bench/gpu_check.py: the real `aquila pretrain` (env_type fsdp) in bf16 and fp16.

Each precision: run A trains N iterations from a tiny YAML and saves at N/2 and N; run B resumes from A's
checkpoint N/2 into a new save_dir and trains to N. B's losses for iterations N/2+1..N must equal A's. The row
names the mixed-precision mechanism the trainer logged (the fsdp backend: FSDP2 MixedPrecisionPolicy, no autocast).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_common import ROOT, Budget, row


def synthetic_dataset(prefix: Path, vocab: int, docs: int = 400) -> str:
    """Documents with a learnable pattern (token t+1 = t + 1 mod vocab) so the loss visibly falls."""
    import numpy as np

    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with MMapIndexedDatasetBuilder(prefix, np.int32) as b:
        for _ in range(docs):
            start = int(rng.integers(0, vocab))
            b.add_document((start + np.arange(int(rng.integers(100, 600)))) % vocab)
        b.finalize()
    return str(prefix)


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def pretrain(yaml_path: Path, log: Path, timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "aquila", "pretrain", "--yaml_config", str(yaml_path)]
    with open(log, "w") as out:
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env=env)
    if res.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
        last = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1])
        raise RuntimeError(f"aquila pretrain exit status {res.returncode}: {last.strip()[:200]}")


def precision_logged(log: Path) -> str:
    """The mechanism from the trainer's start line (`... | precision FSDP2 MixedPrecisionPolicy(...) | ...`)."""
    found = re.search(r"\| precision (.+?) \|", log.read_text(errors="replace"))
    return found.group(1) if found else "precision not logged"


def train_losses(save_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, loss scale) from metrics.jsonl."""
    out = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = (rec["loss"], rec["loss_scale"])
    return out


def run_precision(base: dict, precision: str, work: Path, iters: int, budget: Budget) -> None:
    half = iters // 2
    name = f"trainer fsdp {precision} {iters} it + resume"
    cfg = {**base, "bf16": precision == "bf16", "fp16": precision == "fp16", "max_steps": iters}
    run_a, run_b = work / f"{precision}-a", work / f"{precision}-b"
    t0 = time.perf_counter()
    pretrain(write_yaml(work / f"{precision}-a.yaml", {**cfg, "save_dir": str(run_a)}), work / f"{precision}-a.log",
             budget.left())  # fmt: skip
    seconds = time.perf_counter() - t0
    how = precision_logged(work / f"{precision}-a.log")
    for step in (half, iters):
        if not (run_a / str(step) / "pytorch_model.bin").is_file():  # a save_interval step: FlagAI's full weights
            raise RuntimeError(f"checkpoint {run_a / str(step)} has no pytorch_model.bin")
    a = train_losses(run_a)
    resumed = {**cfg, "save_dir": str(run_b), "load_dir": str(run_a / str(half))}
    pretrain(write_yaml(work / f"{precision}-b.yaml", resumed), work / f"{precision}-b.log", budget.left())
    b = train_losses(run_b)
    steps = range(half + 1, iters + 1)
    missing = [s for s in steps if s not in a or s not in b]
    if missing:
        raise RuntimeError(f"metrics.jsonl lacks iterations {missing[:5]}")
    diff = max(abs(a[s][0] - b[s][0]) for s in steps)
    same_scale = all(a[s][1] == b[s][1] for s in steps)
    verdict = (
        "exact"
        if diff == 0 and same_scale
        else f"max |dloss| {diff:.3g}, loss scales {'equal' if same_scale else 'DIFFER'}"
    )
    row(
        name,
        f"ok in {seconds:.0f} s ({how}): loss {a[1][0]:.3f} -> {a[iters][0]:.3f}, loss scale {a[iters][1]:g},"
        f" checkpoints {half} and {iters} written; resumed at {half}: {verdict}",
    )


def trainer_part(args, budget: Budget) -> None:
    from aquila.config import ModelArgs

    cuda = args.device.startswith("cuda")
    vocab = ModelArgs.from_name(args.trainer_model).vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prefix = synthetic_dataset(work / "synth", vocab)
        base = {
            "env_type": "fsdp",
            "model_name": args.trainer_model,
            "data_prefix": prefix,
            "seq_length": args.trainer_seq,
            "batch_size": 8,
            "lr": 3.0e-3,
            "warm_up": 0.1,
            "log_interval": 1,
            "save_interval": args.trainer_iters // 2,
            "eval_interval": 1000,
            "num_checkpoints": 10,
            "save_optim": True,
            "save_rng": True,
            "load_optim": True,
            "load_rng": True,
            "resume_dataset": True,
            "peak_tflops": 1.0,
            "pytorch_device": args.device,
        }
        for precision in ("bf16", "fp16"):
            name = f"trainer fsdp {precision} {args.trainer_iters} it + resume"
            if precision == "fp16" and not cuda:
                row(name, "skipped: fp16 trains only on CUDA (the trainer turns it off on CPU)")
                continue
            if not budget.allows(name, 20):
                continue
            try:
                run_precision(base, precision, work, args.trainer_iters, budget)
            except Exception as e:
                row(name, f"error: {type(e).__name__}: {str(e).splitlines()[0][:240] if str(e) else ''}")
