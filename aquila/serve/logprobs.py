"""Log-probabilities in OpenAI's response shapes (as vLLM serves them), and the prompt's own log-probabilities.

Completions (`logprobs: k`, `echo`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per
token (the prompt's first, when echoed, with null log-probabilities: nothing comes before it); each `top_logprobs`
entry maps the k most likely token strings and the chosen one to their log-probabilities. Chat (`logprobs: true`,
`top_logprobs: k`): `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
All values are the model's own distribution (before penalties and temperature), as vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aquila.inference.generate import model_device
from aquila.model import AquilaModel

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs

Top = list[tuple[int, float]]


@torch.no_grad()
def prompt_logprobs(model: AquilaModel, ids: Sequence[int], top: int) -> tuple[list[float], list[Top]]:
    """Each prompt token's log-probability after the ones before it and the `top` most likely ids there
    (len(ids) - 1 entries). A plain forward on the model's thread: the KV cache is not touched."""
    x = torch.tensor([list(ids)], device=model_device(model))
    lps = torch.log_softmax(model(x)["logits"][0, :-1].float(), -1)
    chosen = lps.gather(1, x[0, 1:, None]).squeeze(1).tolist()
    if not top:
        return chosen, [[] for _ in chosen]
    best = torch.topk(lps, min(top, lps.shape[-1]))
    return chosen, [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]


class LogprobFormatter:
    """Token strings (one decode per id, cached) and the two response shapes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        s = self._strings.get(token_id)
        if s is None:
            s = self._strings[token_id] = self.tokenizer.decode([token_id])
        return s

    def completion(
        self, ids: Sequence[int], lps: Sequence[float | None], tops: Sequence[Top | None], offset: int = 0
    ) -> dict:
        """`logprobs` of a completions choice (or a streamed chunk of it, whose first token is at text `offset`);
        lps[i] None (the first echoed prompt token) gives nulls."""
        tokens = [self.token(t) for t in ids]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        top_dicts: list[dict | None] = []
        for s, lp, top in zip(tokens, lps, tops):
            if lp is None:
                top_dicts.append(None)
                continue
            d = {self.token(i): v for i, v in top or []}
            d[s] = lp  # the chosen token is always there (vLLM's shape), whatever its rank
            top_dicts.append(d)
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top_dicts, "text_offset": offsets}

    def chat(self, ids: Sequence[int], lps: Sequence[float], tops: Sequence[Top | None]) -> dict:
        """`logprobs` of a chat choice."""

        def entry(token_id: int, lp: float) -> dict:
            s = self.token(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

        content = [
            {**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top or []]} for t, lp, top in zip(ids, lps, tops)
        ]
        return {"content": content}
