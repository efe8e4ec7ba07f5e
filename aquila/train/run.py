"""Shared setup for `aquila pretrain` and `aquila sft`: checks, model source, resume, parallelism, then the loop.

Everything that can be wrong with the inputs is checked before the process group starts or the first step
runs, each with one error line.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aquila.checkpoint import ModelDir, build_model, check_state_dict, load_into, meta_model
from aquila.config import ModelArgs
from aquila.constants import CONFIG_NAME
from aquila.errors import AquilaError
from aquila.tokenizer.files import tokenizer_file
from aquila.train import checkpointing as ckpt_io
from aquila.train.backends import make_backend
from aquila.train.batches import GlobalBatches
from aquila.train.config import TrainConfig, no_effect_notes
from aquila.train.distributed import DistEnv, on_every_rank, resolve_env, shutdown
from aquila.train.loop import PREEMPTED_EXIT, Trainer, TrainState
from aquila.train.metrics import MetricsLogger, flops_per_token, measure_matmul_tflops
from aquila.train.model_source import ModelSource, locate_model
from aquila.train.optim import LossScaler, build_optimizer


@dataclass
class DataBundle:
    train: Any  # map-style dataset of dicts
    valid: Any | None
    order: Callable[[int], int]
    valid_order: Callable[[int], int]
    collate: Callable
    samples_per_epoch: int


@dataclass(frozen=True)
class RunPlan:
    """Everything one training run is made of, decided once from the config and the environment before the
    process group starts (and read, never changed, by the steps after). `build_data` gets the plan itself."""

    cfg: TrainConfig  # after runtime_config (fp16 off on CPU)
    env: DistEnv
    model_args: ModelArgs
    source: ModelSource
    seq_length: int
    tokenizer_dir: Path | None
    tokenizer: Any | None
    resume: Path | None  # the checkpoint to continue from, None: a fresh run
    resume_state: dict | None  # its train_state.json
    weights: InitialWeights
    backend: Any  # aquila.train.backends: DDP / FSDP / BMTrain / single process, not started yet
    global_batch_size: int

    @property
    def lora_base(self) -> str:
        """What a LoRA adapter's config names as its base model (PEFT's base_model_name_or_path)."""
        cfg = self.cfg
        return str(Path(cfg.pre_load_dir) / cfg.model_name) if cfg.pre_load_dir else cfg.model_name


@dataclass
class InitialWeights:
    """The (memory-mapped) state dict a fresh model gets, and where it came from; state None: FlagAI's seeded init."""

    state: dict | None
    source: str | None

    def take(self) -> dict | None:
        """The state, handed over once: the plan keeps no reference to tensors the model now holds."""
        state, self.state = self.state, None
        return state


@dataclass(frozen=True)
class ModelPlan:
    """The model, its sequence length and its tokenizer: what `run` checks before it takes save_dir's lock."""

    args: ModelArgs
    source: ModelSource
    seq_length: int
    tokenizer_dir: Path | None
    tokenizer: Any | None


def model_source(cfg: TrainConfig) -> tuple[ModelArgs, ModelSource]:
    src = locate_model(cfg.model_name, cfg.pre_load_dir, cfg.bmt_pre_load)
    args = ModelDir.open(src.model_dir).args if src.model_dir else ModelArgs.from_name(cfg.model_name)
    return args, src


def tokenizer_dir(cfg: TrainConfig) -> Path | None:
    if cfg.tokenizer_dir:
        path = Path(cfg.tokenizer_dir)
        if not path.is_dir():
            raise AquilaError(f"tokenizer_dir {path}: directory not found")
        return path
    if cfg.pre_load_dir:
        path = Path(cfg.pre_load_dir) / cfg.model_name
        if path.is_dir() and tokenizer_file(path) is not None:
            return path
    return None


def load_tokenizer(path: Path | None, args: ModelArgs) -> Any | None:
    if path is None:
        return None
    from aquila.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(path)
    if len(tok) > args.vocab_size:
        raise AquilaError(f"tokenizer {path} has {len(tok)} tokens but the model's vocab_size is {args.vocab_size}")
    return tok


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, build_data: Callable[[RunPlan], DataBundle], precheck: Callable[[TrainConfig], None]) -> int:
    """The entry point: the plan (checks first, each with one error line), then the process group and `_train`."""
    env = resolve_env(cfg)
    cfg = runtime_config(cfg, env)
    model = plan_model(cfg, warn=env.is_main)
    precheck(cfg)
    with ckpt_io.save_dir_lock(cfg.save_dir, env.is_main):
        plan = plan_run(cfg, env, model)
        plan.backend.start()
        try:
            return _train(plan, build_data)
        finally:
            shutdown()


def plan_model(cfg: TrainConfig, warn: bool) -> ModelPlan:
    """Model source, sequence length and tokenizer, checked against each other (also the launcher's pre-start
    check, `aquila.launch.train_check`); `warn`: print the warning about a smaller tokenizer."""
    args, source = model_source(cfg)
    seq_length = cfg.seq_length or args.max_seq_len
    if seq_length > args.max_seq_len:
        raise AquilaError(f"seq_length {seq_length} is above the model's max_seq_len {args.max_seq_len}")
    tok_dir = tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir, args)
    if tok is not None and len(tok) < args.vocab_size and warn:
        print(
            f" warning: tokenizer {tok_dir} has {len(tok)} tokens but the model's vocab_size is"
            f" {args.vocab_size}: ids {len(tok)}..{args.vocab_size - 1} never occur in the data (fine if the"
            " vocabulary was padded on purpose; otherwise check tokenizer_dir and the model's config)",
            flush=True,
        )
    return ModelPlan(args, source, seq_length, tok_dir, tok)


def plan_run(cfg: TrainConfig, env: DistEnv, model: ModelPlan) -> RunPlan:
    """The whole plan: the model's, the resume point (under save_dir's lock), the weights and the backend."""
    resume = resume_point(cfg, env)
    return RunPlan(
        cfg=cfg,
        env=env,
        model_args=model.args,
        source=model.source,
        seq_length=model.seq_length,
        tokenizer_dir=model.tokenizer_dir,
        tokenizer=model.tokenizer,
        resume=resume,
        resume_state=ckpt_io.read_train_state(resume) if resume else None,
        weights=initial_weights(cfg, model.args, model.source, resume),
        backend=make_backend(env, cfg),
        global_batch_size=cfg.batch_size * env.world_size * cfg.gradient_accumulation_steps,
    )


def runtime_config(cfg: TrainConfig, env: DistEnv) -> TrainConfig:
    """One warning line per key that has no effect on this run (config.IGNORED_KEYS); fp16 off on CPU."""
    notes = no_effect_notes(cfg)
    if cfg.fp16 and env.device.type != "cuda":
        notes.append("fp16: True needs CUDA; on CPU this run trains in fp32")
        cfg = dataclasses.replace(cfg, fp16=False)
    if env.is_main:
        for note in notes:
            print(f" warning: {note}", flush=True)
    return cfg


def resume_point(cfg: TrainConfig, env: DistEnv) -> Path | None:
    """The checkpoint to continue from, checked against its manifest; the log says whether the run resumes."""
    say = functools.partial(print, flush=True) if env.is_main else lambda *_: None

    def check(ckpt: Path, state: dict) -> None:
        if cfg.load_rng:
            ckpt_io.check_rng_files(ckpt, state, env.world_size)

    if cfg.load_dir is None:
        say(" load_dir null: starting fresh")
        return None
    if cfg.load_dir != "auto":
        ckpt = ckpt_io.resolve_checkpoint(cfg.load_dir, cfg.load_type)
        ckpt_io.verify_checkpoint(ckpt)
        check(ckpt, ckpt_io.read_train_state(ckpt))
        return ckpt
    found = ckpt_io.find_latest(Path(cfg.save_dir), say, check) if cfg.save_dir else None
    say(f" load_dir auto: resuming from {found}" if found else f" load_dir auto: no checkpoint in {cfg.save_dir}"
        " or its experiment's earlier runs: starting fresh")  # fmt: skip
    return found


def initial_weights(cfg: TrainConfig, args: ModelArgs, source: ModelSource, resume: Path | None) -> InitialWeights:
    """The (memory-mapped) state to start from, read and strictly checked once, before the process group starts:
    the resumed checkpoint's weights (LoRA: the base model's; adapters are loaded after apply_lora), else the
    pre-loaded model's, else none (FlagAI's seeded init)."""
    if resume is not None:
        saved = ModelDir.open(resume)
        if saved.args != args:
            raise AquilaError(
                f"{resume / CONFIG_NAME}: the checkpoint's model config differs from model_name {cfg.model_name!r}"
                " (load_dir: null starts fresh)"
            )
        if not cfg.lora:
            state = saved.read_state()
            check_state_dict(meta_model(args), state, str(resume))
            return InitialWeights(state, str(resume))
    if source.weights is None:
        return InitialWeights(None, None)
    state = ModelDir.open(source.model_dir).read_state(source.weights)
    check_state_dict(meta_model(args), state, str(source.weights))
    return InitialWeights(state, str(source.weights))


def _train(plan: RunPlan, build_data: Callable[[RunPlan], DataBundle]) -> int:
    """Data, model, optimizer, resumed state, saver, batches and logger from the plan; then the loop."""
    cfg, env = plan.cfg, plan.env
    seed_everything(cfg.seed)
    data = build_data(plan)
    total = total_steps(plan, data)
    model, lora_cfg = build_train_model(plan)
    wrapped = plan.backend.parallelize(model)
    optimizer = build_optimizer(wrapped, cfg)
    scaler = LossScaler(cfg.bmt_loss_scale, cfg.bmt_loss_scale_steps, enabled=cfg.fp16)
    state = TrainState()
    offset = cfg.skip_iters * plan.global_batch_size
    if plan.resume is not None:  # a file only one rank reads (rng/rank<r>.pt) may be what fails
        offset = on_every_rank(functools.partial(_restore, plan, wrapped, optimizer, scaler, state), env)
    saver = build_saver(plan, lora_cfg, total)
    train_batches, valid_batches, valid_steps = build_batches(plan, data, offset)
    logger = build_logger(plan, model, total, state, saver)
    trainer = Trainer(
        cfg=cfg,
        backend=plan.backend,
        model=wrapped,
        optimizer=optimizer,
        scaler=scaler,
        train_batches=train_batches,
        valid_batches=valid_batches,
        valid_steps=valid_steps,
        total_steps=total,
        saver=saver,
        logger=logger,
        state=state,
        seq_length=plan.seq_length,
    )
    t0, first = time.perf_counter(), state.step + 1
    try:
        with trainer.stop.installed():
            trainer.fit()
    finally:
        logger.close()
    if env.is_main and state.step >= first:
        _report_done(logger, cfg, first, state.step, time.perf_counter() - t0)
    return PREEMPTED_EXIT if state.stopped_by else 0


def total_steps(plan: RunPlan, data: DataBundle) -> int:
    cfg, gb = plan.cfg, plan.global_batch_size
    total = cfg.max_steps or (cfg.epochs * data.samples_per_epoch) // gb
    if total <= 0:
        raise AquilaError(
            f"the training split has {data.samples_per_epoch} samples, fewer than one global batch of {gb}"
            f" (batch_size {cfg.batch_size} x {plan.env.world_size} processes x {cfg.gradient_accumulation_steps}"
            " accumulation)"
        )
    return total


def build_train_model(plan: RunPlan):
    """FlagAI's init on every rank from the same seed, or built on the meta device and given the planned weights;
    LoRA adapters on top (the resumed ones loaded). Returns (model in train mode, LoRA config or None)."""
    cfg, env = plan.cfg, plan.env
    state_dict = plan.weights.take()
    if state_dict is None:
        model = build_model(plan.model_args, env.device, torch.float32, seed=cfg.seed)
    else:
        model = meta_model(plan.model_args)
        load_into(model, state_dict, plan.weights.source, torch.float32)
        model.to(env.device)
    del state_dict
    lora_cfg = None
    if cfg.lora:
        from aquila.lora import apply_lora, load_adapter, lora_config

        lora_cfg = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, plan.lora_base)
        apply_lora(model, lora_cfg)
        if plan.resume is not None:
            load_adapter(model, plan.resume)
    model.train()
    return model, lora_cfg


def build_saver(plan: RunPlan, lora_cfg, total_steps: int) -> ckpt_io.Saver | None:
    """The checkpoint writer (None without save_dir); partial checkpoints a killed run left are removed first."""
    if not plan.cfg.save_dir:
        return None
    if plan.env.is_main:
        ckpt_io.clean_partials(Path(plan.cfg.save_dir))
    return ckpt_io.Saver(plan.cfg, plan.backend, plan.model_args, plan.tokenizer, lora_cfg, total_steps=total_steps)


def build_batches(plan: RunPlan, data: DataBundle, offset: int):
    """(train batches starting at sample `offset`, validation batches or None, validation steps per evaluation)."""
    cfg, env = plan.cfg, plan.env
    train_batches = GlobalBatches(
        data.train, data.order, data.collate, cfg.batch_size, env.world_size, env.rank, cfg.gradient_accumulation_steps
    )
    train_batches.offset = offset
    if data.valid is None:
        return train_batches, None, 0
    valid_batches = GlobalBatches(
        data.valid, data.valid_order, data.collate, cfg.batch_size, env.world_size, env.rank, 1
    )
    valid_steps = min(cfg.eval_iters or 10**12, len(data.valid) // (cfg.batch_size * env.world_size))
    return train_batches, valid_batches, valid_steps


def build_logger(plan: RunPlan, model, total: int, state: TrainState, saver) -> MetricsLogger:
    """The metrics logger (MFU against the measured or given peak), with the run's one-line summary written."""
    cfg, env, args = plan.cfg, plan.env, plan.model_args
    peak = cfg.peak_tflops or (measure_matmul_tflops(env.device) if env.is_main else 0.0)
    flops = flops_per_token(args, plan.seq_length) / env.world_size
    logger = MetricsLogger(cfg, env, total, state.step, flops, peak * 1e12)
    logger.restore_window((plan.resume_state or {}).get("log_window"))
    if env.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.message(
            f" {env.env_type} on {env.world_size} x {env.device.type} | model {cfg.model_name} from"
            f" {plan.source.describe()} ({args.num_params() / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable)"
            f" | seq {plan.seq_length} | global batch {plan.global_batch_size} | iterations {state.step}->{total}"
            f" | precision {plan.backend.mixed_precision} | peak {peak:.3g} TFLOP/s per process"
        )
        if plan.tokenizer is None and saver is not None:
            logger.message(" note: no tokenizer (set tokenizer_dir): checkpoints will hold no tokenizer files")
    return logger


def _report_done(logger: MetricsLogger, cfg: TrainConfig, first: int, last: int, seconds: float) -> None:
    logged = logger.logged_losses
    losses = ""
    if logged:
        losses = (f" | first loss {logged[0]:.4f} | last loss {logged[-1]:.4f} (logged means over log_interval"
                  f" {cfg.log_interval})")  # fmt: skip
    logger.message(f" done: {last - first + 1} iterations ({first}-{last}) in {seconds:.1f}s{losses}")


def _restore(plan: RunPlan, model, optimizer, scaler, state: TrainState) -> int:
    """Counters, optimizer, loss scale and RNG from the plan's checkpoint. Returns the data offset (in samples)."""
    cfg, env, backend, ckpt, saved = plan.cfg, plan.env, plan.backend, plan.resume, plan.resume_state
    gb = plan.global_batch_size
    state.step = saved["iteration"]
    state.consumed_samples = saved["consumed_samples"] if cfg.resume_dataset else 0
    state.best_eval_loss, state.best_iteration = saved.get("best_eval_loss"), saved.get("best_iteration")
    if cfg.load_optim and saved.get("optimizer_state", True):
        backend.load_optimizer(model, optimizer, ckpt / ckpt_io.OPTIM_DIR)
        scaler.load_state_dict(saved.get("loss_scale") or {"scale": scaler.scale, "good_steps": 0})
    notes = [f"resumed from {ckpt} at iteration {state.step}"]
    if saved["global_batch_size"] != gb:
        notes.append(f"global batch size changed {saved['global_batch_size']} -> {gb}; data continues at sample"
                     f" {state.consumed_samples}")  # fmt: skip
    if cfg.load_rng and not ckpt_io.load_rng(ckpt, env, saved.get("world_size", env.world_size)):
        notes.append(f"RNG states not restored (saved with {saved.get('world_size')} processes, now {env.world_size})")
    if env.is_main:
        print(" " + "; ".join(notes), flush=True)
    # The global batch of iteration k starts at offset + k * gb; make iteration `step` start at consumed_samples.
    return state.consumed_samples - state.step * gb
