"""Generation speed: ours (eager / torch.compile, fp32 / int8) against transformers' generate, same weights.

    .venv/bin/python bench/generate.py              # tiny + medium models, batch 1 and 8 (a few minutes)
    .venv/bin/python bench/generate.py --7b         # also the 7B shape, int8, random weights (subprocess)
    .venv/bin/python bench/generate.py --only-7b

Times are wall-clock, best of --repeats, measured the same way for every row: time to first token (TTFT) is a
1-token generate call (cache setup + prefill + one sample); decode tokens/s = batch * (N - 1) / (t(N) - t(1)).
Generation never stops early (no stop ids; transformers gets min_new_tokens = N). "read limit" is the decode rate
if every step only read the weights once at the read bandwidth measured right after that row (`read_bandwidth`:
all threads summing, or matvec-ing, 512 MiB): batch / (weight bytes / bandwidth); "% of limit" = decode / limit.
The bandwidth of this shared 2-core VM moves by +-30% from minute to minute, hence the measurement per row.
"packed" = linear weights packed once for oneDNN (`aquila.inference.packing`, what generate/chat/serve do on CPU).
OMP_WAIT_POLICY=PASSIVE is set before torch loads unless it is set already: on a shared machine, spinning OpenMP
workers otherwise slow small matmuls by 10-50x; on an idle one `OMP_WAIT_POLICY=ACTIVE` is faster for every row.
Other processes on the machine still add noise; the load average is printed. With `--clock cpu` every time is
this process's CPU time instead (steadier when other jobs share the cores; the rates are then per CPU-second, and
the limits still assume wall-clock bandwidth).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_name  # noqa: E402

from aquila.checkpoint import build_model, save_model_dir  # noqa: E402
from aquila.config import ModelArgs  # noqa: E402
from aquila.inference.generate import DecodeBatch, Request, cache_length  # noqa: E402
from aquila.inference.generate import run as run_requests  # noqa: E402
from aquila.inference.packing import pack_linears, packing_available  # noqa: E402
from aquila.inference.quantize import quantize_model, weight_bytes  # noqa: E402
from aquila.inference.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def generate(model, prompts, n: int, compile: bool = False) -> list[list[int]]:
    """Greedy ids for every prompt through the decoding core, never stopping early."""
    max_len = cache_length(max(len(p) for p in prompts) + n, model.args.max_seq_len)
    batch = DecodeBatch(model, len(prompts), max_len, compile=compile)
    return [c.token_ids for c in run_requests(batch, [Request(tuple(p), n, GREEDY) for p in prompts])]


MODELS = {
    "tiny (aquila-tiny, 7M)": ModelArgs.from_name("aquila-tiny"),
    # issue 13.7's medium config: 76M parameters, 306 MB of fp32 weights (the output projection alone 205 MB)
    "medium (d512 L8, vocab 100008, 306 MB)": ModelArgs(
        dim=512, n_layers=8, n_heads=8, vocab_size=100008, max_seq_len=512
    ),
}


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})"
    )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f}"


def read_bandwidth() -> float:
    """GB/s at which all threads read a 512 MiB fp32 tensor: the better of a sum over it and a matvec with it as
    the [rows, 512] matrix (the decode steps' access pattern), best of 5 each. Measured next to every row."""
    a = torch.ones(128 * 2**20)
    matrix, x = a.view(-1, 512), torch.ones(512)
    best = float("inf")
    for fn in (a.sum, lambda: torch.mv(matrix, x)):
        for _ in range(5):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def copy_bandwidth() -> float:
    """GB/s of a large tensor copy (bytes read + bytes written), best of 5."""
    src = torch.ones(64 * 2**20)  # 256 MB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def measure(run, batch: int, n: int, repeats: int) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s over the batch) for run(max_new_tokens)."""
    run(2)  # warm-up (and compilation)
    t1 = best_time(lambda: run(1), repeats)
    tn = best_time(lambda: run(n), repeats)
    return t1, batch * (n - 1) / max(tn - t1, 1e-9)


def ours(model, prompts, compile: bool):
    def run(n: int) -> None:
        generate(model, prompts, n, compile)

    return run


def hf_runner(hf, prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n: int) -> None:
        with torch.no_grad():
            hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )

    return run


def bench_model(name: str, args: ModelArgs, batches: list[int], n: int, prompt_len: int, repeats: int):
    from transformers import LlamaForCausalLM

    model = build_model(args, seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(model, tmp, fmt="hf")
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    int8 = quantize_model(build_model(args, seed=0).eval())
    packed = build_model(args, seed=0).eval()
    if packing_available():
        pack_linears(packed)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        # Varied prompt lengths in a batch (left padding), same prompts for every implementation.
        lengths = [prompt_len - (i * 3) % 5 for i in range(batch)]
        prompts = [[args.vocab_size - 2, *torch.randint(1, 1000, (m - 1,), generator=gen).tolist()] for m in lengths]
        variants = [
            ("transformers generate fp32", hf_runner(hf, prompts), weight_bytes(model)),
            ("ours eager fp32", ours(model, prompts, False), weight_bytes(model)),
            ("ours eager fp32 packed", ours(packed, prompts, False), weight_bytes(model)),
            ("ours compiled fp32", ours(model, prompts, True), weight_bytes(model)),
            ("ours eager int8", ours(int8, prompts, False), weight_bytes(int8)),
            ("ours compiled int8", ours(int8, prompts, True), weight_bytes(int8)),
        ]
        hf_rate = None
        for label, run, nbytes in variants:
            try:
                ttft, rate = measure(run, batch, n, repeats)
            except Exception as e:  # report, keep benchmarking
                rows.append((name, batch, label, None, None, None, None, f"failed: {type(e).__name__}: {e}"[:80]))
                print_row(rows[-1])
                continue
            hf_rate = hf_rate or rate
            limit = batch * read_bandwidth() * 1e9 / nbytes  # measured after the row: the same moment's machine
            rows.append((name, batch, label, ttft, rate, rate / hf_rate, limit, ""))
            print_row(rows[-1])
    return rows


def print_header() -> None:
    print(f"| {'model':<40} | batch | {'implementation':<27} | TTFT ms | decode tok/s | vs HF | read limit tok/s |"
          " % of limit |")  # fmt: skip
    print(f"|{'-' * 42}|-------|{'-' * 29}|---------|--------------|-------|------------------|-----------:|")


def print_row(row) -> None:
    name, batch, label, ttft, rate, ratio, limit, note = row
    if ttft is None:
        print(f"| {name:<40} | {batch:>5} | {label:<27} | {note} |")
    else:
        print(
            f"| {name:<40} | {batch:>5} | {label:<27} | {ttft * 1e3:>7.1f} | {rate:>12.1f} | {ratio:>5.2f} |"
            f" {limit:>16.1f} | {100 * rate / limit:>9.0f}% |",
            flush=True,
        )


def seven_b_child(new_tokens: int, prompt_len: int) -> None:
    """Build the 7B shape on the meta device, quantizing each matrix as soon as it is drawn, then generate."""
    from aquila.model import AquilaModel, RMSNorm

    args = ModelArgs.from_name("aquila-7b")
    t = time.perf_counter()
    with torch.device("meta"):
        model = AquilaModel(args)
    gen = torch.Generator().manual_seed(0)
    quantize_model(model, init=lambda shape: torch.empty(shape).normal_(0.0, args.initializer_range, generator=gen))
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = torch.nn.Parameter(torch.ones(args.dim), requires_grad=False)
    model.eval()
    build_s = time.perf_counter() - t
    assert not any(p.is_meta for p in model.state_dict().values())
    prompt = [[args.vocab_size - 2, *torch.randint(1, 1000, (prompt_len - 1,), generator=gen).tolist()]]
    bw = copy_bandwidth()  # measured here, just before decoding, for the bandwidth limit
    t1 = best_time(lambda: generate(model, prompt, 1), 1)
    tn = best_time(lambda: generate(model, prompt, new_tokens), 1)
    rate = (new_tokens - 1) / max(tn - t1, 1e-9)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out = {
        "build_s": build_s,
        "ttft_s": t1,
        "decode_tok_s": rate,
        "peak_rss_gb": peak / 1e9,
        "weight_gb": weight_bytes(model) / 1e9,
        "tokens": new_tokens,
        "copy_gb_s": bw,
    }
    print("RESULT " + json.dumps(out))


def seven_b(new_tokens: int, prompt_len: int) -> None:
    print(f"\n7B shape (aquila-7b preset), int8 weight-only incl. embeddings, random weights; prompt {prompt_len}, "
          f"{new_tokens} new tokens; run in a subprocess; {load()}")  # fmt: skip
    cmd = [sys.executable, __file__, "--7b-child", "--new-tokens-7b", str(new_tokens), "--prompt-len-7b", str(prompt_len)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"7B run failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return
    r = json.loads(lines[-1][len("RESULT ") :])
    limit = r["copy_gb_s"] / r["weight_gb"]
    print("| build (quantize while drawing) s | weights GB | peak RSS GB | TTFT s | decode tok/s | bw limit tok/s |")
    print("|---|---|---|---|---|---|")
    print(f"| {r['build_s']:.0f} | {r['weight_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['ttft_s']:.2f} "
          f"| {r['decode_tok_s']:.2f} | {limit:.2f} |")  # fmt: skip
    ok = r["peak_rss_gb"] < 10 and r["decode_tok_s"] >= 1
    print(f"copy bandwidth just before decoding: {r['copy_gb_s']:.1f} GB/s")
    print(f"targets (peak RSS < 10 GB, >= 1 token/s): {'met' if ok else 'NOT met'}; {load()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--models", default="tiny,medium", help="which of: tiny, medium")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--7b", dest="seven_b", action="store_true", help="also run the 7B-shape int8 check")
    p.add_argument("--only-7b", action="store_true")
    p.add_argument("--new-tokens-7b", type=int, default=12)
    p.add_argument("--prompt-len-7b", type=int, default=8)
    p.add_argument("--7b-child", dest="seven_b_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clock", choices=sorted(CLOCK), default="wall", help="cpu: process CPU time (shared machines)")
    a = p.parse_args()
    global clock
    clock = CLOCK[a.clock]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.seven_b_child:
        seven_b_child(a.new_tokens_7b, a.prompt_len_7b)
        return 0
    print(f"machine: {machine()}")
    print(f"copy bandwidth: {copy_bandwidth():.1f} GB/s (read + write); read bandwidth {read_bandwidth():.1f} GB/s; "
          f"{load()}\n")  # fmt: skip
    if not a.only_7b:
        print(f"prompt ~{a.prompt_len} tokens, {a.new_tokens} new tokens, greedy, best of {a.repeats}\n")
        print_header()
        chosen = a.models.split(",")
        for name, args in MODELS.items():
            if name.split()[0] not in chosen:
                continue
            bench_model(name, args, [int(b) for b in a.batches.split(",")], a.new_tokens, a.prompt_len, a.repeats)
        print(f"\n{load()}")
    if a.seven_b or a.only_7b:
        seven_b(a.new_tokens_7b, a.prompt_len_7b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
