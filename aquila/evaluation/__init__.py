"""Evaluation of the model card's benchmarks (few-shot, log-likelihood and greedy exact match) and perplexity.

`tasks` reads each benchmark from local files in its public format, `prompts` builds few-shot prompts, `scoring`
scores choices by log-likelihood and greedy generation, `perplexity` runs a sliding window over an indexed dataset,
`cli` is `aquila eval`. See docs/evaluation.md.
"""

from aquila.evaluation.tasks import CARD_COLUMNS, TASKS, Item, Subset, load_task

__all__ = ["CARD_COLUMNS", "TASKS", "Item", "Subset", "load_task"]
