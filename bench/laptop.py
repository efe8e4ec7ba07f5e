"""Laptop decode: ours (fp32, int8, int4) against llama.cpp (f32, q8_0, q4_0) on the same random weights, one run.

    .venv/bin/python bench/laptop.py                     # the ~1B shape (dim 2048, 16 layers, vocab 16,008)
    .venv/bin/python bench/laptop.py --shape aquila-7b   # the 7B shape: int8/int4 and q8_0/q4_0 only

The script writes an fp32 model directory of random weights (tensor by tensor: the fp32 model is never in memory),
quantizes it with `aquila quantize --bits 8/4`, exports it with `aquila convert --to gguf --outtype f32/q8_0/q4_0`
(llama.cpp's side, run by llama-cpp-python), then measures the rows in rounds, interleaved (ours fp32, llama.cpp
f32, ours int8, q8_0, ours int4, q4_0, then again), each in its own process so that each has its own peak RSS.
Ours loads as `aquila chat` does (fp32 linears packed where `should_pack` says so: for our AVX-512 kernel at any
batch, for oneDNN at batch 8). Decode tokens/s at batch 1 = (N - 1) / (t(N) - t(1)) for ours (`DecodeBatch`,
greedy) and N / t(N decode evals after the prompt) for llama.cpp; the better of the rounds is printed, with the
ratio ours / llama.cpp and "% of read limit": rate x weight bytes / the read bandwidth measured in the same process
just before (all threads summing 512 MiB). Threads: --threads (2) for both sides. Peak RSS is the process's
ru_maxrss after load and decode.
`--batch8` adds batch 8 for each format: ours (`DecodeBatch` of 8 prompts) against llama.cpp stepping 8 sequences
through its own `llama_batch` API, both 8 x N tokens / the time of N steps after the prompts.
llama.cpp is loaded without its extra buffer types (no AMX repacking: it crashed with SIGSEGV at the tiny test shape
and at the 7B shape on an AMX Xeon); `--llama-repack` restores its default, and a crashed row prints its exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
# name -> (preset, vocab): the issue's ~1B shape is aquila-1b's with the demo tokenizer's 16,008-token vocabulary
SHAPES = {"1b": ("aquila-1b", 16008), "aquila-7b": ("aquila-7b", None)}


def model_args(shape: str):
    from aquila.config import ModelArgs

    preset, vocab = SHAPES[shape]
    args = ModelArgs.from_name(preset)
    return ModelArgs(**{**args.to_dict(), "vocab_size": vocab}) if vocab else args


def cpu_features() -> str:
    """What the kernels can use here, detected (never assumed): torch's dispatch level and the AVX-512 flags."""
    import torch

    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"torch {torch.backends.cpu.get_cpu_capability()}; " + " ".join(f for f in wanted if f in flags)


def reset_peak_rss() -> None:
    """Start this process's high-water mark afresh: ru_maxrss after exec keeps the parent's peak from before it
    (a parent that has just quantized a 7B model would show its 6.9 GB in every row)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    from machine import status_kb

    return status_kb("self", "VmHWM") * 1024 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_bandwidth() -> float:
    """GB/s at which all threads sum a 512 MiB fp32 tensor, best of 5."""
    import torch

    a = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def write_random_dir(out: Path, shape: str, seed: int = 0) -> None:
    """An fp32 model directory of random weights (normal(0, initializer_range), norms 1), written tensor by
    tensor in safetensors' layout, with the demo tokenizer."""
    import torch

    from aquila.checkpoint import meta_model
    from aquila.io_utils import atomic_dir

    args = model_args(shape)
    shapes = {k: tuple(v.shape) for k, v in meta_model(args).state_dict().items()}
    header, offset = {}, 0
    for key, shp in shapes.items():
        size = math.prod(shp) * 4
        header[key] = {"dtype": "F32", "shape": list(shp), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with atomic_dir(out) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, shp in shapes.items():
                if key.endswith("norm.weight"):
                    t = torch.ones(shp)
                else:
                    t = torch.empty(shp).normal_(0.0, args.initializer_range, generator=gen)
                f.write(t.numpy().tobytes())
        (tmp / "config.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        for name in TOKENIZER.iterdir():
            shutil.copy(name, tmp / name.name)


def child_ours(path: str, quantize: str, batch: int, tokens: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import aquila
    from aquila.inference.generate import DecodeBatch, Request, run
    from aquila.inference.packing import pack_linears, should_pack
    from aquila.inference.quantize import weight_bytes
    from aquila.inference.sampling import SamplingParams

    t = time.perf_counter()
    model = aquila.AutoLoader(model_dir=Path(path).parent, model_name=Path(path).name, quantize=quantize or None)
    model = model.get_model()
    weights = weight_bytes(model)  # before packing: fp32's packed tensors are not in the state dict
    if should_pack(model, batch):  # as `aquila chat/generate/serve` load (options.load_predictor)
        pack_linears(model)
    load_s = time.perf_counter() - t
    load_rss = peak_rss()
    prompts = [tuple([16006, *range(100 + 7 * r, 108 + 7 * r)]) for r in range(batch)]

    def gen(n: int) -> list[list[int]]:
        db = DecodeBatch(model, batch, 16 + tokens)
        return [c.token_ids for c in run(db, [Request(p, n, SamplingParams(temperature=0)) for p in prompts])]

    gen(2)
    peak = peak_rss()  # before the bandwidth probe's 512 MiB
    bw = read_bandwidth()
    t = time.perf_counter()
    gen(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    ids = gen(tokens)
    tn = time.perf_counter() - t
    return {
        "rate": batch * (tokens - 1) / (tn - t1),
        "bw": bw,
        "weight_bytes": weights,
        "peak_rss": peak,
        "load_rss": load_rss,
        "load_s": load_s,
        "ids": ids[0][:16],
    }


def plain_buffers(llama_cpp) -> None:
    """Load llama.cpp without its extra buffer types (weights repacked for AMX or AVX-512 tiles), as
    tests/test_gguf_llama_cpp.py does: on an AMX Xeon, llama-cpp-python 0.3.36's AMX repacking of q8_0/q4_0 crashed
    a test process at its first forward (dim 64). `--llama-repack` keeps llama.cpp's default."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params


def child_llama(path: str, batch: int, tokens: int, threads: int, repack: bool = False) -> dict:
    import llama_cpp

    if not repack:
        plain_buffers(llama_cpp)
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=32 + tokens, n_threads=threads, n_batch=64, verbose=False)
    load_s = time.perf_counter() - t
    load_rss = peak_rss()
    if batch > 1:
        bw = read_bandwidth()
        rate = llama_batched_rate(llm, llama_cpp, batch, tokens, threads)
        return {"rate": rate, "bw": bw, "weight_bytes": os.path.getsize(path), "peak_rss": peak_rss()}
    prompt = [16006, *range(100, 108)]
    llm.eval(prompt)
    llm.eval([5])
    peak = peak_rss()  # before the bandwidth probe's 512 MiB
    bw = read_bandwidth()
    llm.reset()
    llm.eval(prompt)
    t = time.perf_counter()
    for i in range(tokens):
        llm.eval([200 + i])
    dt = time.perf_counter() - t
    return {
        "rate": tokens / dt,
        "bw": bw,
        "weight_bytes": os.path.getsize(path),
        "peak_rss": peak,
        "load_rss": load_rss,
        "load_s": load_s,
        "repack": repack,
    }


def llama_batched_rate(llm, llama_cpp, batch: int, tokens: int, threads: int) -> float:
    """Decode tokens/s of `batch` sequences stepping together through llama.cpp's own batch API (`llama_batch`
    with one sequence id a row, as its `llama-batched-bench` runs): a context of `batch` sequences on the loaded
    model, each prompt read, then `tokens` steps of one token a sequence, logits for every row."""
    lc = llama_cpp.llama_cpp
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = batch * (32 + tokens), 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
    ctx = lc.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    b = lc.llama_batch_init(512, 0, 1)

    def decode(rows: list[tuple[int, int, int]]) -> None:  # (token, position, sequence)
        b.n_tokens = len(rows)
        for i, (tok, pos, seq) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, 1
            b.seq_id[i][0] = seq
        if lc.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        prompt = [16006, *range(100, 108)]
        decode([(tok, p, s) for s in range(batch) for p, tok in enumerate(prompt)])
        decode([(5, len(prompt), s) for s in range(batch)])
        t = time.perf_counter()
        for i in range(tokens):
            decode([(200 + i, len(prompt) + 1 + i, s) for s in range(batch)])
        return batch * tokens / (time.perf_counter() - t)
    finally:
        lc.llama_batch_free(b)
        lc.llama_free(ctx)


def run_child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:  # a crash (e.g. a signal) is a row's result, not the bench's end
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"exit {proc.returncode}: {why}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def prepare(work: Path, shape: str, rows: list[tuple]) -> None:
    from aquila.cli import main as cli_main

    fp32 = work / "fp32"
    if not fp32.is_dir():
        print(f"writing {fp32}", flush=True)
        write_random_dir(fp32, shape)
    for _, kind, name, extra in rows:
        target = work / name
        if target.exists():
            continue
        print(f"making {target}", flush=True)
        if kind == "ours" and extra:
            assert cli_main(["quantize", str(fp32), str(target), "--bits", extra]) == 0
        elif kind == "llama":
            assert cli_main(["convert", str(fp32), str(target), "--to", "gguf", "--outtype", extra]) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--work", default="/tmp/aquila-laptop-bench", help="where the model files are kept")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch8", action="store_true", help="also batch 8, ours and llama.cpp's batch API")
    parser.add_argument("--only", default="", help="comma-separated row names to run (fp32,int8,int4)")
    parser.add_argument("--llama-repack", action="store_true", help="llama.cpp with its extra buffer types (AMX)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        reset_peak_rss()
        kind, path, quant, batch, tokens, threads, repack = args.child
        if kind == "ours":
            out = child_ours(path, quant, int(batch), int(tokens), int(threads))
        else:
            out = child_llama(path, int(batch), int(tokens), int(threads), repack == "1")
        print("RESULT " + json.dumps(out))
        return
    shape = args.shape
    work = Path(args.work) / shape
    pairs = [("fp32", "fp32", "", "f32.gguf", "f32"), ("int8", "q8", "8", "q8_0.gguf", "q8_0")]
    pairs.append(("int4", "q4", "4", "q4_0.gguf", "q4_0"))
    if shape == "aquila-7b":
        pairs = pairs[1:]  # fp32 does not fit in 24 GB
    if args.only:
        pairs = [p for p in pairs if p[0] in args.only.split(",")]
    rows = []
    for label, ours_dir, bits, gguf, outtype in pairs:
        rows += [(label, "ours", ours_dir, bits), (label, "llama", gguf, outtype)]
    prepare(work, shape, rows)
    from machine import cpu_name

    print(f"\n{shape}, random weights, batch 1, {args.threads} threads, {args.tokens} new tokens; {cpu_name()}")
    print(f"CPU features: {cpu_features()}")
    # Ours runs with the OpenMP wait policy a user gets (libgomp's default unless set): PASSIVE, which benches on
    # shared machines set, made our 1B int8 decode 76 ms a token against 53 (threads put to sleep between the
    # ~110 matmuls of a token); llama.cpp's own thread pool does not read it.
    print(f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', '(unset: the OpenMP default)')}")
    print(f"load before: {os.getloadavg()}")
    repack = "1" if args.llama_repack else "0"
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for label, kind, name, _extra in rows:
            quant = {"fp32": "", "int8": "int8", "int4": "int4"}[label] if kind == "ours" else ""
            out = run_child(kind, str(work / name), quant, "1", str(args.tokens), str(args.threads), repack)
            results.setdefault((label, kind), []).append(out)
            print(f"  {label:>5} {kind:<6} {json.dumps(out)}", flush=True)
    print(f"load after: {os.getloadavg()}")
    print("\n| format | ours tok/s | llama.cpp tok/s | ratio | ours % of read limit | llama.cpp % | ours peak RSS / "
          "weights | llama.cpp peak RSS / file |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, *_ in pairs if args.rounds else []:  # --rounds 0: batch 8 only
        best = {}
        for kind in ("ours", "llama"):
            good = [r for r in results[(label, kind)] if "rate" in r]
            best[kind] = max(good, key=lambda r: r["rate"]) if good else None
        o, ll = best["ours"], best["llama"]

        def pct(r):
            return f"{100 * r['rate'] * r['weight_bytes'] / (r['bw'] * 1e9):.0f}%" if r else "-"

        def mem(r):
            return f"{r['peak_rss'] / 1e9:.2f} / {r['weight_bytes'] / 1e9:.2f} GB" if r else "-"

        ratio = f"{o['rate'] / ll['rate']:.2f}x" if o and ll else "-"
        print(
            f"| {label} | {o['rate'] if o else float('nan'):.2f} | {ll['rate'] if ll else float('nan'):.2f} | {ratio} "
            f"| {pct(o)} | {pct(ll)} | {mem(o)} | {mem(ll)} |"
        )
    if args.batch8:
        print("\n| batch 8 | ours tok/s | llama.cpp tok/s | ratio |\n|---|---:|---:|---:|")
        for label, ours_dir, _bits, gguf, _outtype in pairs:
            quant = {"fp32": "", "int8": "int8", "int4": "int4"}[label]
            o = run_child("ours", str(work / ours_dir), quant, "8", str(args.tokens), str(args.threads), repack)
            ll = run_child("llama", str(work / gguf), "", "8", str(args.tokens), str(args.threads), repack)
            print(f"  {json.dumps(o)}\n  {json.dumps(ll)}", flush=True)
            ratio = f"{o['rate'] / ll['rate']:.2f}x" if "rate" in o and "rate" in ll else "-"
            print(f"| {label} | {o.get('rate', float('nan')):.1f} | {ll.get('rate', float('nan')):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
