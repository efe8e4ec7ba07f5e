"""The decoding core: requests decoded through a KV cache of blocks that the decoder owns, as small functions.

- `Request` is one generation request (prompt ids, length, sampling, seed, stops); `Sequence` is its decoding
  state: its block table (`kv_cache.BlockTable`), how many of its positions are cached, its sampler, its ids and
  text, and the stop check (`accept`: stop ids, stop strings, length and an optional predicate, all in one place).
- `forward_rows` runs groups of rows (block tables, start positions, token chunks) as one cached forward of the
  model; `prefill` reads prompt chunks into tables; `pick` samples per row.
- `DecodeBatch` holds the running sequences and their `BlockPool`: `add` a sequence, `step` (sample, stop-check,
  then one forward: every decoding sequence's token and a chunk of the waiting prompts under a token budget). A
  sequence grows block by block and returns its blocks when it ends; when the pool runs out, the newest sequence
  is preempted and re-reads its context later. Predictor (single, batch, stream, chat), evaluation scoring and the
  server's scheduler all decode through it; `beam_search` uses the same forward, beams forking block tables.

A row's result does not depend on its neighbours: every row has its own positions and attends only to its own
blocks, so an offline batch, a request joining a running batch and a request alone give the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from aquila.errors import AquilaError
from aquila.inference.kv_cache import BlockPool, BlockTable, PoolExhausted, group_inputs
from aquila.inference.sampling import SamplingParams, sample
from aquila.inference.text import TextAssembler
from aquila.model import AquilaModel
from aquila.model.aquila_model import CachedRows


@dataclass(frozen=True)
class Request:
    """One generation request: the type behind every Predictor method, the server and evaluation."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0))
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    stop_ids: tuple[int, ...] = ()
    strip: bool = False  # chat answers: no leading/trailing whitespace
    logprobs: bool = False
    top_logprobs: int = 0  # with logprobs: also the most likely ids and their log-probabilities at each step
    stop_when: Callable[[list[int]], bool] | None = None  # extra stop test on the ids so far (evaluation)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids (a final stop id excluded)
    finish_reason: str | None = None  # "stop" (a stop id, a stop string) or "length"
    prompt_tokens: int = 0
    logprobs: list[float] | None = None  # per generated id, from the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per generated id: the request's top_logprobs best


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_request(model: AquilaModel, r: Request, name: str = "prompt") -> None:
    vocab, limit = model.args.vocab_size, model.args.max_seq_len
    if len(r.prompt) == 0:
        raise AquilaError(f"{name} is empty")
    if len(r.prompt) >= limit:
        raise AquilaError(f"{name} has {len(r.prompt)} tokens; the model's max_seq_len {limit} leaves no room")
    bad = [t for t in r.prompt if not (0 <= int(t) < vocab)]
    if bad:
        raise AquilaError(f"{name} has token ids outside [0, {vocab}): {bad[:5]}")
    if r.max_new_tokens < 1:
        raise AquilaError(f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    if r.seed is not None and not -(2**63) <= r.seed < 2**64:  # torch.Generator.manual_seed's range
        raise AquilaError(f"seed must be an integer in [-2**63, 2**64), got {r.seed}")


def cache_length(needed: int, limit: int) -> int:
    """Round the cache length up (multiples of 256) so that similar requests reuse one allocation."""
    return min(limit, -(-needed // 256) * 256)


class Sequence:
    """A request being decoded in one cache row."""

    def __init__(self, request: Request, model: AquilaModel, tokenizer=None) -> None:
        self.request = request
        device = model_device(model)
        self.max_new = min(request.max_new_tokens, model.args.max_seq_len - len(request.prompt))
        self.cached = 0  # positions of this sequence already in its block table
        self.table: BlockTable | None = None  # its KV blocks, while it holds any
        self.logits: torch.Tensor | None = None  # [V] next-token logits, once its context is in
        self.generator = None
        if request.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(request.seed))
        self.seen = None  # bool [1, V], only with a repetition penalty
        if request.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, model.args.vocab_size, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt, device=device)] = True
        self.counts = None  # float [1, V]: generated tokens, only with a presence or frequency penalty
        if request.params.counts_tokens:
            self.counts = torch.zeros(1, model.args.vocab_size, device=device)
        self.text = TextAssembler(tokenizer, request.stop, request.strip) if tokenizer is not None else None
        self.completion = Completion(prompt_tokens=len(request.prompt), logprobs=[] if request.logprobs else None)
        if request.logprobs and request.top_logprobs:
            self.completion.top_logprobs = []
        self.steps = 0  # tokens sampled (stop ids included)

    @property
    def context(self) -> list[int]:
        """The ids its cache holds once read: the prompt and the tokens generated so far (re-read after preemption)."""
        return [*self.request.prompt, *self.completion.token_ids]

    @property
    def prefilling(self) -> bool:
        """Reading its context (the prompt, or after a preemption everything so far) into the cache."""
        return self.logits is None

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None

    def accept(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> str:
        """Take a sampled token: the stop checks, then the newly safe text ("" when none or no tokenizer)."""
        c, r = self.completion, self.request
        self.steps += 1
        if token in r.stop_ids:
            return self.finish("stop")
        c.token_ids.append(token)
        if c.logprobs is not None and logprob is not None:
            c.logprobs.append(logprob)
        if c.top_logprobs is not None and top is not None:
            c.top_logprobs.append(top)
        piece = self.text.push([token]) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            return piece + self.finish("stop")
        if r.stop_when is not None and r.stop_when(c.token_ids):
            return piece + self.finish("stop")
        if self.steps >= self.max_new:
            return piece + self.finish("length")
        return piece

    def finish(self, reason: str) -> str:
        """End the sequence (stop, length, time limit, cancellation); returns the held-back text."""
        if self.finished:
            return ""
        self.completion.finish_reason = reason
        tail = self.text.finish() if self.text is not None else ""
        if self.text is not None:
            self.completion.text = self.text.text
        return tail


# --- one forward pass over rows ---------------------------------------------------------------------------------
@torch.no_grad()
def forward_rows(
    model: AquilaModel,
    pool: BlockPool,
    groups: list[tuple[list[BlockTable], list[int], list[list[int]]]],
    ends: list[list[tuple[int, int]]] | None = None,
    cached_forward: Callable | None = None,
) -> torch.Tensor:
    """One cached forward over groups of rows (tables, start positions, token chunks; every table already holds its
    chunk's positions): fp32 logits [n, V] after the tokens listed in `ends` (per group, (row, index in chunk));
    default: each row's last token."""
    device = model_device(model)
    built, logits_at, offset = [], [], 0
    for gi, (tables, starts, chunks) in enumerate(groups):
        ids, pos, slots, table_ids, last = group_inputs(tables, starts, chunks, device)
        kv_len = max(s + len(c) for s, c in zip(starts, chunks))
        built.append(CachedRows(ids, pos, slots, table_ids, kv_len))
        width = ids.shape[1]
        rows = [(i, last[i]) for i in range(len(chunks))] if ends is None else ends[gi]
        logits_at += [offset + i * width + j for i, j in rows]
        offset += ids.numel()
    if cached_forward is not None:
        return cached_forward(model, built, pool, torch.tensor(logits_at, device=device))
    return model.cached_forward(built, pool, logits_at)


@torch.no_grad()
def decode_step(
    model: AquilaModel,
    pool: BlockPool,
    tables: torch.Tensor,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    kv_len: int,
) -> torch.Tensor:
    """Tokens [b, 1] of rows with block tables [b, n] (ids, holding input_pos) at positions input_pos [b, 1]: logits
    [b, V]. Tensor ops only, so it compiles at fixed shapes (CUDA graphs: tests/test_cuda.py, bench/gpu_check_decode)."""
    bs = pool.block_size
    slots = tables.gather(1, input_pos // bs) * bs + input_pos % bs
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return model.cached_forward([CachedRows(tokens, input_pos, slots, tables, kv_len)], pool, rows)


def prefill(model: AquilaModel, pool: BlockPool, tables: list[BlockTable], chunks: list[list[int]], starts: list[int]):
    """Prompt chunks of several rows (row i from position starts[i]) into their tables; the logits [b, V] after each
    row's last chunk token."""
    for t, c, s in zip(tables, chunks, starts):
        if not t.reserve(s + len(c)):
            raise PoolExhausted(f"the KV pool has {pool.free_blocks} free blocks; a prompt chunk needs more")
    return forward_rows(model, pool, [(tables, starts, chunks)])


def pick(
    logits: torch.Tensor, seqs: Seq[Sequence]
) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """One token per row from logits [b, V], each row with its own sampling parameters, seed and history; with
    `logprobs`, the chosen token's log-probability under the model (before any penalty or temperature) and the
    row's `top_logprobs` most likely (id, log-probability)."""
    want_lp = any(s.request.logprobs for s in seqs)
    lps = torch.log_softmax(logits, -1) if want_lp else None
    if all(s.request.params.greedy and s.seen is None and s.counts is None for s in seqs):
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = []
        for i, s in enumerate(seqs):
            token = int(sample(logits[i : i + 1], s.request.params, s.seen, s.generator, s.counts)[0])
            if s.seen is not None:
                s.seen[0, token] = True
            if s.counts is not None:
                s.counts[0, token] += 1
            tokens.append(token)
    chosen = [float(lps[i, t]) if lps is not None else None for i, t in enumerate(tokens)]
    tops: list[list[tuple[int, float]] | None] = [None] * len(seqs)
    for i, s in enumerate(seqs):
        if lps is not None and s.request.logprobs and s.request.top_logprobs:
            best = torch.topk(lps[i], min(s.request.top_logprobs, lps.shape[-1]))
            tops[i] = list(zip(best.indices.tolist(), best.values.tolist()))
    return tokens, chosen, tops


class DecodeBatch:
    """Up to `rows` sequences decoding together, their KV cache in blocks of `pool` (by default one holding
    `rows` x `max_len` positions; a smaller pool holds as many sequences as their current lengths allow).

    Each step, in arrival order (older first), every decoding sequence gets a block for its next position when it
    needs one and the waiting prompts get blocks for their chunk; when the pool runs out, the newest sequence
    holding blocks is preempted: its blocks return to the pool and it re-reads its prompt and generated tokens later
    (recompute, as vLLM), with the same sampler state, so its tokens do not change. A sequence that finishes returns
    its blocks at once; nothing is copied to compact.

    `prefill_tokens` bounds the prompt tokens run per step (chunked prefill) while rows are decoding, so a long
    prompt joining a running batch delays the running rows by one chunk at a time; with no row decoding nobody waits
    on a step, and the budget grows to all waiting prompt tokens. None reads every prompt whole.
    """

    def __init__(
        self,
        model: AquilaModel,
        rows: int,
        max_len: int,
        tokenizer=None,
        prefill_tokens: int | None = None,
        compile: bool = False,
        pool: BlockPool | None = None,
    ) -> None:
        if max_len > model.args.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
        self.model, self.tokenizer, self.rows, self.max_len = model, tokenizer, rows, max_len
        self.pool = pool if pool is not None else BlockPool.for_model(model, rows * max_len)
        self.prefill_tokens = prefill_tokens
        self.forward = compiled_forward_rows() if compile else forward_rows
        self.seqs: list[Sequence] = []  # in arrival order: the older, the sooner it gets blocks
        self.device = model_device(model)
        self.preemptions = 0
        self._preempted: set[Sequence] = set()  # during one step's reservations

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.seqs)

    @property
    def decoding(self) -> int:
        return sum(not s.prefilling for s in self.seqs)

    def add(self, request: Request) -> Sequence:
        if not self.free_rows:
            raise AquilaError("no free row in the decode batch")
        if len(request.prompt) + 1 > self.max_len:
            raise AquilaError(f"prompt has {len(request.prompt)} tokens; the cache holds {self.max_len}")
        seq = Sequence(request, self.model, self.tokenizer)
        seq.max_new = min(seq.max_new, self.max_len - len(request.prompt))
        longest = len(request.prompt) + seq.max_new
        if self.pool.blocks_for(longest) > self.pool.blocks:
            raise AquilaError(f"{longest} positions need more KV blocks than the pool's {self.pool.blocks}")
        seq.table = BlockTable(self.pool)
        self.seqs.append(seq)
        return seq

    def adopt(self, seq: Sequence) -> None:
        """A sequence whose context and next logits the caller already put into `seq.table` (evaluation)."""
        if seq.prefilling or seq.table is None or seq.table.pool is not self.pool:
            raise AquilaError("adopt needs a sequence already read into this batch's pool")
        self.seqs.append(seq)

    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every decoding sequence, then one forward: their new tokens and a chunk of the waiting
        prompts (read alone first when none is decoding). Returns (sequence, new text) for each sequence that
        sampled, finished ones included (they have left the batch)."""
        if not self.decoding:
            self._forward({})
        running = [s for s in self.seqs if not s.prefilling]
        if not running:
            return []
        tokens, lps, tops = pick(torch.stack([s.logits for s in running]), running)
        out = [(s, s.accept(t, lp, top)) for s, t, lp, top in zip(running, tokens, lps, tops)]
        for s in running:
            if s.finished:
                self._leave(s)
        self._forward({s: t for s, t in zip(running, tokens) if not s.finished})
        return out

    def cancel(self, seq: Sequence, reason: str) -> str:
        """Finish a sequence from outside (time limit, client gone) and return its blocks; returns held-back text."""
        tail = seq.finish(reason)
        if seq in self.seqs:
            self._leave(seq)
        return tail

    def close(self) -> None:
        """End every sequence still in the batch, returning all its blocks."""
        for seq in list(self.seqs):
            self.cancel(seq, "cancelled")

    # --- internals -------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> list[Sequence]:
        return [s for s in self.seqs if s.prefilling]

    def _leave(self, seq: Sequence) -> None:
        self.seqs.remove(seq)
        if seq.table is not None:
            seq.table.release()

    def _preempt(self, seq: Sequence) -> None:
        """Return seq's blocks; it re-reads its context later (its sampler and history stay as they are)."""
        seq.table.release()
        seq.cached, seq.logits = 0, None
        self._preempted.add(seq)
        self.preemptions += 1

    def _reserve(self, seq: Sequence, positions: int) -> bool:
        """Blocks for seq's positions [0, positions), preempting newer sequences while the pool is short."""
        while not seq.table.reserve(positions):
            victims = [s for s in self.seqs[self.seqs.index(seq) + 1 :] if s.table.blocks]
            if not victims:
                return False
            self._preempt(victims[-1])
        return True

    def _prompt_chunks(self) -> tuple[list[Sequence], list[list[int]]]:
        """The waiting sequences to read this step and their context chunks, within the token budget."""
        waiting = self.waiting
        if not waiting:
            return [], []
        remaining = [len(s.context) - s.cached for s in waiting]
        if self.prefill_tokens is None:
            width, take = max(remaining), len(waiting)
        else:  # padded tokens of this step's forward stay within the budget (all prompt tokens when none decodes)
            budget = self.prefill_tokens if self.decoding else max(self.prefill_tokens, sum(remaining))
            width = min(max(remaining), budget)
            take = max(1, min(len(waiting), budget // width))
        return waiting[:take], [s.context[s.cached : s.cached + width] for s in waiting[:take]]

    def _forward(self, tokens: dict[Sequence, int]) -> None:
        """Feed each decoding sequence its sampled token at its own position and a chunk of the waiting contexts,
        in one forward (every weight read once for both), after giving each the blocks it writes (older first: a
        preempted sequence is always newer than the one that needed its blocks)."""
        for s in self.waiting:  # starting to read: take what the pool already holds of its leading ids
            if not s.cached and not s.table.blocks:
                s.cached = s.table.match_prefix(s.context)
        waiting, chunks = self._prompt_chunks()
        want = {s: s.cached + 1 for s in tokens} | {s: s.cached + len(c) for s, c in zip(waiting, chunks)}
        ready: set[Sequence] = set()
        self._preempted.clear()
        for seq in [s for s in self.seqs if s in want]:
            if seq in self._preempted:
                continue
            if self._reserve(seq, want[seq]):
                ready.add(seq)
            elif seq in tokens:
                self._preempt(seq)  # no newer sequence to take blocks from: it waits and re-reads later
        running = [s for s in tokens if s in ready]
        kept = [i for i, s in enumerate(waiting) if s in ready]
        waiting, chunks = [waiting[i] for i in kept], [chunks[i] for i in kept]
        groups, ends = [], []
        if running:
            groups.append(([s.table for s in running], [s.cached for s in running], [[tokens[s]] for s in running]))
            ends.append([(i, 0) for i in range(len(running))])
        finishing = [i for i, (s, c) in enumerate(zip(waiting, chunks)) if s.cached + len(c) == len(s.context)]
        if waiting:
            groups.append(([s.table for s in waiting], [s.cached for s in waiting], chunks))
            ends.append([(i, len(chunks[i]) - 1) for i in finishing])
        if not groups:
            return
        logits = self.forward(self.model, self.pool, groups, ends)
        for s, row_logits in zip(running, logits):
            s.cached += 1
            s.logits = row_logits
        for s, c in zip(waiting, chunks):
            s.cached += len(c)
        for i, row_logits in zip(finishing, logits[len(running) :]):
            waiting[i].logits = row_logits
        for s in (*running, *waiting):  # blocks just filled become shareable prefixes
            if (s.cached // self.pool.block_size) > s.table.registered:
                s.table.register_full(s.context, s.cached)


_COMPILED: dict[str, Callable] = {}


def compiled_forward_rows() -> Callable:
    """`forward_rows` with the model's cached forward under torch.compile (dynamic shapes; compiled once)."""
    if "rows" not in _COMPILED:
        _COMPILED["rows"] = torch.compile(_cached_forward, dynamic=True)
    return functools.partial(forward_rows, cached_forward=_COMPILED["rows"])


def _cached_forward(model: AquilaModel, groups: list[CachedRows], pool: BlockPool, logits_at) -> torch.Tensor:
    return model.cached_forward(groups, pool, logits_at)


def run(batch: DecodeBatch, requests: Seq[Request]) -> list[Completion]:
    """Decode requests to their end, up to `batch.rows` at a time (offline batches, evaluation)."""
    waiting = list(requests)
    seqs: list[Sequence] = []
    while waiting or batch.seqs:
        while waiting and batch.free_rows:
            seqs.append(batch.add(waiting.pop(0)))
        batch.step()
    return [s.completion for s in seqs]


# --- beam search over the same steps ----------------------------------------------------------------------------
@torch.no_grad()
def beam_search(
    model: AquilaModel,
    prompt: Seq[int],
    max_new_tokens: int,
    beam_size: int,
    stop_ids: Seq[int] = (),
    length_penalty: float = 1.0,
) -> list[int]:
    """Beam search for one prompt: the best hypothesis' ids (stop id excluded).

    Each step keeps the `beam_size` best continuations by summed log-probability; a continuation ending in a stop
    id among the top `beam_size` candidates becomes a finished hypothesis, scored by sum / length**length_penalty.
    The search ends once `beam_size` hypotheses have finished (HF's early_stopping=True), so beam 1 is greedy.
    """
    if beam_size < 1:
        raise AquilaError(f"beam_size must be >= 1, got {beam_size}")
    check_request(model, Request(tuple(prompt), max_new_tokens))
    device = model_device(model)
    width = len(prompt)
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - width)
    pool = BlockPool.for_model(model, 2 * beam_size * (width + max_new_tokens + BlockPool.BLOCK_SIZE))
    stop_set = set(stop_ids)

    prompt_table = BlockTable(pool)
    logits = prefill(model, pool, [prompt_table], [list(prompt)], [0])
    tables = [prompt_table.fork(width) for _ in range(beam_size)]  # the prompt's full blocks shared by every beam
    prompt_table.release()
    scores = torch.full((beam_size,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start as copies of one: only row 0 may expand at the first step
    logits = logits.expand(beam_size, -1)
    beams: list[list[int]] = [[] for _ in range(beam_size)]
    finished: list[tuple[float, list[int]]] = []

    def normalised(total: float, length: int) -> float:
        return total / (max(length, 1) ** length_penalty)

    try:
        for step in range(max_new_tokens):
            candidates = scores[:, None] + torch.log_softmax(logits.float(), -1)
            top_scores, top_idx = torch.topk(candidates.view(-1), min(2 * beam_size, candidates.numel()))
            vocab = logits.shape[-1]
            parents, next_tokens, next_scores = [], [], []
            for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
                parent, token = divmod(idx, vocab)
                if token in stop_set:
                    if rank < beam_size:
                        finished.append((normalised(score, len(beams[parent]) + 1), beams[parent]))
                    continue
                parents.append(parent)
                next_tokens.append(token)
                next_scores.append(score)
                if len(parents) == beam_size:
                    break
            if len(finished) >= beam_size or not parents or step + 1 == max_new_tokens:
                break
            while len(parents) < beam_size:  # fewer live candidates than beams (tiny vocabularies): a dead beam
                parents.append(parents[0])
                next_tokens.append(next_tokens[0])
                next_scores.append(float("-inf"))
            beams = [beams[p] + [t] for p, t in zip(parents, next_tokens)]
            # each new beam continues its parent: shared full blocks, its own copy of the block it writes
            forked = [tables[p].fork(width + step) for p in parents]
            for t in tables:
                t.release()
            tables = forked
            scores = torch.tensor(next_scores, device=device)
            logits = prefill(model, pool, tables, [[t] for t in next_tokens], [width + step] * beam_size)
    finally:
        for t in tables:
            t.release()
    if not finished or len(finished) < beam_size:
        # Out of length: live beams compete with finished ones (last step's candidates included).
        for score, token, parent in zip(next_scores, next_tokens, parents):
            if score > float("-inf"):
                finished.append((normalised(score, len(beams[parent]) + 1), beams[parent] + [token]))
    return max(finished, key=lambda f: f[0])[1] if finished else []
