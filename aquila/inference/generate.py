"""The decoding core: requests decoded in rows of the model's static KV cache, as small functions.

- `Request` is one generation request (prompt ids, length, sampling, seed, stops); `Sequence` is its decoding
  state in one cache row: the row's length, its sampler, its ids and text, and the stop check (`accept`: stop
  ids, stop strings, length and an optional predicate, all in one place).
- `prefill` runs prompt chunks of several rows as one right-padded forward at per-row positions; `decode_step`
  feeds one token per row at each row's own position (`input_pos`, as gpt-fast); `pick` samples per row.
- `DecodeBatch` holds the running rows: `add` a sequence to a free row, `step` (prefill chunks of new rows under a
  token budget, then sample, stop-check and decode every running row), and finished rows are freed by moving the
  last row into the hole (`model.copy_cache_rows`). Predictor (single, batch, stream, chat), evaluation scoring and
  the server's scheduler all decode through it; `beam_search` uses the same prefill/decode steps and row copies.

A row's result does not depend on its neighbours: every row has its own positions and attends only to its own
slots, so an offline batch, a request joining a running batch and a request alone give the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from aquila.errors import AquilaError
from aquila.inference.sampling import SamplingParams, sample
from aquila.inference.text import TextAssembler
from aquila.model import AquilaModel
from aquila.model.aquila_model import CacheRows


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
        self.cached = 0  # positions of this row already in the cache
        self.logits: torch.Tensor | None = None  # [V] next-token logits, once the prompt is in
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
    def prefilling(self) -> bool:
        return self.cached < len(self.request.prompt)

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
def prefill(model: AquilaModel, chunks: list[list[int]], starts: list[int], first_row: int) -> torch.Tensor:
    """Prompt chunks of rows first_row.. (right-padded, row i from position starts[i]) into the cache; the logits
    [b, V] after each row's last chunk token."""
    device = model_device(model)
    ids, pos, last, kv_len = _right_padded(chunks, starts, model.cache_len)
    last = torch.tensor(last, device=device)
    out = model(ids.to(device), input_pos=pos.to(device), first_row=first_row, kv_len=kv_len, logits_at=last)
    return out["logits"]


def _right_padded(
    chunks: list[list[int]], starts: list[int], pad_pos: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """ids [b, width] and positions [b, width] of prompt chunks (row i from position starts[i]), padding at the
    scratch position `pad_pos`; each row's last real index; the cache slots they span (kv_len)."""
    width = max(len(c) for c in chunks)
    ids = torch.zeros(len(chunks), width, dtype=torch.long)
    pos = torch.full((len(chunks), width), pad_pos, dtype=torch.long)
    for i, (chunk, start) in enumerate(zip(chunks, starts)):
        ids[i, : len(chunk)] = torch.tensor(chunk)
        pos[i, : len(chunk)] = torch.arange(start, start + len(chunk))
    return ids, pos, [len(c) - 1 for c in chunks], max(s + len(c) for c, s in zip(chunks, starts))


@torch.no_grad()
def decode_step(model: AquilaModel, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Feed tokens [b, 1] of rows 0..b-1 at positions input_pos [b, 1]; logits [b, V] (fp32)."""
    return model(tokens, input_pos=input_pos, kv_len=kv_len, logits_at=torch.zeros_like(tokens[:, 0]))["logits"]


_COMPILED: dict[str, Callable] = {}


def compiled_decode_step() -> Callable:
    """`decode_step` under torch.compile (dynamic batch and length; compiled once per process)."""
    if "decode" not in _COMPILED:
        _COMPILED["decode"] = torch.compile(decode_step, dynamic=True)
    return _COMPILED["decode"]


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
    """Sequences in rows of the model's KV cache: rows [0, d) are decoding, rows [d, n) are reading their prompt.

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
    ) -> None:
        model.setup_caches(rows, max_len)
        self.model, self.tokenizer, self.rows, self.max_len = model, tokenizer, rows, max_len
        self.prefill_tokens = prefill_tokens
        self.step_fn = compiled_decode_step() if compile else decode_step
        self.seqs: list[Sequence] = []  # row i holds seqs[i]
        self.device = model_device(model)

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
        self.seqs.append(seq)
        return seq

    def adopt(self, seq: Sequence) -> None:
        """A sequence whose prompt and next logits the caller already put into row len(seqs) (evaluation)."""
        if any(s.prefilling for s in self.seqs) or seq.prefilling or seq.logits is None:
            raise AquilaError("adopt needs a prefilled sequence and no prompt readers")
        self.seqs.append(seq)

    def step(self) -> list[tuple[Sequence, str]]:
        """One token for every decoding row, then one forward: the rows' new tokens and a chunk of the waiting
        prompts (read alone first when no row is decoding). Returns (sequence, new text) for each row that sampled,
        finished ones included (they have left the batch)."""
        if not self.decoding:
            self._prefill()
        d = self.decoding
        if not d:
            return []
        running = self.seqs[:d]
        tokens, lps, tops = pick(torch.stack([s.logits for s in running]), running)
        out = [(s, s.accept(t, lp, top)) for s, t, lp, top in zip(running, tokens, lps, tops)]
        self._free([s for s in running if s.finished])
        self._decode(dict(zip(running, tokens)))
        return out

    def cancel(self, seq: Sequence, reason: str) -> str:
        """Finish a sequence from outside (time limit, client gone) and free its row; returns held-back text."""
        tail = seq.finish(reason)
        if seq in self.seqs:
            self._free([seq])
        return tail

    # --- internals -------------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """Read a chunk of the waiting prompts alone (no row is decoding)."""
        waiting, chunks = self._prompt_chunks()
        if not waiting:
            return
        logits = prefill(self.model, chunks, [s.cached for s in waiting], self.decoding)  # readers start at row d
        self._read(waiting, chunks, list(logits))

    @property
    def waiting(self) -> list[Sequence]:
        return [s for s in self.seqs if s.prefilling]

    def _prompt_chunks(self) -> tuple[list[Sequence], list[list[int]]]:
        """The waiting rows to read this step and their prompt chunks, within the token budget."""
        waiting = self.waiting
        remaining = [len(s.request.prompt) - s.cached for s in waiting]
        if not waiting:
            return [], []
        if self.prefill_tokens is None:
            width, take = max(remaining), len(waiting)
        else:  # padded tokens of this step's forward stay within the budget (all prompt tokens when none decodes)
            budget = self.prefill_tokens if self.decoding else max(self.prefill_tokens, sum(remaining))
            width = min(max(remaining), budget)
            take = max(1, min(len(waiting), budget // width))
        return waiting[:take], [list(s.request.prompt[s.cached : s.cached + width]) for s in waiting[:take]]

    def _read(self, seqs: list[Sequence], chunks: list[list[int]], logits: list[torch.Tensor | None]) -> None:
        """Account for prompt chunks just read (logits[i]: after seqs[i]'s chunk, None where not computed); a row
        whose prompt is in takes its logits and joins the decoding rows [0, d)."""
        for s, chunk, row_logits in zip(seqs, chunks, logits):
            s.cached += len(chunk)
            if not s.prefilling:
                s.logits = row_logits
                self._move(self.seqs.index(s), self.decoding - 1)

    def _decode(self, tokens: dict[Sequence, int]) -> None:
        """Feed each decoding row its sampled token at its own position, with a chunk of the waiting prompts in the
        same forward (every weight read once for both)."""
        running = self.seqs[: self.decoding]
        if not running:
            return
        pos = torch.tensor([[s.cached] for s in running], device=self.device)
        x = torch.tensor([tokens[s] for s in running], device=self.device)[:, None]
        kv_len = max(s.cached for s in running) + 1
        waiting, chunks = self._prompt_chunks()
        if not waiting:
            logits = self.step_fn(self.model, x, pos, kv_len)
        else:
            ids, prompt_pos, last, prompt_kv = _right_padded(chunks, [s.cached for s in waiting], self.model.cache_len)
            groups = [
                CacheRows(0, x, pos, kv_len),
                CacheRows(len(running), ids.to(self.device), prompt_pos.to(self.device), prompt_kv),
            ]
            d, width = len(running), ids.shape[1]
            ends = [i for i, (s, c) in enumerate(zip(waiting, chunks)) if s.cached + len(c) == len(s.request.prompt)]
            with torch.no_grad():
                logits = self.model.rows_logits(groups, [*range(d), *(d + i * width + last[i] for i in ends)])
            prompt_logits: list[torch.Tensor | None] = [None] * len(waiting)
            for i, row_logits in zip(ends, logits[d:]):
                prompt_logits[i] = row_logits
        for s, row_logits in zip(running, logits):
            s.cached += 1
            s.logits = row_logits
        if waiting:
            self._read(waiting, chunks, prompt_logits)

    def _free(self, gone: list[Sequence]) -> None:
        """Drop finished rows, keeping the rest dense: decoding rows first, then prompt readers. Last rows first:
        a freed last row needs no copy, so a batch finishing together moves nothing."""
        for seq in sorted(gone, key=self.seqs.index, reverse=True):
            row = self.seqs.index(seq)
            d = self.decoding
            if row < d:  # the last decoding row fills the hole, the last prompt reader fills its place
                self._move(d - 1, row)
                row = d - 1
            self._move(len(self.seqs) - 1, row)
            self.seqs.pop()

    def _move(self, src: int, dst: int) -> None:
        """Swap rows src and dst (sequences and cache contents)."""
        if src == dst:
            return
        a, b = self.seqs[src], self.seqs[dst]
        self.model.copy_cache_rows([src, dst], [dst, src], max(a.cached, b.cached, 1))
        self.seqs[src], self.seqs[dst] = b, a


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
    model.setup_caches(beam_size, cache_length(width + max_new_tokens, model.args.max_seq_len))
    stop_set = set(stop_ids)

    logits = prefill(model, [list(prompt)], [0], 0)
    model.copy_cache_rows([0] * beam_size, list(range(beam_size)), width)
    scores = torch.full((beam_size,), float("-inf"), device=device)
    scores[0] = 0.0  # all beams start as copies of one: only row 0 may expand at the first step
    logits = logits.expand(beam_size, -1)
    beams: list[list[int]] = [[] for _ in range(beam_size)]
    finished: list[tuple[float, list[int]]] = []

    def normalised(total: float, length: int) -> float:
        return total / (max(length, 1) ** length_penalty)

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
        while len(parents) < beam_size:  # fewer live candidates than beams (tiny vocabularies): pad with a dead beam
            parents.append(parents[0])
            next_tokens.append(next_tokens[0])
            next_scores.append(float("-inf"))
        beams = [beams[p] + [t] for p, t in zip(parents, next_tokens)]
        model.copy_cache_rows(parents, list(range(beam_size)), width + step)
        scores = torch.tensor(next_scores, device=device)
        pos = torch.full((beam_size, 1), width + step, device=device)
        logits = decode_step(model, torch.tensor(next_tokens, device=device)[:, None], pos, width + step + 1)
    if not finished or len(finished) < beam_size:
        # Out of length: live beams compete with finished ones (last step's candidates included).
        for score, token, parent in zip(next_scores, next_tokens, parents):
            if score > float("-inf"):
                finished.append((normalised(score, len(beams[parent]) + 1), beams[parent] + [token]))
    return max(finished, key=lambda f: f[0])[1] if finished else []
