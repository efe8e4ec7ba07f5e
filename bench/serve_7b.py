"""`aquila serve` of the Aquila-7B shape (random int8 weights) with `--max-batch 16` at the default context on a
24 GB machine: does it start, serve 16 concurrent ~300-token chats, and stay under 20 GB of peak RSS (issue 22)?

    .venv/bin/python bench/serve_7b.py                    # writes /tmp/aquila-kv-bench-7b (7.3 GB), then serves
    .venv/bin/python bench/serve_7b.py --keep             # keep the model directory for another run

The int8 directory (`aquila quantize`'s layout: int8 `*.weight` + fp32 `*.scales`, quantization.json, the demo
tokenizer) is written tensor by tensor from random int8 values (as bench/laptop.py writes fp32: no model in
memory, and no 28 GB fp32 detour through `aquila quantize`). Output rows of ids the demo tokenizer cannot decode
(and of EOS/unk) are zero, so every generated token is text and no chat stops early.

The server runs with the defaults (`--max-batch 16`, context = min(max_seq_len 2,048, prompt 2,048 + new 1,024));
its KV pool is the default budget of `aquila/inference/kv_budget.py` (16 full rows would be 32 GiB of fp32 cache:
half of MemAvailable after the weights is used instead). The chats: one request reads a 272-id system prompt
(the server's cache then holds it), then 16 concurrent streams, each the same system prompt + 12 ids of its own +
16 generated tokens = 300 positions. The 16 user prompts are distinct, so each chat has its own blocks after the
shared ones. Reported: the start-up KV line (/health), TTFT and inter-token latency, the server process's peak RSS
(VmHWM) and the lowest MemAvailable seen while it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cores, cpu_name, load_average, status_kb  # noqa: E402
from serve import DEMO_TOKENIZER, Server, percentile  # noqa: E402

SYSTEM, USER, NEW = 272, 12, 16


def write_random_int8_dir(out: Path, seed: int = 0, args=None) -> None:
    """An int8 directory of the 7B shape (or `args`) from random values, one tensor in memory at a time."""
    import torch

    from aquila.checkpoint import QUANT_CONFIG, meta_model
    from aquila.config import ModelArgs
    from aquila.inference.quantize import QUANT_FORMAT, quantize_model
    from aquila.io_utils import atomic_dir

    args = args or ModelArgs.from_name("aquila-7b")
    state = quantize_model(meta_model(args)).state_dict()  # meta tensors: names, shapes, dtypes
    names = {torch.int8: ("I8", 1), torch.float32: ("F32", 4)}
    header, offset = {}, 0
    for key, t in state.items():
        size = math.prod(t.shape) * names[t.dtype][1]
        header[key] = {"dtype": names[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    scale = args.initializer_range / (127 / math.sqrt(3))  # uniform int8 in [-127, 127] has std 127 / sqrt(3)
    with atomic_dir(out) as tmp:
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, t in state.items():
                if t.dtype == torch.int8:
                    x = torch.randint(-127, 128, tuple(t.shape), dtype=torch.int8, generator=gen)
                    if key == "output.weight":  # only ids the demo tokenizer decodes, never EOS, BOS or unk
                        x[16006:] = 0
                        x[0] = 0
                elif key.endswith(".scales"):
                    x = torch.full(tuple(t.shape), scale)
                else:  # norms
                    x = torch.ones(tuple(t.shape))
                f.write(x.numpy().tobytes())
                del x
        (tmp / "config.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        qcfg = {"format": QUANT_FORMAT, "version": 1, "weights": "random int8 (bench/serve_7b.py)", "embeddings": True}
        (tmp / QUANT_CONFIG).write_text(json.dumps(qcfg) + "\n")
        for name in DEMO_TOKENIZER.iterdir():
            shutil.copy(name, tmp / name.name)


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


async def chat(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    sent, times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith('data: {"id"') and '"text": ""' not in line and '"choices": []' not in line:
                times.append(time.perf_counter())
            elif '"usage"' in line and '"choices": []' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return {"sent": sent, "times": times, "tokens": tokens}


async def workload(url: str, clients: int, timeout: float) -> tuple[dict, list[dict], float]:
    rng = random.Random(0)
    system = [16006, *(rng.randrange(100, 16000) for _ in range(SYSTEM - 1))]
    async with httpx.AsyncClient(timeout=timeout) as client:
        warm = await chat(client, url, system, 1)  # the server reads the system prompt once
        prompts = [system + [rng.randrange(100, 16000) for _ in range(USER)] for _ in range(clients)]
        start = time.perf_counter()
        results = await asyncio.gather(*(chat(client, url, p, NEW) for p in prompts))
        return warm, list(results), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/aquila-kv-bench-7b")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds for the whole workload")
    parser.add_argument("--keep", action="store_true", help="keep the model directory")
    a = parser.parse_args()
    work = Path(a.work)
    model_dir = work / "aquila-7b-int8"
    print(f"# {cpu_name()}, {cores()} cores, {load_average()}, MemAvailable {mem_available_gb():.1f} GiB", flush=True)
    try:
        if not model_dir.is_dir():
            t = time.perf_counter()
            write_random_int8_dir(model_dir)
            print(f"# wrote {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)
        t = time.perf_counter()
        server = Server(model_dir, 16, 16)
        lowest = [mem_available_gb()]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(2.0):
                lowest[0] = min(lowest[0], mem_available_gb())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            health = httpx.get(f"{server.url}/health").json()
            kv = health["kv_cache"]
            start_rss = status_kb(server.proc.pid, "VmRSS") / 2**20
            print(
                f"# started in {time.perf_counter() - t:.0f} s: max_batch {health['max_batch']}, KV cache"
                f" {kv['blocks']} blocks x {kv['block_size']} = {kv['blocks'] * kv['block_size']} positions,"
                f" {kv['bytes'] / 2**30:.2f} GiB; RSS {start_rss:.2f} GiB",
                flush=True,
            )
            warm, results, wall = asyncio.run(workload(server.url, a.clients, a.timeout))
            peak = status_kb(server.proc.pid, "VmHWM") / 2**20
            metrics = httpx.get(f"{server.url}/metrics").text
        finally:
            done.set()
            server.stop()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    hits = next((ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("aquila_prefix_cache_hit_blocks_total")), "?")  # fmt: skip
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [y - x for r in results for x, y in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    print(f"system prompt read alone: TTFT {(warm['times'][0] - warm['sent']):.1f} s")
    print(
        f"{a.clients} chats of {SYSTEM} + {USER} + {NEW} = {SYSTEM + USER + NEW} positions: {tokens} tokens in"
        f" {wall:.0f} s ({tokens / wall:.2f} tok/s); TTFT p50 {percentile(ttft, 50):.1f} s, p95"
        f" {percentile(ttft, 95):.1f} s; ITL p50 {percentile(itl, 50):.2f} s, p95 {percentile(itl, 95):.2f} s;"
        f" prefix hit blocks {hits}"
    )
    print(f"peak RSS (VmHWM) {peak:.2f} GiB; lowest MemAvailable while serving {lowest[0]:.1f} GiB; {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
