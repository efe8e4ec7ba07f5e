"""Run tasks: build each item's few-shot prompt, score it, and average accuracy (log-likelihood) and EM."""

from __future__ import annotations

import sys
from collections.abc import Callable
from statistics import mean
from typing import Any

from aquila.evaluation.prompts import fit_context, select_shots
from aquila.evaluation.scoring import ChoiceRequest, ChoiceScorer
from aquila.evaluation.tasks import ALL_TASKS, Item, Subset
from aquila.tokenizer.base import BaseTokenizer

ANSWER_PUNCTUATION = " \t\r\n.。:：)）、,，"


def greedy_answer(decode: Callable[[list[int]], str], tokens: list[int], mode: str) -> str:
    """What the greedy generation answered: in "letter" mode its first non-blank token, in "label" mode its first
    non-blank line; stripped of surrounding blanks and trailing punctuation."""
    if mode == "letter":
        pieces = (decode([t]) for t in tokens)
        text = next((p for p in pieces if p.strip()), "")
    else:
        text = next((line for line in decode(tokens).splitlines() if line.strip()), "")
    return text.strip().rstrip(ANSWER_PUNCTUATION)


def exact_match(item: Item, answer: str) -> bool:
    return answer == item.answer.strip()


def evaluate_subset(
    scorer: ChoiceScorer, tokenizer: BaseTokenizer, subset: Subset, shots: int, seed: int, limit: int | None = None
) -> dict[str, Any]:
    """{'n', 'acc', 'em', 'shots', 'truncated', 'pool'} for one subset."""
    items = subset.items[:limit] if limit else subset.items
    choice_ids = [[tokenizer.encode(c) for c in item.choices] for item in items]
    max_new = max(len(c) for choices in choice_ids for c in choices) + 2
    budget = scorer.model.args.max_seq_len - max_new
    requests, used, truncated = [], [], 0
    for i, choices in enumerate(choice_ids):
        chosen = select_shots(subset, i, shots, seed)
        context, k, cut = fit_context(tokenizer.encode, tokenizer.token_start_id, subset, i, chosen, budget)
        requests.append(ChoiceRequest(context, choices, max_new))
        used.append(k)
        truncated += cut
    # A letter answer is complete at the first non-blank token: no need to decode further.
    done = (lambda toks: bool(tokenizer.decode(toks[-1:]).strip())) if subset.em_mode == "letter" else None
    scored = scorer.score(requests, done)
    correct = [s.best == item.gold for s, item in zip(scored, items)]
    answers = [greedy_answer(tokenizer.decode, s.generated, subset.em_mode) for s in scored]
    matched = [exact_match(item, a) for item, a in zip(items, answers)]
    return {
        "n": len(items),
        "acc": float(mean(correct)),
        "em": float(mean(matched)),
        "shots": float(mean(used)),
        "truncated": truncated,
        "pool": subset.pool_source,
    }


def evaluate_task(
    scorer: ChoiceScorer,
    tokenizer: BaseTokenizer,
    task: str,
    subsets: list[Subset],
    shots: int,
    seed: int,
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
    advance: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Per-subset results plus the task's acc/em: the mean over all items ("micro") or over subsets ("macro").

    After each subset, `log` gets a line of its results and `advance` (a progress bar's update) its item count.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    results = {}
    for subset in subsets:
        res = evaluate_subset(scorer, tokenizer, subset, shots, seed, limit)
        results[subset.name] = res
        log(f"{task}/{subset.name}: {res['n']} items, acc {res['acc']:.3f}, em {res['em']:.3f}")
        if advance is not None:
            advance(res["n"])
    aggregate = ALL_TASKS[task][2]
    out: dict[str, Any] = {"aggregate": aggregate, "n": sum(r["n"] for r in results.values())}
    for metric in ("acc", "em"):
        if aggregate == "micro":
            out[metric] = sum(r[metric] * r["n"] for r in results.values()) / out["n"]
        else:
            out[metric] = float(mean(r[metric] for r in results.values()))
    out["subsets"] = results
    return out
