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
    "SFTDataset",
    "best_dtype",
    "build_pretrain_datasets",
    "merge_datasets",
    "pack_sft",
    "sft_collate",
]

# Imported on first use, so that `aquila preprocess` and friends do not import torch.
_LAZY = {
    "build_pretrain_datasets": "aquila.data.gpt_dataset",
    "SFTDataset": "aquila.data.sft",
    "sft_collate": "aquila.data.sft",
    "pack_sft": "aquila.data.sft",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aquila.data' has no attribute {name!r}")
