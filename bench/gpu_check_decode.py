"""Part `decode` of bench/gpu_check.py: greedy decode speed of a randomly initialised model, gpt-fast style.

Prefill and decode go through the decoding core (`aquila.inference.generate.prefill` / `decode_step`). The
compiled step reads a fixed `kv_len` (the whole cache, masked per row), so shapes stay static and
`mode="reduce-overhead"` can replay one CUDA graph per token. The bandwidth limit is the HBM bandwidth divided by
the bytes of the weights (one decode step reads each once).
"""

from __future__ import annotations

import copy
import time

from gpu_check_common import Budget, dtype_name, error_text, guarded, row, sync

PROMPT_LEN = 16


def compile_step(backend: str, fullgraph: bool):
    import torch

    from aquila.inference.generate import decode_step

    torch._dynamo.reset()  # each configuration starts clean (cache shapes and buffers differ)
    kwargs = {"mode": "reduce-overhead"} if backend == "inductor" else {}
    return torch.compile(decode_step, backend=backend, fullgraph=fullgraph, dynamic=False, **kwargs)


def tokens_per_s(model, step_fn, batch: int, new_tokens: int, warmup: int, compiled: bool) -> tuple[float, float]:
    """(tokens/s over `new_tokens` greedy steps of `batch` rows, seconds spent in the warm-up steps)."""
    import torch

    from aquila.inference.generate import model_device, prefill
    from aquila.inference.kv_cache import BlockPool, BlockTable

    device = model_device(model)
    cache_len = -(-(PROMPT_LEN + warmup + new_tokens + 1) // 64) * 64
    pool = BlockPool.for_model(model, batch * cache_len)
    tables = [BlockTable(pool) for _ in range(batch)]
    for t in tables:
        t.reserve(cache_len)
    table_ids = torch.tensor([t.blocks for t in tables], device=device)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.args.vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
    logits = prefill(model, pool, tables, prompts, [0] * batch)
    tok = logits.argmax(-1)[:, None]
    pos = torch.full((batch, 1), PROMPT_LEN, dtype=torch.long, device=device)

    def one() -> None:
        nonlocal tok
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        out = step_fn(model, pool, table_ids, tok, pos, cache_len)
        tok = out.argmax(-1)[:, None]
        pos.add_(1)

    t0 = time.perf_counter()
    for _ in range(warmup):
        one()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        one()
    sync(device)
    dt = time.perf_counter() - t0
    return batch * new_tokens / dt, warm_s


def copy_bandwidth_tbps(device) -> float:
    """Device-to-device copy, bytes read + written per second (best of 5), TB/s."""
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device=device)  # 1 GiB, far past the L2
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() / best / 1e12


def core_tokens_per_s(model, new_tokens: int) -> float:
    """Batch-1 greedy generation through DecodeBatch, as `aquila generate` and the server run it (eager)."""
    import torch

    from aquila.inference.generate import DecodeBatch, Request, run

    gen = torch.Generator().manual_seed(1)
    request = Request(tuple(torch.randint(0, model.args.vocab_size, (PROMPT_LEN,), generator=gen).tolist()), new_tokens)
    batch = DecodeBatch(model, 1, PROMPT_LEN + new_tokens + 1)
    run(batch, [Request(request.prompt, 2)])  # warm-up
    sync(model.output.weight.device)
    t0 = time.perf_counter()
    done = run(batch, [request])[0]
    sync(model.output.weight.device)
    return len(done.token_ids) / (time.perf_counter() - t0)


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))


def measure(name: str, model, args, batch: int, compiled: bool, limit: float | None) -> float | None:
    """One row: tokens/s of `batch` rows, eager or compiled; a failed compile with fullgraph retries without."""
    from aquila.inference.generate import decode_step

    tokens = args.decode_tokens
    note = ""
    if not compiled:
        tps, _ = tokens_per_s(model, decode_step, batch, tokens, 3, False)
    else:
        skips = cudagraph_skips()
        try:
            tps, warm = tokens_per_s(model, compile_step(args.compile_backend, True), batch, tokens, 4, True)
        except Exception as e:
            row(f"{name} (fullgraph)", error_text(e))
            tps, warm = tokens_per_s(model, compile_step(args.compile_backend, False), batch, tokens, 4, True)
            note = "; with graph breaks"
        note += f"; compile + warm-up {warm:.0f} s"
        if cudagraph_skips() > skips:
            note += "; CUDA graphs SKIPPED (see the part log)"
    share = f", {tps / batch / limit * 100:.0f}% of the bandwidth limit" if limit and batch == 1 else ""
    row(name, f"{tps:,.1f} tok/s{share}{note}")
    return tps


def decode_part(args, budget: Budget) -> None:
    import torch

    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.inference.quantize import quantize_model, weight_bytes

    torch._logging.set_logs(perf_hints=True)  # inductor's reasons for skipping CUDA graphs go to the part log
    if args.decode_tuning:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    margs = ModelArgs.from_name(args.decode_model)
    model = build_model(margs, device, dtype, seed=0).eval()
    nbytes = weight_bytes(model)
    limit = args.hbm_tbps * 1e12 / nbytes
    row(
        f"decode {args.decode_model} weights",
        f"{nbytes / 1e9:.2f} GB {dtype_name(dtype)}; limit {args.hbm_tbps} TB/s / bytes = {limit:,.0f} tok/s",
    )
    if cuda:
        guarded(
            "measured HBM copy bandwidth",
            lambda: row("measured HBM copy bandwidth", f"{copy_bandwidth_tbps(device):.2f} TB/s (read + write)"),
        )
    kind = "compiled reduce-overhead" if args.compile_backend == "inductor" else f"compiled ({args.compile_backend})"
    kind += ", tuned" if args.decode_tuning else ""
    # Most wanted first; each one only when the part's time budget still holds it.
    bf16_b1 = f"decode bf16 b1 {kind} (target >= 70%)"
    int8_b1 = f"decode int8 b1 {kind} (target >= 1.6x bf16)"
    seconds = {"eager": 20, "compiled": 70} if cuda else {"eager": 5, "compiled": 5}
    results: dict[str, float | None] = {}

    def one(name: str, m, batch: int, compiled: bool, lim: float) -> None:
        if budget.allows(name, seconds["compiled" if compiled else "eager"]):
            results[name] = guarded(name, lambda: measure(name, m, args, batch, compiled, lim))

    one("decode bf16 b1 eager", model, 1, False, limit)
    core = "decode bf16 b1 DecodeBatch (generate's path, eager)"
    if budget.allows(core, seconds["eager"]):
        guarded(core, lambda: row(core, f"{core_tokens_per_s(model, args.decode_tokens):,.1f} tok/s (prompt included)"))
    one(bf16_b1, model, 1, True, limit)
    if budget.allows(int8_b1, seconds["compiled"]):
        # A quantized copy; embeddings stay bf16: int8 embedding rows come out fp32 and would make every layer fp32.
        int8 = quantize_model(copy.deepcopy(model), embeddings=False)
        int8_limit = args.hbm_tbps * 1e12 / weight_bytes(int8)
        row("decode int8 weights", f"{weight_bytes(int8) / 1e9:.2f} GB; bandwidth limit {int8_limit:,.0f} tok/s")
        one(int8_b1, int8, 1, True, int8_limit)
        del int8
        if results.get(int8_b1) and results.get(bf16_b1):
            row("decode int8 / bf16 compiled b1", f"{results[int8_b1] / results[bf16_b1]:.2f}x")
    one(f"decode bf16 b16 {kind}", model, 16, True, limit)
