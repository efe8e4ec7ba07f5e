"""The training script's command line, built once for the node script and for the trigger's pre-start check.

The check runs the trainer's own code on exactly the argv its processes will get, before anything starts: its
parser (unknown keys, types, value ranges: `aquila.train.config.parse_config`), the model it names, its
seq_length and the tokenizer (`run.plan_model`, the trainer's own first step), the data (`pretrain.precheck` /
`sft.precheck`) and an explicit `load_dir`.
A mistake is then one `error:` line from the trigger instead of a traceback in the log after "started". Only the
shipped scripts are checked this way: a SCRIPT_FILE of your own may parse its flags differently.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# FlagAI's bmtrain_mgpu.sh command-line values; the YAML overrides every one of them (defaults < flags < YAML).
FLAGAI_FLAGS = (
    ("batch_size", "6"),
    ("epochs", "1"),
    ("gradient_accumulation_steps", "1"),
    ("lr", "6.0e-5"),
    ("warm_up", "0.2"),
    ("weight_decay", "0.1"),
    ("adam_beta1", "0.9"),
    ("adam_beta2", "0.95"),
)
TRAINERS = {"aquila_pretrain.py": "aquila.train.pretrain", "aquila_sft.py": "aquila.train.sft"}


def trainer_args(proj_home: str | os.PathLike, exp: str, version: str, model: str, config: str) -> list[str]:
    """What bmtrain_mgpu.sh passes the training script (FlagAI's flags; the run's directories under PROJ_HOME)."""
    home = Path(proj_home)
    args = ["--not_call_launch"]
    for name, value in FLAGAI_FLAGS:
        args += [f"--{name}", value]
    for name, value in (
        ("save_dir", home / "checkpoints_out" / exp / version),
        ("pre_load_dir", home / "checkpoints_in"),
        ("experiment_name", exp),
        ("model_name", model),
        ("wandb_dir", home / "wandb" / exp / version),
        ("yaml_config", config),
    ):
        args += [f"--{name}", str(value)]
    return args


def trainer_module(script: str | os.PathLike, script_dir: str | os.PathLike) -> str | None:
    """`aquila.train.pretrain` / `.sft` when `script` is the shipped aquila_pretrain.py / aquila_sft.py, else None."""
    script = Path(script).resolve()
    for name, module in TRAINERS.items():
        if script == (Path(script_dir) / name).resolve():
            return module
    return None


def check_training_inputs(script: str | os.PathLike, script_dir: str | os.PathLike, argv: list[str]) -> None:
    """Run the trainer's own pre-start checks on `argv` (relative YAML paths resolve against the current
    directory, which is PROJ_HOME, as for the trainer). Imports torch (via the trainer) when it gets that far."""
    module_name = trainer_module(script, script_dir)
    if module_name is None:
        return
    from aquila.train.config import SCRIPT_DEFAULTS, parse_config

    cfg = parse_config(argv, Path(script).name, SCRIPT_DEFAULTS)
    from aquila.train import checkpointing, run

    run.plan_model(cfg, warn=False)
    importlib.import_module(module_name).precheck(cfg)
    if cfg.load_dir not in (None, "auto"):
        checkpointing.resolve_checkpoint(cfg.load_dir, cfg.load_type)
