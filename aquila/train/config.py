"""`TrainConfig`: FlagAI's EnvArgs keys (same names and defaults) plus ours, typed and checked.

Order of precedence, as in FlagAI: dataclass defaults < script defaults < command-line flags < YAML
(`--yaml_config`). Unlike FlagAI, unknown keys and wrong types are errors naming the key, and a YAML list
replaces the default list instead of being appended to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.io_utils import read_yaml
from aquila.typed_config import coerce, from_dict, is_number

EnvType = Literal["auto", "pytorch", "pytorchDDP", "fsdp", "bmtrain"]


@dataclass
class TrainConfig:
    # --- FlagAI EnvArgs (flagai/env_args.py), same names and defaults; those without effect: IGNORED_KEYS ---
    env_type: EnvType = "auto"  # auto: pytorch for one process, fsdp for several (FlagAI: "pytorch")
    experiment_name: str = "test_experiment"
    model_name: str = "test_model"
    epochs: int = 1
    batch_size: int = 1  # micro-batch per process
    lr: float = 1e-5
    warmup_start_lr: float = 0.0
    seed: int = 1234
    fp16: bool = False
    pytorch_device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu (FlagAI: "cpu")
    clip_grad: float = 1.0
    checkpoint_activations: bool = False
    gradient_accumulation_steps: int = 1
    weight_decay: float = 1e-5
    eps: float = 1e-8
    warm_up: float = 0.1  # warm-up as a fraction of all iterations
    warm_up_iters: int = 0  # overrides warm_up when > 0
    skip_iters: int = 0  # skip the first k global batches of the data (fresh runs only)
    log_interval: int = 100
    eval_interval: int = 1000
    save_interval: int = 1000
    save_dir: str | None = None
    load_dir: str | None = "auto"  # auto: the experiment's latest complete checkpoint, if any; null: start fresh
    save_optim: bool = False
    save_rng: bool = False
    load_type: Literal["latest", "best"] = "latest"
    load_optim: bool = False
    load_rng: bool = False
    tensorboard_dir: str = "tensorboard_summary"
    tensorboard: bool = False
    resume_dataset: bool = False
    shuffle_dataset: bool = True
    num_checkpoints: int = 1
    model_parallel_size: int = 1  # only 1: no tensor parallelism (validate)
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["wq", "wv"])
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    yaml_config: str | None = None
    bmt_cpu_offload: bool = False  # FlagAI: True (CPU-offloaded Adam); ours is opt-in
    bmt_lr_decay_style: str = "cosine"  # "linear", anything else = cosine to 10% of peak (Cosine10PP)
    bmt_loss_scale: float = 1024.0
    bmt_loss_scale_steps: int = 1024
    bmt_pre_load: bool = False  # load pre_load_dir/model_name's weights
    pre_load_dir: str | None = None
    enable_sft_dataset_dir: str | None = None
    enable_sft_dataset_file: str | None = None
    enable_sft_dataset_val_file: str | None = None
    enable_flash_attn_models: bool = False  # on CUDA: flash-attn must be installed (it is used whenever it is)
    enable_pretrain_dataset_prefix: str | None = None  # FlagAI SQL YAML key; used as data_prefix if that is unset
    # --- ours ---
    bf16: bool | None = None  # None: bf16 on CUDA (unless fp16), fp32 on CPU; fsdp: FSDP2 policy, else autocast
    compile: bool = False  # torch.compile each transformer block
    seq_length: int | None = None  # None: the model's max_seq_len
    max_steps: int = 0  # optimizer steps; 0: epochs x steps per epoch
    data_prefix: str | list[Any] | None = None  # "prefix" or [w1, prefix1, w2, prefix2, ...]
    data_splits: str = "90,10"  # train,valid(,test) weights over documents
    eval_iters: int = 10  # global validation batches per evaluation; 0: the whole split
    tokenizer_dir: str | None = None  # None: pre_load_dir/model_name
    peak_tflops: float | None = None  # per process, for MFU; None: measured at start with a matmul
    nan_skip_limit: int = 10  # stop (with a checkpoint) after this many consecutive non-finite steps
    sft_packing: bool = False  # pack several conversations into one row of seq_length
    train_on_prompt: bool = False  # SFT: also train on user/system tokens
    dist_timeout_s: int = 1800  # process-group timeout
    # A checkpoint's weights are written once: as FlagAI's full file (rank 0) at steps divisible by
    # save_full_interval and at the run's last step, else as every rank's own shard (model/, enough to resume).
    save_full_interval: int | None = None  # None: save_interval (every checkpoint loadable, FlagAI's layout)
    save_full_format: Literal["bin", "safetensors"] = "bin"  # pytorch_model.bin (FlagAI) or model.safetensors
    # --- not a key: the IGNORED_KEYS this config set, with their values (parse_config), for the warnings ---
    flagai_ignored: dict[str, Any] = field(default_factory=dict, metadata={"key": False})


# Values FlagAI's Aquila example scripts set in their EnvArgs(...) call (examples/Aquila/*/aquila_*.py),
# minus env_type/fp16, which we choose by hardware. Overridden by flags and YAML.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "experiment_name": "aquila",
    "batch_size": 1,
    "lr": 2e-4,
    "weight_decay": 1e-3,
    "epochs": 100,
    "log_interval": 10,
    "eval_interval": 5000,
    "save_dir": "checkpoints_aquila",
    "save_interval": 5000,
}


@dataclass(frozen=True)
class IgnoredKey:
    """A FlagAI EnvArgs key that is accepted (flag or YAML, type-checked) and has no effect here."""

    type: type
    default: Any  # FlagAI's default (wandb: ours); any other value prints one warning line
    why: str
    warn: bool = True


# The one table of FlagAI keys TrainConfig accepts and ignores: they are not TrainConfig fields (nothing can read
# them by mistake); parse_config keeps what was set in `flagai_ignored` and each one set to something other than
# its default prints `<key>: <value> has no effect: <why>` when the run starts.
_LAUNCHER = "the launcher (hostfile, dist_trigger_docker.sh) and torchrun's environment decide this"
_DATASET_KIND = "the entry script decides the dataset kind (aquila_pretrain.py: indexed data, aquila_sft.py: jsonl)"
IGNORED_KEYS: dict[str, IgnoredKey] = {
    "wandb": IgnoredKey(bool, False, "no wandb logging here; tensorboard: True writes the same scalars"),
    # Silent: FlagAI's bmtrain_mgpu.sh (and ours) passes it to every run; the wandb line above covers its meaning.
    "wandb_dir": IgnoredKey(str, "./wandb", "used only by wandb, which is not here", warn=False),
    "already_fp16": IgnoredKey(bool, False, "weights are loaded into fp32 master weights whatever their dtype"),
    "bmt_async_load": IgnoredKey(bool, False, "checkpoints are memory-mapped, there is nothing to load asynchronously"),
    "deepspeed_config": IgnoredKey(
        str,
        "./deepspeed.json",
        "no DeepSpeed here; env_type fsdp shards parameters, gradients and optimizer state (ZeRO-3)",
    ),
    "enable_flashattn": IgnoredKey(bool, False, "flash-attn is used on CUDA whenever it is installed"),
    "pretrain_data": IgnoredKey(bool, False, _DATASET_KIND),
    "master_ip": IgnoredKey(str, "localhost", _LAUNCHER),
    "master_port": IgnoredKey(int, 17750, _LAUNCHER),
    "num_nodes": IgnoredKey(int, 1, _LAUNCHER),
    "num_gpus": IgnoredKey(int, 1, _LAUNCHER),
    "hostfile": IgnoredKey(str, "./hostfile", _LAUNCHER),
    "training_script": IgnoredKey(str, "train.py", _LAUNCHER),
    **{
        k: IgnoredKey(bool, False, _DATASET_KIND)
        for k in (
            "enable_sft_dataset",
            "enable_sft_dataset_text",
            "enable_sft_dataset_jsonl",
            "enable_sft_conversations_dataset",
            "enable_sft_conversations_dataset_v2",
            "enable_sft_conversations_dataset_v3",
            "enable_weighted_dataset_v2",
        )
    },  # fmt: skip
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.metadata.get("key", True)}
_HINTS = typing.get_type_hints(TrainConfig)


def _parse_bool(text: str, where: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise AquilaError(f"{where}: expected True or False, got {text!r}")


def _members(tp: Any) -> tuple[tuple[Any, ...], bool]:
    """The non-None members of a (possibly Optional) union, and whether None is allowed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (tp,), False


def parse_cli_value(name: str, text: str) -> Any:
    """A command-line string converted to the type of key `name` (FlagAI's `[a,b]` lists included)."""
    where = f"flag --{name}"
    members, optional = _members(IGNORED_KEYS[name].type if name in IGNORED_KEYS else _HINTS[name])
    tp = members[0]
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if bool in members:
        return _parse_bool(text, where)
    stripped = text.strip()
    wants_list = any(typing.get_origin(m) is list for m in members)
    if wants_list and stripped.startswith("[") and stripped.endswith("]"):
        items = [s.strip().strip("'\"") for s in stripped[1:-1].split(",") if s.strip()]
        return coerce(items, next(m for m in members if typing.get_origin(m) is list), where)
    if tp is int and len(members) == 1:
        try:
            return int(stripped)
        except ValueError:
            raise AquilaError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float and len(members) == 1:
        try:
            return float(stripped)
        except ValueError:
            raise AquilaError(f"{where}: expected a number, got {text!r}") from None
    if wants_list and str not in members:
        return coerce([s.strip() for s in stripped.split(",")], members[0], where)
    return coerce(text, str if str in members else tp, where)


def build_arg_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Aquila training. Precedence: defaults < flags < --yaml_config. Every TrainConfig key is a flag.",
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    for name, f in _FIELDS.items():  # the flag's default is the YAML's; --help shows TrainConfig's
        shown = "" if f.default is dataclasses.MISSING else f"(default: {str(f.default).replace('%', '%%')})"
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="V", help=shown or None)
    for name, key in IGNORED_KEYS.items():
        shown = f"(default: {str(key.default).replace('%', '%%')}; no effect: {key.why.replace('%', '%%')})"
        parser.add_argument(f"--{name}", dest=f"{_IGNORED}{name}", default=argparse.SUPPRESS, metavar="V", help=shown)
    # torch>=2 launchers pass --local-rank; older ones --local_rank. RANK/LOCAL_RANK come from the environment.
    parser.add_argument("--local-rank", "--local_rank", dest="_local_rank", default=None, help=argparse.SUPPRESS)
    # FlagAI's launcher flag: we never re-launch ourselves, so it is accepted and ignored.
    parser.add_argument("--not_call_launch", dest="_not_call_launch", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_config(argv: list[str], prog: str, script_defaults: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from defaults < `script_defaults` < flags in `argv` < the YAML named by --yaml_config."""
    parser = build_arg_parser(prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        raise AquilaError(f"unknown command-line argument {unknown[0]!r}")
    cfg, ignored = _from_dict(dict(script_defaults or {}), f"{prog} defaults")
    cli = {k: parse_cli_value(k, v) for k, v in vars(ns).items() if not k.startswith("_")}
    cfg = dataclasses.replace(cfg, **cli)
    for dest, text in vars(ns).items():
        if dest.startswith(_IGNORED):
            ignored[dest.removeprefix(_IGNORED)] = parse_cli_value(dest.removeprefix(_IGNORED), text)
    if cfg.yaml_config:
        data = read_yaml(cfg.yaml_config)
        if not data:
            raise AquilaError(f"config {cfg.yaml_config}: the file is empty (expected keys such as model_name)")
        cfg, from_yaml = _from_dict(data, str(cfg.yaml_config), base=cfg)
        ignored.update(from_yaml)
    cfg = dataclasses.replace(cfg, flagai_ignored=ignored)
    if cfg.data_prefix is None and cfg.enable_pretrain_dataset_prefix:
        cfg = dataclasses.replace(cfg, data_prefix=cfg.enable_pretrain_dataset_prefix)
    validate(cfg)
    return cfg


_IGNORED = "_ignored:"  # argparse dest prefix of the IGNORED_KEYS flags


def _from_dict(data: dict, source: str, base: TrainConfig | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """TrainConfig from a mapping (over `base`), and the IGNORED_KEYS it sets, type-checked as TrainConfig's are."""
    if isinstance(data, dict):
        for name in data:
            if name in _HINTS and name not in _FIELDS:
                raise AquilaError(f"{source}: unknown key {name!r}")
    cfg = from_dict(TrainConfig, data, source, base=base, ignore=frozenset(IGNORED_KEYS))
    ignored = {k: coerce(v, IGNORED_KEYS[k].type, f"{source}: key {k!r}") for k, v in data.items() if k in IGNORED_KEYS}
    return cfg, ignored


def validate(cfg: TrainConfig) -> None:
    """Value checks that need no files; one error line each."""
    positive = ("batch_size", "gradient_accumulation_steps", "log_interval", "eval_interval", "save_interval")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise AquilaError(f"{name} must be positive, got {getattr(cfg, name)}")
    non_negative = ("epochs", "max_steps", "warm_up_iters", "skip_iters", "eval_iters", "nan_skip_limit")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise AquilaError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.seed < 2**32:
        raise AquilaError(f"seed must be in 0..{2**32 - 1} (numpy's range), got {cfg.seed}")
    if not cfg.clip_grad >= 0:  # also NaN
        raise AquilaError(f"clip_grad must be >= 0 (0: no clipping), got {cfg.clip_grad}")
    if isinstance(cfg.data_prefix, list):
        _check_data_prefix(cfg.data_prefix)
    if cfg.epochs == 0 and cfg.max_steps == 0:
        raise AquilaError("set epochs or max_steps to a positive number")
    if cfg.save_full_interval is not None and cfg.save_full_interval <= 0:
        raise AquilaError(f"save_full_interval must be positive (or null: save_interval), got {cfg.save_full_interval}")
    if cfg.num_checkpoints < 1:
        raise AquilaError(f"num_checkpoints must be >= 1, got {cfg.num_checkpoints}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise AquilaError(f"lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.warm_up <= 1:
        raise AquilaError(f"warm_up is a fraction of all iterations and must be in [0, 1], got {cfg.warm_up}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise AquilaError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.seq_length is not None and cfg.seq_length < 2:
        raise AquilaError(f"seq_length must be >= 2, got {cfg.seq_length}")
    if cfg.fp16 and cfg.bf16:
        raise AquilaError("fp16 and bf16 are both True; choose one")
    if cfg.lora and cfg.lora_r <= 0:
        raise AquilaError(f"lora_r must be positive, got {cfg.lora_r}")
    if cfg.model_parallel_size != 1:
        raise AquilaError(
            f"model_parallel_size {cfg.model_parallel_size}: tensor parallelism is not implemented; set it to 1"
            " (env_type fsdp shards the model over all processes instead)"
        )
    if cfg.env_type == "bmtrain" and cfg.lora:
        raise AquilaError("lora is not supported with env_type bmtrain; use fsdp or pytorchDDP")


def _check_data_prefix(items: list[Any]) -> None:
    """[prefix] or [w1, prefix1, w2, prefix2, ...]: numbers before paths."""
    shape = "expected [prefix] or [weight1, prefix1, weight2, prefix2, ...]"
    if len(items) == 1:
        if not isinstance(items[0], str):
            raise AquilaError(f"data_prefix {items!r}: {shape} (a single item must be a path)")
        return
    if not items or len(items) % 2:
        raise AquilaError(f"data_prefix {items!r}: {shape}")
    for w, p in zip(items[0::2], items[1::2]):
        if not (is_number(w) or _is_float_text(w)) or not isinstance(p, str):
            raise AquilaError(f"data_prefix {items!r}: {shape}; got {w!r}, {p!r} where a weight and a path belong")


def _is_float_text(value: Any) -> bool:  # a weight given on the command line: --data_prefix [0.5,a,0.5,b]
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def no_effect_notes(cfg: TrainConfig) -> list[str]:
    """`<key>: <value> has no effect: <why>` for each IGNORED_KEYS key set to something other than its default,
    in the table's order."""
    notes = []
    for name, key in IGNORED_KEYS.items():
        if name in cfg.flagai_ignored and key.warn and cfg.flagai_ignored[name] != key.default:
            notes.append(f"{name}: {cfg.flagai_ignored[name]} has no effect: {key.why}")
    return notes
