"""`aquila eval`: the model card's benchmarks from local files, or perplexity over an indexed dataset.

aquila eval --model-dir D --model-name N --tasks mmlu,boolq --data-dir DIR [--shots 5] [--output r.json]
aquila eval --model-dir D --model-name N --perplexity PREFIX [--window W --stride S]

On a terminal a progress bar shows items (tasks) or windows (perplexity) done.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aquila.cli_help import HelpFormatter
from aquila.dtypes import DTYPES
from aquila.errors import AquilaError
from aquila.evaluation.tasks import CARD_COLUMNS, LOCAL_TASKS, TASKS, check_task_names, load_task
from aquila.io_utils import write_text_atomic

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aquila eval", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-dir", required=True, help="directory holding the model (or its parent, with --model-name)")
    p.add_argument("--model-name", default=None, help="FlagAI style: the model is <model-dir>/<model-name> if present")
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated, from {','.join(TASKS)} (the card) and {','.join(LOCAL_TASKS)} (a local jsonl)",
    )
    p.add_argument("--data-dir", help="holds one directory per task (see docs/evaluation.md)")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per prompt")
    p.add_argument("--seed", type=int, default=0, help="fixes the few-shot draws and TruthfulQA's choice order")
    p.add_argument("--batch-size", type=int, default=16, help="choices (or perplexity windows) per forward")
    p.add_argument("--limit", type=int, default=None, help="score at most N items of each subject/sub-task")
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="read every prompt whole (by default the KV blocks of a prefix an earlier prompt read are reused)",
    )
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--perplexity", metavar="PREFIX", help="perplexity of <PREFIX>.bin/.idx instead of the tasks")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="perplexity window in tokens (default: the checkpoint's training seq_length, else max_seq_len)",
    )
    p.add_argument("--stride", type=int, default=None, help="perplexity stride in tokens (default: window / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity over the first N tokens only")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: bf16 on cuda, fp32 on cpu")
    return p


def resolve_model_dir(model_dir: str, model_name: str | None) -> Path:
    path = Path(model_dir)
    if model_name and (path / model_name).is_dir():
        return path / model_name
    if not path.is_dir():
        raise AquilaError(f"{path}: model directory not found")
    return path


def load_model(path: Path, device: str, dtype: torch.dtype):
    """(model in eval mode, tokenizer loader) for a FlagAI, Hugging Face or int8 model directory, through FlagAI's
    AutoLoader (`<model-dir>/<model-name>`); the tokenizer is read only when asked for."""
    from aquila.inference.loader import AutoLoader

    loader = AutoLoader("lm", model_dir=path.parent, model_name=path.name, device=device, torch_dtype=dtype)
    return loader.get_model().eval(), loader.get_tokenizer


def format_table(name: str, tasks: dict[str, Any]) -> str:
    """The model card's table (EM of the greedy answer), plus a row of log-likelihood accuracy."""

    def cell(task: str, metric: str) -> str:
        return f"{tasks[task][metric]:.3f}" if task in tasks else "-"

    columns = [c for c, _ in CARD_COLUMNS]
    lines = [
        "| 名称/Name | " + " | ".join(columns) + " |",
        "| ----- | " + " | ".join("-----" for _ in columns) + " |",
        f"| {name} | " + " | ".join(cell(t, "em") for _, t in CARD_COLUMNS) + " |",
        f"| {name} (log-likelihood acc) | " + " | ".join(cell(t, "acc") for _, t in CARD_COLUMNS) + " |",
    ]
    return "\n".join(lines)


def _positive(opts: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(opts, name)
        if value is not None and value < (0 if name == "shots" else 1):
            raise AquilaError(
                f"--{name.replace('_', '-')} must be {'>= 0' if name == 'shots' else '>= 1'}, got {value}"
            )


def main(argv: list[str]) -> int:
    opts = _parser().parse_args(argv)
    _positive(opts, "shots", "batch_size", "limit", "window", "stride", "max_tokens")
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[opts.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    name = opts.model_name or Path(opts.model_dir).name
    if opts.perplexity:
        return _run_perplexity(opts, name, device, dtype)
    if not opts.data_dir:
        raise AquilaError("--data-dir is required to run tasks (or give --perplexity PREFIX)")
    tasks = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    if not tasks:
        raise AquilaError("--tasks is empty")
    check_task_names(tasks)
    data = {t: load_task(t, opts.data_dir, opts.seed) for t in tasks}  # read every file before loading the model

    from aquila.evaluation.runner import evaluate_task
    from aquila.evaluation.scoring import ChoiceScorer

    model, get_tokenizer = load_model(resolve_model_dir(opts.model_dir, opts.model_name), device, dtype)
    tokenizer = get_tokenizer()
    stop_ids = {tokenizer.token_end_id, getattr(tokenizer, "token_pad_id", tokenizer.token_end_id)}
    scorer = ChoiceScorer(model, opts.batch_size, stop_ids, prefix_cache=not opts.no_prefix_cache)
    total = sum(len(s.items[: opts.limit] if opts.limit else s.items) for subsets in data.values() for s in subsets)
    with tqdm(total=total, unit="item", desc="eval", disable=None, file=sys.stderr) as bar:  # shown on a terminal
        log = functools.partial(bar.write, file=sys.stderr)
        results = {
            t: evaluate_task(scorer, tokenizer, t, subsets, opts.shots, opts.seed, opts.limit, log, bar.update)
            for t, subsets in data.items()
        }
    print(format_table(name, results))
    for t in (t for t in results if t in LOCAL_TASKS):  # no column on the card: one line each
        print(f"{t}: acc {results[t]['acc']:.3f}, em {results[t]['em']:.3f} ({results[t]['n']} items)")
    if opts.output:
        report = {
            "model": {"dir": opts.model_dir, "name": opts.model_name},
            "shots": opts.shots,
            "seed": opts.seed,
            "limit": opts.limit,
            "card": {column: results[t]["em"] for column, t in CARD_COLUMNS if t in results},
            "loglik_acc": {t: results[t]["acc"] for _, t in CARD_COLUMNS if t in results},
            "tasks": results,
            "prefix_cache": {"enabled": scorer.prefix_cache, "hit_blocks": scorer.prefix_hits},
        }
        write_text_atomic(opts.output, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {opts.output}")
    return 0


def _run_perplexity(opts: argparse.Namespace, name: str, device: str, dtype: torch.dtype) -> int:
    from aquila.evaluation.perplexity import default_window, perplexity, read_stream, sliding_windows

    if opts.window:
        sliding_windows(0, opts.window, opts.stride or opts.window // 2)  # check before reading anything
    tokens = read_stream(opts.perplexity, opts.max_tokens)
    model_dir = resolve_model_dir(opts.model_dir, opts.model_name)
    model, _ = load_model(model_dir, device, dtype)
    window = opts.window or default_window(model_dir, model.args.max_seq_len)
    stride = opts.stride or window // 2
    result = perplexity(model, tokens, window, stride, opts.batch_size, progress=True)
    print(
        f"{name}: perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.4f}) over {result['tokens']} "
        f"tokens of {opts.perplexity} (window {window}, stride {stride})"
    )
    if opts.output:
        report = {"model": {"dir": opts.model_dir, "name": opts.model_name}, "dataset": opts.perplexity}
        report.update(result, window=window, stride=stride)
        write_text_atomic(opts.output, json.dumps(report, indent=2) + "\n")
        print(f"wrote {opts.output}")
    return 0
