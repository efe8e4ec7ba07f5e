"""Data pipelines: Megatron indexed datasets, jsonl preprocessing, GPT pretraining samples, SFT conversations."""

from aquila.data.indexed_dataset import (
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_dtype,
    merge_datasets,
)

__all__ = [
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "best_dtype",
    "build_pretrain_datasets",
    "merge_datasets",
]


def __getattr__(name: str):
    # torch is imported only when the GPT dataset is used.
    if name == "build_pretrain_datasets":
        from aquila.data.gpt_dataset import build_pretrain_datasets

        return build_pretrain_datasets
    raise AttributeError(name)
