"""Shared helpers for the training tests (no tests here): synthetic data, tiny model dirs, running entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from aquila.config import ModelArgs
from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "aquila"
DEMO_TOKENIZER = EXAMPLES / "demo_tokenizer"
DEMO_DATA = REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"
CONVOS = EXAMPLES / "data" / "convo_samples.jsonl"


def make_indexed_dataset(prefix: Path, vocab: int = 512, docs: int = 60, seed: int = 0) -> str:
    """Documents that follow a learnable pattern (token t+1 = t + 1 mod vocab, random starts)."""
    rng = np.random.default_rng(seed)
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(docs):
            n = int(rng.integers(40, 120))
            start = int(rng.integers(0, vocab))
            b.add_document((start + np.arange(n)) % vocab)
        b.finalize()
    return str(prefix)


def micro_model_dir(path: Path, vocab: int = 512, **overrides) -> Path:
    """A config.json-only model directory (weights come from the seed) for pre_load_dir/model_name."""
    args = dict(
        dim=32, n_layers=2, n_heads=2, vocab_size=vocab, multiple_of=16, max_seq_len=128, initializer_range=0.02
    )
    args.update(overrides)
    path.mkdir(parents=True, exist_ok=True)
    ModelArgs(**args).save(path / "config.json")
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def pretrain_config(tmp: Path, **overrides) -> dict:
    prefix = tmp / "synth"
    if not Path(f"{prefix}.bin").exists():
        make_indexed_dataset(prefix)
    base = {
        "model_name": "aquila-micro",
        "data_prefix": str(prefix),
        "seq_length": 32,
        "batch_size": 4,
        "max_steps": 6,
        "lr": 3.0e-3,
        "warm_up": 0.2,
        "weight_decay": 0.1,
        "log_interval": 1,
        "eval_interval": 1000,
        "save_interval": 1000,
        "eval_iters": 2,
        "save_dir": str(tmp / "out"),
        "save_optim": True,
        "save_rng": True,
        "load_optim": True,
        "load_rng": True,
        "resume_dataset": True,
        "num_checkpoints": 10,
        "peak_tflops": 1.0,
        "env_type": "pytorch",
    }
    base.update(overrides)
    return base


def losses(save_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def torchrun(
    script_args: list[str],
    nproc: int = 2,
    cwd: Path | None = None,
    timeout: int = 300,
    module: str = "aquila.train.pretrain",
):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", module, *script_args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
