"""`aquila pretrain --yaml_config X.yaml [--flag value ...]`: pretraining on Megatron indexed datasets.

Same flags as FlagAI's aquila_pretrain.py (every TrainConfig key; see examples/aquila/Aquila-pretrain.yaml).
Samples are `seq_length + 1` tokens from `data_prefix` (a prefix or [w1, p1, w2, p2, ...]) split by
`data_splits`; the GPT dataset is already shuffled by the seed, so the global sample order is its index order.
"""

from __future__ import annotations

import sys

import numpy as np

from aquila.errors import AquilaError, run_command
from aquila.train.batches import pretrain_collate
from aquila.train.config import SCRIPT_DEFAULTS, TrainConfig, parse_config
from aquila.train.run import DataBundle, RunPlan, run


def precheck(cfg: TrainConfig) -> None:
    from aquila.data.gpt_dataset import parse_data_prefix, parse_splits
    from aquila.data.indexed_dataset import missing_dataset_file

    if not cfg.data_prefix:
        raise AquilaError(
            "data_prefix is not set: give the .bin/.idx prefix of the training data (YAML or --data_prefix)"
        )
    parse_splits(cfg.data_splits)
    for _, prefix in parse_data_prefix(cfg.data_prefix):
        if missing := missing_dataset_file(prefix):
            raise AquilaError(f"data_prefix {prefix!r}: {missing} not found")


def samples_per_epoch(cfg: TrainConfig, seq_length: int) -> int:
    """Samples of seq_length + 1 tokens in one pass over the training split (summed over blended datasets)."""
    from aquila.data.gpt_dataset import parse_data_prefix, split_boundaries
    from aquila.data.indexed_dataset import MMapIndexedDataset

    total = 0
    for _, prefix in parse_data_prefix(cfg.data_prefix):
        ds = MMapIndexedDataset(prefix)
        lo, hi = split_boundaries(cfg.data_splits, len(ds))[:2]
        tokens = int(np.asarray(ds.sizes[lo:hi], dtype=np.int64).sum())
        total += max(0, (tokens - 1) // seq_length)
    return total


def build_data(plan: RunPlan) -> DataBundle:
    from aquila.data.gpt_dataset import build_pretrain_datasets

    cfg, gb = plan.cfg, plan.global_batch_size
    per_epoch = samples_per_epoch(cfg, plan.seq_length)
    if cfg.max_steps:
        n_train = (cfg.max_steps + cfg.skip_iters) * gb
    else:
        n_train = max(1, cfg.epochs * per_epoch)
    micro_world = cfg.batch_size * plan.env.world_size
    n_valid = cfg.eval_iters * micro_world if cfg.eval_iters else 1
    train, valid, _ = build_pretrain_datasets(
        cfg.data_prefix, cfg.data_splits, (n_train, n_valid, 0), plan.seq_length, cfg.seed, plan.model_args.vocab_size
    )
    if train is None:
        raise AquilaError(f"data_splits {cfg.data_splits!r} leaves no documents for training")
    if valid is not None and len(valid) < micro_world:
        valid = None

    def identity(g: int) -> int:
        return g

    return DataBundle(train, valid, identity, identity, pretrain_collate, per_epoch)


def main(argv: list[str] | None = None, prog: str = "aquila pretrain") -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: run(parse_config(argv, prog, SCRIPT_DEFAULTS), build_data, precheck))


if __name__ == "__main__":
    sys.exit(main())
