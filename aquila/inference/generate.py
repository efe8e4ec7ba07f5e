"""The decoding core's public face: `DecodeBatch` over the scheduler and the model runner, `run`, `beam_search`.

One step of a `DecodeBatch` is `schedule` then `execute`:
- `scheduler.Scheduler` decides the step without running the model: expiry, admission (rows and free blocks),
  the decoding sequences, the prompt chunks within the token budget, the blocks each writes, preemption;
- `runner.ModelRunner` runs that `StepPlan` as one cached forward of the model, then samples a token for every
  sequence the forward made due (decoding ones, and those whose last prompt chunk it read) and stop-checks it.
A sequence grows block by block and returns its blocks when it ends; when the pool runs out, a new request waits
and the newest running sequence is preempted and re-reads its context later. Predictor (single, batch, stream,
chat), evaluation scoring and the server's engine all decode through it; `beam_search` uses the runner's
`prefill`, beams forking block tables.

A row's result does not depend on its neighbours: every row has its own positions and attends only to its own
blocks, so an offline batch, a request joining a running batch and a request alone give the same tokens.

`Request`, `Completion` and `SequenceState` live in `sequence.py`; `forward_rows`, `prefill`, `decode_step` and
`pick` in `runner.py`; they are re-exported here for the modules and scripts that import them from this one.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from aquila.errors import AquilaError
from aquila.inference.kv_cache import BlockPool, BlockTable
from aquila.inference.runner import ModelRunner, compiled_forward_rows, decode_step, forward_rows, pick, prefill
from aquila.inference.scheduler import PromptChunk, Scheduler, StepPlan
from aquila.inference.sequence import Completion, Request, SequenceState, cache_length, check_request, model_device
from aquila.model import AquilaModel

# `Sequence` was this module's name for SequenceState (it shadowed collections.abc.Sequence); evaluation's scoring
# still imports it. Deprecated: use SequenceState.
Sequence = SequenceState

__all__ = [
    "Completion",
    "DecodeBatch",
    "ModelRunner",
    "PromptChunk",
    "Request",
    "Scheduler",
    "SequenceState",
    "StepPlan",
    "beam_search",
    "cache_length",
    "check_request",
    "compiled_forward_rows",
    "decode_step",
    "forward_rows",
    "model_device",
    "pick",
    "prefill",
    "run",
]


class DecodeBatch:
    """Up to `rows` sequences decoding together, their KV cache in blocks of `pool` (by default one holding
    `rows` x `max_len` positions; a smaller pool holds as many sequences as their current lengths allow).

    `add` queues a request; each `step` admits waiting requests while rows and blocks allow, runs one forward
    (every decoding sequence's newest token and a chunk of the reading prompts) and samples right after it. In
    arrival order (older first), every running sequence gets the blocks it writes; when the pool runs out, the
    newest sequence holding blocks is preempted: its blocks return to the pool and it re-reads its prompt and
    generated tokens later (recompute, as vLLM), with the same sampler state, so its tokens do not change. A
    sequence that finishes returns its blocks at once; nothing is copied to compact.

    `prefill_tokens` bounds the prompt tokens run per step (chunked prefill) while rows are decoding, so a long
    prompt joining a running batch delays the running rows by one chunk at a time; with no row decoding nobody waits
    on a step, and the budget grows to all waiting prompt tokens. None reads every prompt whole. `queue_timeout_s`
    and `max_waiting` are the server's: how long a request may wait for a row, and how many may wait.
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
        queue_timeout_s: float | None = None,
        max_waiting: int | None = None,
    ) -> None:
        if max_len > model.args.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {model.args.max_seq_len}")
        self.model, self.tokenizer, self.rows, self.max_len = model, tokenizer, rows, max_len
        self.pool = pool if pool is not None else BlockPool.for_model(model, rows * max_len)
        self.scheduler = Scheduler(self.pool, rows, prefill_tokens, queue_timeout_s, max_waiting)
        self.runner = ModelRunner(model, self.pool, compile)
        self._adopted: list[tuple[SequenceState, str]] = []  # tokens sampled by `adopt`, reported by the next step

    @property
    def seqs(self) -> list[SequenceState]:
        """Every unfinished sequence: running (arrival order), then waiting for a row."""
        return [*self.scheduler.running, *self.scheduler.waiting]

    @property
    def free_rows(self) -> int:
        """Rows no sequence holds or waits for."""
        return self.rows - len(self.scheduler.running) - len(self.scheduler.waiting)

    @property
    def decoding(self) -> int:
        return sum(not s.reading for s in self.scheduler.running)

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    def add(self, request: Request, arrival: float | None = None) -> SequenceState:
        """Queue a request; it gets a row at a step where rows and blocks allow (`arrival`: for the queue timeout)."""
        if len(request.prompt) + 1 > self.max_len:
            raise AquilaError(f"prompt has {len(request.prompt)} tokens; the cache holds {self.max_len}")
        seq = SequenceState(request, self.model, self.tokenizer, arrival)
        seq.max_new = min(seq.max_new, self.max_len - len(request.prompt))
        longest = len(request.prompt) + seq.max_new
        if self.pool.blocks_for(longest) > self.pool.blocks:
            raise AquilaError(f"{longest} positions need more KV blocks than the pool's {self.pool.blocks}")
        seq.table = BlockTable(self.pool)
        self.scheduler.add(seq)
        return seq

    def adopt(self, seq: SequenceState) -> None:
        """A sequence whose context and next logits (`seq.logits`) the caller already put into `seq.table`
        (evaluation): it samples from those logits now, reported by the next `step`, and decodes from there."""
        if seq.logits is None or seq.table is None or seq.table.pool is not self.pool:
            raise AquilaError("adopt needs a sequence already read into this batch's pool, with its next logits")
        self.scheduler.adopt(seq)
        self._adopted += self.runner.sample([seq], seq.logits[None])
        seq.logits = None
        if seq.finished:
            self.scheduler.remove(seq)

    def schedule(self, now: float | None = None) -> StepPlan:
        """This step's plan (expired and admitted requests included), decided without running the model."""
        return self.scheduler.schedule(now)

    def execute(self, plan: StepPlan) -> list[tuple[SequenceState, str]]:
        """Run a plan: (sequence, new text) for each sequence that sampled, finished ones included (they have left
        the batch and returned their blocks)."""
        out, self._adopted = [*self._adopted, *self.runner.execute(plan)], []
        for seq, _ in out:
            if seq.finished:
                self.scheduler.remove(seq)
        return out

    def step(self) -> list[tuple[SequenceState, str]]:
        """One step: schedule, one forward, sample."""
        return self.execute(self.schedule())

    def cancel(self, seq: SequenceState, reason: str) -> str:
        """Finish a sequence from outside (time limit, client gone), waiting or running, and return its blocks;
        returns held-back text."""
        tail = seq.finish(reason)
        self.scheduler.remove(seq)
        return tail

    def close(self) -> None:
        """End every sequence still in the batch, returning all its blocks."""
        for seq in self.seqs:
            self.cancel(seq, "cancelled")


def run(batch: DecodeBatch, requests: Seq[Request]) -> list[Completion]:
    """Decode requests to their end, up to `batch.rows` at a time (offline batches, evaluation)."""
    waiting = list(requests)
    seqs: list[SequenceState] = []
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
