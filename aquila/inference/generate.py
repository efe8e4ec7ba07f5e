"""Autoregressive decoding over the model's static KV cache, as small functions.

`prefill` runs the (left-padded) prompts once; `decode_one_token` feeds one token per row at a fixed position;
`decode_n_tokens` yields the sampled tokens step by step; `generate` drives them for a batch and returns the
generated ids. `beam_search` is a real beam search over the same cache (rows = beams, reordered each step).

Left padding: every row of the batch is right-aligned; `pad_lengths[r]` slots of row r are padding that the
model masks and that do not shift its rotary positions, so a row's result does not depend on its neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from aquila.errors import AquilaError
from aquila.inference.sampling import SamplingParams, sample
from aquila.model import AquilaModel

# callback(step, tokens [b]) -> True to stop early.
Callback = Callable[[int, torch.Tensor], "bool | None"]


@torch.no_grad()
def prefill(model: AquilaModel, ids: torch.Tensor, pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts [b, s] from position 0 into the cache; logits of each row's last position [b, V] (fp32)."""
    return model(ids, start_pos=0, pad_lengths=pad_lengths, last_only=True)["logits"]


@torch.no_grad()
def decode_one_token(
    model: AquilaModel, tokens: torch.Tensor, pos: int, pad_lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Feed tokens [b, 1] at cache position `pos`; logits [b, V] (fp32)."""
    return model(tokens, start_pos=pos, pad_lengths=pad_lengths, last_only=True)["logits"]


_COMPILED: dict[str, Callable] = {}


def compiled_decode_one_token() -> Callable:
    """`decode_one_token` under torch.compile (dynamic position; compiled once per process)."""
    if "decode" not in _COMPILED:
        _COMPILED["decode"] = torch.compile(decode_one_token, dynamic=True)
    return _COMPILED["decode"]


@dataclass
class DecodeState:
    """What the sampler needs between steps."""

    params: SamplingParams
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool [b, V], only with a repetition penalty
    logprobs: list[torch.Tensor] | None = None  # per step [b] log-probabilities of the chosen tokens

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = sample(logits, self.params, self.seen, self.generator)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.logprobs is not None:
            self.logprobs.append(torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1))
        return tokens


def decode_n_tokens(
    model: AquilaModel,
    logits: torch.Tensor,
    start_pos: int,
    n: int,
    state: DecodeState,
    pad_lengths: torch.Tensor | None = None,
    step_fn: Callable = decode_one_token,
) -> Iterator[torch.Tensor]:
    """Sample from `logits`, feed the token back, repeat: yields n token tensors [b]. The caller may stop early."""
    for i in range(n):
        tokens = state.pick(logits)
        yield tokens
        if i + 1 < n:
            logits = step_fn(model, tokens[:, None], start_pos + i, pad_lengths)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row, up to (not including) the first stop id
    finish_reasons: list[str]  # "stop" (a stop id or the callback) or "length"
    logprobs: list[list[float]] | None = None
    ttft_s: float = 0.0  # prefill + first sample
    decode_s: float = 0.0  # the remaining steps
    steps: int = 0  # tokens sampled per row, stop ids included
    extra: dict = field(default_factory=dict)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts into ids [b, width]; returns (ids, pad_lengths)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([width - len(p) for p in prompts], dtype=torch.long)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_prompts(model: AquilaModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise AquilaError("no prompts given")
    vocab, limit = model.args.vocab_size, model.args.max_seq_len
    for row, p in enumerate(prompts):
        if len(p) == 0:
            raise AquilaError(f"prompt {row} is empty")
        if len(p) >= limit:
            raise AquilaError(f"prompt {row} has {len(p)} tokens; the model's max_seq_len {limit} leaves no room")
        bad = [t for t in p if not (0 <= int(t) < vocab)]
        if bad:
            raise AquilaError(f"prompt {row} has token ids outside [0, {vocab}): {bad[:5]}")
    if max_new_tokens < 1:
        raise AquilaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def cache_length(needed: int, limit: int) -> int:
    """Round the cache length up (multiples of 256) so that similar requests reuse one allocation."""
    return min(limit, -(-needed // 256) * 256)


def generate_tokens(
    model: AquilaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    compile: bool = False,
    logprobs: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Set up the cache, prefill, and yield each step's tokens [b] until every row has produced a stop id or
    `max_new_tokens` (capped by the model's max_seq_len) steps are done. Pass a list as `logprobs` to collect the
    chosen tokens' log-probabilities ([b] per step). Stop iterating to stop early."""
    params = params or SamplingParams()
    check_prompts(model, prompts, max_new_tokens)
    device = model_device(model)
    ids, pads = left_pad(prompts)
    width = ids.shape[1]
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - width)
    model.setup_caches(len(prompts), cache_length(width + max_new_tokens, model.args.max_seq_len))
    ids = ids.to(device)
    pad_lengths = pads.to(device) if bool(pads.any()) else None

    state = DecodeState(params, generator, logprobs=logprobs)
    if params.repetition_penalty != 1.0:
        state.seen = torch.zeros(len(prompts), model.args.vocab_size, dtype=torch.bool, device=device)
        state.seen.scatter_(1, ids, True)
        for row, n in enumerate(pads.tolist()):  # pad slots are not context
            if n and not any(int(t) == 0 for t in prompts[row]):
                state.seen[row, 0] = False

    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = prefill(model, ids, pad_lengths)
    step_fn = compiled_decode_one_token() if compile else decode_one_token
    for tokens in decode_n_tokens(model, logits, width, max_new_tokens, state, pad_lengths, step_fn):
        yield tokens
        done |= torch.isin(tokens, stop)
        if bool(done.all()):
            return


def generate(
    model: AquilaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    compile: bool = False,
    return_logprobs: bool = False,
) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt (fewer if the model's max_seq_len is reached).

    A row is finished at its first id in `stop_ids`; generation ends when every row is finished, when
    `callback(step, tokens)` returns True, or at the length limit.
    """
    logprobs: list[torch.Tensor] | None = [] if return_logprobs else None
    out: list[torch.Tensor] = []
    result = GenerationResult(tokens=[], finish_reasons=[])
    stopped_by_callback = False
    start = time.perf_counter()
    steps = generate_tokens(model, prompts, max_new_tokens, params, stop_ids, generator, compile, logprobs)
    for step, tokens in enumerate(steps):
        if step == 0:
            result.ttft_s = time.perf_counter() - start
            start = time.perf_counter()
        out.append(tokens)
        if callback is not None and callback(step, tokens):
            stopped_by_callback = True
            break
    steps.close()
    result.decode_s = time.perf_counter() - start
    result.steps = len(out)
    table = torch.stack(out, 1).tolist()
    lps = torch.stack(logprobs, 1).tolist() if logprobs is not None else None
    stop_set = set(stop_ids)
    for row, toks in enumerate(table):
        cut = next((i for i, t in enumerate(toks) if t in stop_set), None)
        ended = cut is not None or stopped_by_callback
        cut = len(toks) if cut is None else cut
        result.tokens.append(toks[:cut])
        result.finish_reasons.append("stop" if ended else "length")
        if lps is not None:
            result.logprobs = (result.logprobs or []) + [lps[row][:cut]]
    return result


def reorder_cache(model: AquilaModel, parents: torch.Tensor, end: int) -> None:
    """Make cache row i a copy of row parents[i] (positions < end), in every layer."""
    n = parents.shape[0]
    for layer in model.layers:
        cache = layer.attention.kv_cache
        cache.k[:n, :, :end] = cache.k[parents, :, :end]
        cache.v[:n, :, :end] = cache.v[parents, :, :end]


@torch.no_grad()
def beam_search(
    model: AquilaModel,
    prompt: Sequence[int],
    max_new_tokens: int,
    beam_size: int,
    stop_ids: Sequence[int] = (),
    length_penalty: float = 1.0,
) -> list[int]:
    """Beam search for one prompt: the best hypothesis' ids (stop id excluded).

    Each step keeps the `beam_size` best continuations by summed log-probability; a continuation ending in a stop
    id among the top `beam_size` candidates becomes a finished hypothesis, scored by sum / length**length_penalty.
    The search ends once `beam_size` hypotheses have finished (HF's early_stopping=True), so beam 1 is greedy.
    """
    if beam_size < 1:
        raise AquilaError(f"beam_size must be >= 1, got {beam_size}")
    check_prompts(model, [prompt], max_new_tokens)
    device = model_device(model)
    width = len(prompt)
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - width)
    model.setup_caches(beam_size, cache_length(width + max_new_tokens, model.args.max_seq_len))
    stop_set = set(stop_ids)

    logits = prefill(model, torch.tensor([list(prompt)], dtype=torch.long, device=device))
    reorder_cache(model, torch.zeros(beam_size, dtype=torch.long, device=device), width)
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
        parent_t = torch.tensor(parents, dtype=torch.long, device=device)
        reorder_cache(model, parent_t, width + step)
        scores = torch.tensor(next_scores, device=device)
        logits = decode_one_token(model, torch.tensor(next_tokens, device=device)[:, None], width + step)
    if not finished or len(finished) < beam_size:
        # Out of length: live beams compete with finished ones (last step's candidates included).
        for score, token, parent in zip(next_scores, next_tokens, parents):
            if score > float("-inf"):
                finished.append((normalised(score, len(beams[parent]) + 1), beams[parent] + [token]))
    return max(finished, key=lambda f: f[0])[1] if finished else []
