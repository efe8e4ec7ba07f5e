"""Serving throughput and latency: N concurrent streaming clients against `aquila serve` on loopback.

    .venv/bin/python bench/serve.py                      # 1, 4, 16 clients; batching server and --max-batch 1
    .venv/bin/python bench/serve.py --soak 300           # also 5 minutes of mixed load with random disconnects

The model is the medium config (dim 512, 8 layers, vocab 100,008, fp32) with random weights, written to a temporary
directory with the demo tokenizer. Output rows of ids the demo tokenizer cannot decode (and of EOS/unk) are zeroed,
so greedy decoding emits text for every token and never stops early; the weights read per step are unchanged.
Every client streams `/v1/completions` with the same prompt, `max_tokens` and temperature 0. Reported: total
generated tokens/s over the wall time of the round, p50/p95 time to first token (request sent -> first text) and
inter-token latency (gaps between a client's text chunks), and the server process's CPU time per generated token
(less sensitive than wall time to other jobs on a shared machine). Each round is bounded (`--timeout`); a refused request
(429/503) is counted, never retried.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cores, cpu_name, load_average  # noqa: E402

from aquila.checkpoint import build_model, save_model_dir  # noqa: E402
from aquila.config import ModelArgs  # noqa: E402

MEDIUM = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=100008, max_seq_len=512)
DEMO_TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
PROMPT = "The history of the city begins with a small market by the river, where"


def write_model(root: Path) -> Path:
    model = build_model(MEDIUM, seed=0)
    with torch.no_grad():  # only ids the demo tokenizer decodes, never EOS (16007), BOS (16006) or unk (0)
        model.output.weight[16006:] = 0
        model.output.weight[0] = 0
    out = root / "medium"
    save_model_dir(model, out, formats=("safetensors",))
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, max_batch: int, max_queue: int, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(model_dir.parent)]
        cmd += ["--model-name", model_dir.name, "--port", str(self.port), "--max-batch", str(max_batch)]
        cmd += ["--max-queue", str(max_queue), "--queue-timeout", "600", "--max-time", "600", *extra]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 900  # the 7B shape (bench/serve_7b.py) loads for minutes on a busy machine
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                httpx.get(f"{self.url}/health", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise SystemExit("server did not start in 900 s")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def stream_one(client: httpx.AsyncClient, url: str, max_tokens: int, stop_after: int | None = None) -> dict:
    """One streaming completion: send time, chunk arrival times, tokens (usage), status."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    sent, times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "sent": sent, "times": [], "tokens": 0}
        async for line in r.aiter_lines():
            if line.startswith('data: {"id"') and '"text": ""' not in line and '"choices": []' not in line:
                times.append(time.perf_counter())
                if stop_after is not None and len(times) >= stop_after:
                    break  # the client goes away mid-stream
            elif '"usage"' in line and '"choices": []' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return {"status": 200, "sent": sent, "times": times, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def round_of(server: Server, clients: int, max_tokens: int, timeout: float) -> dict:
    url, cpu = server.url, server.cpu_s()
    async with httpx.AsyncClient(timeout=timeout) as client:
        start = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(stream_one(client, url, max_tokens) for _ in range(clients))), timeout
        )
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    return {
        "tok_s": tokens / wall,
        "cpu_ms": (server.cpu_s() - cpu) / max(tokens, 1) * 1e3,
        "ttft50": percentile(ttft, 50),
        "ttft95": percentile(ttft, 95),
        "itl50": percentile(itl, 50),
        "itl95": percentile(itl, 95),
        "refused": len(results) - len(ok),
    }


async def soak(server: Server, seconds: float, max_clients: int, seed: int = 0) -> list[tuple[float, float]]:
    """Mixed load: up to max_clients at once, random lengths, a third leave mid-stream; RSS sampled every 5 s."""
    rng = random.Random(seed)
    samples, start = [], time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> None:
            leave = rng.randint(1, 10) if rng.random() < 1 / 3 else None
            try:
                await stream_one(client, server.url, rng.randint(4, 64), stop_after=leave)
            except httpx.HTTPError:
                pass

        running: set[asyncio.Task] = set()
        next_sample = 0.0
        while (now := time.perf_counter() - start) < seconds:
            while len(running) < rng.randint(1, max_clients):
                running.add(asyncio.create_task(one()))
            done, running = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if now >= next_sample:
                samples.append((now, server.rss_mb()))
                next_sample += 5.0
        await asyncio.gather(*running)
    samples.append((time.perf_counter() - start, server.rss_mb()))
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per round")
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of mixed load with disconnects (0 = none)")
    a = parser.parse_args()
    counts = [int(c) for c in a.clients.split(",")]
    print(f"# {cpu_name()}, {cores()} cores, torch {torch.__version__}, {load_average()}")
    print(
        f"# medium model (dim 512, 8 layers, vocab 100008, fp32), max_tokens {a.max_tokens}, prompt '{PROMPT[:30]}...'"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp))
        header = f"{'server':<16}{'clients':>8}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>9}{'ITL p95':>9}"
        print(header + f"{'refused':>9}{'server CPU ms/token':>21}")
        for label, max_batch in (("batching (16)", 16), ("--max-batch 1", 1)):
            server = Server(model_dir, max_batch, max_queue=max(counts))
            try:
                asyncio.run(round_of(server, 1, 4, a.timeout))  # warm-up
                for n in counts:
                    r = asyncio.run(round_of(server, n, a.max_tokens, a.timeout))
                    print(
                        f"{label:<16}{n:>8}{r['tok_s']:>9.1f}{r['ttft50'] * 1e3:>8.0f}ms{r['ttft95'] * 1e3:>8.0f}ms"
                        f"{r['itl50'] * 1e3:>7.0f}ms{r['itl95'] * 1e3:>7.0f}ms{r['refused']:>9}{r['cpu_ms']:>21.1f}",
                        flush=True,
                    )
                if a.soak and max_batch > 1:
                    samples = asyncio.run(soak(server, a.soak, max(counts)))
                    rss = [mb for _, mb in samples]
                    print(f"# soak {a.soak:.0f}s: RSS MB first {rss[0]:.0f}, max {max(rss):.0f}, last {rss[-1]:.0f}")
                    marks = [samples[round(q * (len(samples) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
                    print("# RSS over the soak: " + ", ".join(f"{t:.0f} s {mb:.0f} MB" for t, mb in marks))
                    health = httpx.get(f"{server.url}/health").json()
                    print(f"# after soak: running {health['running']}, waiting {health['waiting']}")
            finally:
                server.stop()
    print(f"# {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
