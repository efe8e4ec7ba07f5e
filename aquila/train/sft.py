"""`aquila sft --yaml_config X.yaml`: supervised fine-tuning on conversations (FlagAI's aquila_chat.py).

Data: `enable_sft_dataset_dir`/`enable_sft_dataset_file` (validation: `enable_sft_dataset_val_file` in the same
directory), tokenized by `aquila.data.sft.SFTDataset`: the loss covers assistant tokens only (labels -100
elsewhere) unless `train_on_prompt`. `sft_packing` concatenates conversations into rows of `seq_length`.
The model comes from `pre_load_dir/model_name` (weights with `bmt_pre_load: True`); `lora: True` trains
adapters on `lora_target_modules` only and saves them in PEFT's format.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from aquila.errors import AquilaError, run_command
from aquila.train.batches import SampleOrder
from aquila.train.config import SCRIPT_DEFAULTS, TrainConfig, parse_config
from aquila.train.run import DataBundle, RunPlan, run


def sft_paths(cfg: TrainConfig) -> tuple[Path, Path | None]:
    if not cfg.enable_sft_dataset_file:
        raise AquilaError("enable_sft_dataset_file is not set: name the conversations .jsonl (YAML or flag)")
    base = Path(cfg.enable_sft_dataset_dir or ".")
    train = base / cfg.enable_sft_dataset_file
    valid = base / cfg.enable_sft_dataset_val_file if cfg.enable_sft_dataset_val_file else None
    return train, valid


def precheck(cfg: TrainConfig) -> None:
    for path in filter(None, sft_paths(cfg)):
        if not path.is_file():
            raise AquilaError(f"SFT data {path}: file not found (enable_sft_dataset_dir / _file / _val_file)")


class _ListDataset:
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        return self.items[idx]


def _load(path: Path, plan: RunPlan):
    from aquila.data.sft import SFTDataset, pack_sft

    ds = SFTDataset(path, plan.tokenizer, max_length=plan.seq_length, train_on_prompt=plan.cfg.train_on_prompt)
    if plan.cfg.sft_packing:
        return _ListDataset(pack_sft((ds[i] for i in range(len(ds))), plan.seq_length))
    return ds


def build_data(plan: RunPlan) -> DataBundle:
    from aquila.data.sft import sft_collate

    if plan.tokenizer is None:
        raise AquilaError("SFT needs a tokenizer: set tokenizer_dir, or put one in pre_load_dir/model_name")
    train_path, valid_path = sft_paths(plan.cfg)
    train = _load(train_path, plan)
    valid = _load(valid_path, plan) if valid_path else None
    cfg = plan.cfg
    collate = functools.partial(sft_collate, pad_id=plan.tokenizer.token_pad_id)
    order = SampleOrder(len(train), cfg.shuffle_dataset, cfg.seed)
    valid_order = SampleOrder(len(valid), False, cfg.seed) if valid is not None else None
    return DataBundle(train, valid, order, valid_order, collate, len(train))


def main(argv: list[str] | None = None, prog: str = "aquila sft") -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: run(parse_config(argv, prog, SCRIPT_DEFAULTS), build_data, precheck))


if __name__ == "__main__":
    sys.exit(main())
