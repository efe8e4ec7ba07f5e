"""KV cache and prefix reuse (issue 22): chats per cache budget, TTFT after a shared system prompt, eval 5-shot.

    .venv/bin/python bench/kv_cache.py                 # all three parts (15 minutes on 2 shared cores)
    .venv/bin/python bench/kv_cache.py --parts memory  # memory, ttft, eval: comma-separated
    .venv/bin/python bench/kv_cache.py --shape medium  # ttft and eval on the medium shape instead of the ~1B

1. memory: at a fixed budget (the bytes of today's whole-row cache: --rows rows of max_seq_len 2,048, the medium
   shape's 32 KiB a position), how many concurrent 300-token chats fit. The block pool's count is real allocation:
   a `BlockPool` of that many bytes (scratch block included) is made and 300-position block tables are reserved in
   it until one no longer fits; also with a 200-token system prompt every chat shares (forked tables). Today's
   rows = budget // (2,048 positions); each held one chat whatever its length.
2. ttft: `aquila serve` of the ~1B shape (aquila-1b's dim 2048, 16 layers, with the demo tokenizer's vocabulary
   of 16,008 as in bench/laptop.py; fp32 random weights, max_seq_len 2,048), prefix cache on and
   `--no-prefix-cache` (today: every prompt read whole). Per round a fresh 1,000-id
   system prompt: request A (system + 20 user ids, streamed, max_tokens 2) is sent alone, then request B (the same
   system prompt, other user ids); TTFT = request sent -> first text chunk. Median of --rounds rounds.
3. eval: the MMLU example files (examples/eval_data/mmlu, 7 items in 2 subjects; dev has 5 items a subject, as in
   MMLU, so "5-shot" uses them all), scored in-process with the functions `aquila eval` runs (`evaluate_task`, a fresh
   `ChoiceScorer` per run, model loading excluded), prefix cache on and off, alternated --rounds times; best time
   per mode; the scores must be identical.

Why the ~1B shape and not the medium one of bench/serve.py: what prefix reuse cannot save is one forward of the
remaining tokens, which reads every weight once, and the medium shape's weights are two thirds output layer (vocab
100,008 x dim 512), so that one read weighs as much as reading 200 prompt tokens there; in the ~1B shape (and
in Aquila-7B) the output layer is a small part, as in real models. `--shape medium` runs the medium shape.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cores, cpu_name, load_average  # noqa: E402
from serve import DEMO_TOKENIZER, Server  # noqa: E402

from aquila.checkpoint import build_model, save_model_dir  # noqa: E402
from aquila.config import ModelArgs  # noqa: E402
from aquila.inference.kv_cache import BlockPool, BlockTable  # noqa: E402

SHAPE = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=100008, max_seq_len=2048)  # medium, 2k context
SHAPES = {"medium": SHAPE, "1b": ModelArgs(**{**ModelArgs.from_name("aquila-1b").to_dict(), "vocab_size": 16008})}
EXAMPLES = ROOT / "examples" / "eval_data"


def memory(rows: int, chat: int = 300, system: int = 200) -> None:
    a, bs = SHAPE, BlockPool.BLOCK_SIZE
    per_position = 2 * a.n_layers * a.kv_heads * a.head_dim * 4
    budget = rows * a.max_seq_len * per_position  # today's whole-row cache
    old_rows = budget // (a.max_seq_len * per_position)
    pool = BlockPool(a.n_layers, a.kv_heads, a.head_dim, budget // (bs * per_position) - 1, bs)
    assert pool.nbytes() <= budget

    def fill(tables: list[BlockTable], make) -> int:
        while True:
            t = make()
            if t is None or not t.reserve(chat):
                if t is not None:
                    t.release()
                return len(tables)
            tables.append(t)

    alone: list[BlockTable] = []
    n_alone = fill(alone, lambda: BlockTable(pool))
    for t in alone:
        t.release()
    assert pool.used_blocks == 0
    sys_table = BlockTable(pool)
    sys_table.reserve(system)
    shared: list[BlockTable] = []

    def fork():
        try:
            return sys_table.fork(system)
        except Exception:
            return None

    n_shared = fill(shared, fork)
    print(
        f"\n## memory: budget {budget / 2**30:.2f} GiB = {rows} whole rows x {a.max_seq_len} positions"
        f" ({per_position // 1024} KiB a position)"
    )
    print("| cache | concurrent 300-token chats | vs whole rows |\n|---|---:|---:|")
    print(f"| whole rows (max_seq_len {a.max_seq_len}) | {old_rows} | 1.0x |")
    print(f"| block pool ({pool.blocks} blocks of {bs}), distinct prompts | {n_alone} | {n_alone / old_rows:.1f}x |")
    print(f"| block pool, a {system}-token system prompt shared | {n_shared} | {n_shared / old_rows:.1f}x |")


def write_model(root: Path, shape: str) -> Path:
    model = build_model(SHAPES[shape], seed=0)
    with torch.no_grad():  # only ids the demo tokenizer decodes, never EOS (16007), BOS (16006) or unk (0)
        model.output.weight[16006:] = 0
        model.output.weight[0] = 0
    out = root / shape
    save_model_dir(model, out, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
    del model
    return out


async def ttft_of(client: httpx.AsyncClient, url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith('data: {"id"') and '"text": ""' not in line:
                return time.perf_counter() - sent
    raise RuntimeError("no text chunk")


async def ttft_pairs(url: str, rounds: int, rng: random.Random) -> list[tuple[float, float]]:
    """Per round: (TTFT of system + user A, TTFT of the same system + user B), a fresh system prompt each round."""

    def ids(n: int) -> list[int]:
        return [rng.randrange(100, 16000) for _ in range(n)]

    out = []
    async with httpx.AsyncClient(timeout=300) as client:
        await ttft_of(client, url, ids(50))  # warm-up
        for _ in range(rounds):
            system = [16006, *ids(999)]
            a = await ttft_of(client, url, system + ids(20))
            b = await ttft_of(client, url, system + ids(20))
            out.append((a, b))
    return out


def ttft(model_dir: Path, rounds: int) -> None:
    rows = []
    for label, extra in (("prefix cache", ()), ("--no-prefix-cache", ("--no-prefix-cache",))):
        server = Server(model_dir, 4, 4, ("--max-prompt-tokens", "1100", "--max-new-tokens", "16", *extra))
        try:
            pairs = asyncio.run(ttft_pairs(server.url, rounds, random.Random(0)))
        finally:
            server.stop()
        first = statistics.median(a for a, _ in pairs)
        second = statistics.median(b for _, b in pairs)
        rows.append((label, first, second, [f"{a * 1e3:.0f}/{b * 1e3:.0f}" for a, b in pairs]))
    print(f"\n## ttft: 1,000-id system prompt + 20 user ids, {model_dir.name} shape, median of {rounds} rounds")
    print("| server | TTFT first request | TTFT second (same system prompt) | second / first | rounds (ms) |")
    print("|---|---:|---:|---:|---|")
    for label, first, second, raw in rows:
        print(f"| {label} | {first * 1e3:.0f} ms | {second * 1e3:.0f} ms | {second / first:.3f} | {', '.join(raw)} |")


def evaluation(model_dir: Path, rounds: int, shots: int = 5) -> None:
    from aquila.evaluation.cli import load_model
    from aquila.evaluation.runner import evaluate_task
    from aquila.evaluation.scoring import ChoiceScorer
    from aquila.evaluation.tasks import load_task

    model, get_tokenizer = load_model(model_dir, "cpu", torch.float32)
    tok = get_tokenizer()
    stop_ids = {tok.token_end_id, getattr(tok, "token_pad_id", tok.token_end_id)}
    subsets = load_task("mmlu", EXAMPLES, 0)
    times: dict[bool, list[float]] = {True: [], False: []}
    results, hits = {}, {}
    for _ in range(rounds):
        for sharing in (True, False):
            scorer = ChoiceScorer(model, 16, stop_ids, prefix_cache=sharing)
            t = time.perf_counter()
            results[sharing] = evaluate_task(scorer, tok, "mmlu", subsets, shots, 0, log=lambda _: None)
            times[sharing].append(time.perf_counter() - t)
            hits[sharing] = scorer.prefix_hits
    same = results[True] == results[False]
    n = results[True]["n"]
    print(f"\n## eval: aquila eval's scoring, mmlu example files ({n} items), {shots}-shot, {model_dir.name} shape,"
          f" best of {rounds}")  # fmt: skip
    print("| scorer | time | prefix hit blocks | acc | em |\n|---|---:|---:|---:|---:|")
    for sharing in (True, False):
        r = results[sharing]
        label = "prefix cache" if sharing else "--no-prefix-cache"
        print(f"| {label} | {min(times[sharing]):.3f} s | {hits[sharing]} | {r['acc']:.3f} | {r['em']:.3f} |")
    print(f"speed-up {min(times[False]) / min(times[True]):.2f}x; scores identical: {same}")
    print("all times (s): " + "; ".join(f"{k}: {', '.join(f'{t:.3f}' for t in v)}" for k, v in times.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="memory,ttft,eval")
    parser.add_argument("--rows", type=int, default=16, help="whole rows of today's cache that set the budget")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="model for ttft and eval")
    a = parser.parse_args()
    parts = a.parts.split(",")
    print(f"# {cpu_name()}, {cores()} cores, torch {torch.__version__}, {load_average()}")
    if "memory" in parts:
        memory(a.rows)
    if "ttft" in parts or "eval" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_model(Path(tmp), a.shape)
            if "ttft" in parts:
                ttft(model_dir, a.rounds)
            if "eval" in parts:
                evaluation(model_dir, a.rounds)
    print(f"# {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
