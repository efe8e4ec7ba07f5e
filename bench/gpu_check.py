"""Every CUDA check of issue 15 in one call, one table at the end (bench/gpu_check.sh wraps it on the GPU machine).

    python bench/gpu_check.py                    # on a CUDA machine: all parts, about 8 minutes
    python bench/gpu_check.py --parts decode     # one part again (say after a fix)
    python bench/gpu_check.py --smoke            # the same code paths with tiny shapes (CPU; tests/test_train_gpu_check.py)

Parts, each in its own process under its own time limit, so a crash, an out-of-memory or a hang in one leaves the
others' rows intact (the rows a part printed before it died are kept):
  env      versions; which SDPA backend runs for the training and the decode shapes
  tests    pytest -m cuda tests/test_cuda.py (bf16 vs fp32, KV cache, padded batches, fp16 scaler, int8, SDPA)
  train    aquila-1b, seq 2048, FSDP2 bf16/fp32 mixed precision, compiled blocks: tokens/s, MFU, peak memory
  trainer  `aquila pretrain` env_type fsdp, bf16 and fp16: 20 iterations, checkpoint, exact resume
  decode   Aquila-7B shape bf16: batch 1 eager / compiled (reduce-overhead) vs the HBM limit, int8, batch 16
  fit7b    Aquila-7B built on meta, FSDP2 bf16 params, one step at seq 2048 with activation checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpu_check_common import ROOT, ROW_PREFIX, Budget

from aquila.io_utils import write_text_atomic

PARTS = ("env", "tests", "train", "trainer", "decode", "fit7b")
# The parts of a phase run at the same time: the small correctness checks share the GPU (no timing of theirs is a
# result); each timed part runs alone. The limits are each part's own, in seconds, on CUDA.
PHASES = (("env", "tests", "trainer"), ("train",), ("decode",), ("fit7b",))
BUDGET_S = {"env": 40, "tests": 90, "train": 110, "trainer": 90, "decode": 200, "fit7b": 50}
SMOKE_BUDGET_S = 300  # per part, on a shared CPU that may be heavily loaded
SMOKE = {
    "train_model": "aquila-micro",
    "train_seq": 64,
    "train_batch": 2,
    "warmup": 1,
    "steps": 1,
    "compile_backend": "eager",
    "trainer_model": "aquila-micro",
    "trainer_seq": 32,
    "trainer_iters": 4,
    "decode_model": "aquila-micro",
    "decode_tokens": 4,
    "fit_model": "aquila-micro",
    "fit_seq": 64,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, eager compile backend (CPU smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--total-s", type=float, default=480.0, help="wall-clock limit for all parts together")
    p.add_argument("--budget", action="append", default=[], metavar="PART=S", help="a part's own time limit (s)")
    p.add_argument(
        "--report", default=None, help="also write the table here (default: $OUT/gpu_check.md if OUT is set)"
    )
    p.add_argument("--spec-tflops", type=float, default=989.0, help="dense bf16 spec (H100/H200 SXM)")
    p.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth spec (H200: 4.8 TB/s)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--train-model", default="aquila-1b")
    p.add_argument("--train-seq", type=int, default=2048)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpoint-activations", action="store_true", help="train part: AC from the start")
    p.add_argument("--trainer-model", default="aquila-tiny")
    p.add_argument("--trainer-seq", type=int, default=256)
    p.add_argument("--trainer-iters", type=int, default=20)
    p.add_argument("--decode-model", default="aquila-7b")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument(
        "--decode-tuning", action="store_true", help="inductor coordinate-descent tuning, as gpt-fast (longer compile)"
    )
    p.add_argument("--fit-model", default="aquila-7b")
    p.add_argument("--fit-seq", type=int, default=2048)
    p.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-s", type=float, default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.smoke:  # tiny shapes, except where a flag says otherwise
        for key, value in SMOKE.items():
            flag = "--" + key.replace("_", "-")
            if not any(a == flag or a.startswith(flag + "=") for a in argv):
                setattr(args, key, value)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    budgets = {}
    for item in args.budget:
        part, _, seconds = item.partition("=")
        try:
            budgets[part] = float(seconds)
        except ValueError:
            budgets[part] = -1.0
        if part not in PARTS or budgets[part] <= 0:
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
    args.budget = budgets
    return args


def run_part(args: argparse.Namespace) -> int:
    """Inside a part's process: call its function; rows go to stdout."""
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget.of((args.part_s or 60.0) - 5)
    if args.run_part in ("env", "tests"):
        import gpu_check_env as mod
    elif args.run_part in ("train", "fit7b"):
        import gpu_check_train as mod
    else:
        mod = __import__(f"gpu_check_{args.run_part}")
    getattr(mod, f"{args.run_part}_part")(args, budget)
    return 0


def launch(part: str, argv: list[str], limit_s: float, log) -> tuple[list[tuple[str, str]], str]:
    """Run one part in its own process group; returns its rows and, if it did not end cleanly, why."""
    cmd = [sys.executable, "-u", __file__, *argv, "--run-part", part, "--part-s", str(limit_s)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    rows: list[tuple[str, str]] = []
    stderr_tail: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            if line.startswith(ROW_PREFIX):
                r = json.loads(line[len(ROW_PREFIX) :])
                rows.append((r["name"], r["value"]))
                print(f"  [{part}] {r['name']}: {r['value']}", flush=True)
            else:
                log.write(f"[{part}] {line}")

    def read_stderr() -> None:
        for line in proc.stderr:
            log.write(f"[{part}:err] {line}")
            stderr_tail.append(line.rstrip())
            del stderr_tail[:-40]

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
    for t in readers:
        t.start()
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (compile workers, trainer runs)
        proc.wait()
        rc = None
    for t in readers:
        t.join(timeout=10)
    if rc is None:
        return rows, f"error: stopped after its {limit_s:.0f} s time limit"
    if rc != 0:
        last = next((x for x in reversed(stderr_tail) if x.strip() and not x.startswith(" ")), "no output")
        return rows, f"error: exit status {rc}: {last[:240]}"
    return rows, ""


def table(rows: list[tuple[str, str, str]]) -> str:
    width = max([len(name) for _, name, _ in rows] + [5])
    lines = [f"| part | {'check'.ljust(width)} | result |", f"|---|{'-' * (width + 2)}|---|"]
    lines += [f"| {part} | {name.ljust(width)} | {value.replace('|', '/')} |" for part, name, value in rows]
    return "\n".join(lines) + "\n"


def run_parts(parts: list[str], argv: list[str], limits: dict[str, float], total: Budget, log) -> list:
    """Run `parts` at the same time (threads waiting on processes); rows in the order of `parts`."""
    results: dict[str, list[tuple[str, str, str]]] = {}

    def one(part: str) -> None:
        limit = min(limits[part], total.left())
        if limit < 10:
            results[part] = [(part, f"{part} part", "skipped: the --total-s time was used up")]
            return
        print(f"== {part} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        rows, problem = launch(part, argv, limit, log)
        out = [(part, name, value) for name, value in rows]
        if problem:
            out.append((part, f"{part} part", problem))
        results[part] = out + [(part, f"{part} time", f"{time.monotonic() - t0:.0f} s")]

    threads = [threading.Thread(target=one, args=(part,)) for part in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for part in parts for r in results[part]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_part:
        return run_part(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    limits = dict.fromkeys(PARTS, float(SMOKE_BUDGET_S)) if args.smoke else dict(BUDGET_S)
    limits.update(args.budget)
    out_dir = os.environ.get("OUT")
    report = Path(args.report) if args.report else (Path(out_dir) / "gpu_check.md" if out_dir else None)
    log_path = report.with_suffix(".log") if report else Path(os.devnull)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
    total = Budget.of(args.total_s)
    chosen = args.parts.split(",")
    all_rows: list[tuple[str, str, str]] = []
    started = time.monotonic()
    with open(log_path, "w") as log:
        for phase in PHASES:
            parts = [p for p in phase if p in chosen]
            if parts:
                all_rows += run_parts(parts, argv, limits, total, log)
    all_rows.append(("all", "total time", f"{time.monotonic() - started:.0f} s"))
    text = table(all_rows)
    print(text)
    if report:
        write_text_atomic(report, text)
        print(f"table written to {report}; part logs in {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
