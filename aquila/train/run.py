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

from aquila.checkpoint import CONFIG_NAME, ModelDir, build_model, check_state_dict, load_into, meta_model
from aquila.config import ModelArgs
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


@dataclass
class RunContext:
    cfg: TrainConfig
    env: DistEnv
    model_args: ModelArgs
    seq_length: int
    tokenizer: Any | None
    global_batch_size: int


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


def run(
    cfg: TrainConfig, build_data: Callable[[RunContext], DataBundle], precheck: Callable[[TrainConfig], None]
) -> int:
    env = resolve_env(cfg)
    cfg = runtime_config(cfg, env)
    args, source = model_source(cfg)
    seq_length = cfg.seq_length or args.max_seq_len
    if seq_length > args.max_seq_len:
        raise AquilaError(f"seq_length {seq_length} is above the model's max_seq_len {args.max_seq_len}")
    tok_dir = tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir, args)
    if tok is not None and len(tok) < args.vocab_size and env.is_main:
        print(
            f" warning: tokenizer {tok_dir} has {len(tok)} tokens but the model's vocab_size is"
            f" {args.vocab_size}: ids {len(tok)}..{args.vocab_size - 1} never occur in the data (fine if the"
            " vocabulary was padded on purpose; otherwise check tokenizer_dir and the model's config)",
            flush=True,
        )
    precheck(cfg)
    with ckpt_io.save_dir_lock(cfg.save_dir, env.is_main):
        resume = resume_point(cfg, env)
        resume_state = ckpt_io.read_train_state(resume) if resume else None
        weights = initial_weights(cfg, args, source, resume)
        backend = make_backend(env, cfg)
        backend.start()
        try:
            return _train(cfg, backend, args, source, seq_length, tok, resume, resume_state, weights, build_data)
        finally:
            shutdown()


def runtime_config(cfg: TrainConfig, env: DistEnv) -> TrainConfig:
    """One warning line per key that has no effect on this run (see config.NO_EFFECT); fp16 off on CPU."""
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


def initial_weights(cfg: TrainConfig, args: ModelArgs, source: ModelSource, resume: Path | None):
    """The (memory-mapped) state to start from, read and strictly checked once, before the process group starts:
    the resumed checkpoint's weights (LoRA: the base model's; adapters are loaded after apply_lora), else the
    pre-loaded model's, else None (FlagAI's seeded init). Returns (state, where it came from)."""
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
            return state, str(resume)
    if source.weights is None:
        return None, None
    state = ModelDir.open(source.model_dir).read_state(source.weights)
    check_state_dict(meta_model(args), state, str(source.weights))
    return state, str(source.weights)


def _train(cfg, backend, args, source, seq_length, tok, resume, resume_state, weights, build_data) -> int:
    env = backend.env
    seed_everything(cfg.seed)
    gb = cfg.batch_size * env.world_size * cfg.gradient_accumulation_steps
    ctx = RunContext(cfg, env, args, seq_length, tok, gb)
    data = build_data(ctx)
    total = cfg.max_steps or (cfg.epochs * data.samples_per_epoch) // gb
    if total <= 0:
        raise AquilaError(
            f"the training split has {data.samples_per_epoch} samples, fewer than one global batch of {gb}"
            f" (batch_size {cfg.batch_size} x {env.world_size} processes x {cfg.gradient_accumulation_steps} accumulation)"
        )

    # Model: FlagAI's init on every rank from the same seed, or built on the meta device and given the weights.
    state_dict, state_source = weights
    if state_dict is None:
        model = build_model(args, env.device, torch.float32, seed=cfg.seed)
    else:
        model = meta_model(args)
        load_into(model, state_dict, state_source, torch.float32)
        model.to(env.device)
    del state_dict, weights
    lora_cfg = None
    if cfg.lora:
        from aquila.lora import apply_lora, load_adapter, lora_config

        base = str(Path(cfg.pre_load_dir) / cfg.model_name) if cfg.pre_load_dir else cfg.model_name
        lora_cfg = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, base)
        apply_lora(model, lora_cfg)
        if resume is not None:
            load_adapter(model, resume)
    model.train()
    wrapped = backend.parallelize(model)
    optimizer = build_optimizer(wrapped, cfg)
    scaler = LossScaler(cfg.bmt_loss_scale, cfg.bmt_loss_scale_steps, enabled=cfg.fp16)
    state = TrainState()
    offset = cfg.skip_iters * gb
    if resume is not None:
        restore = functools.partial(_restore, cfg, backend, wrapped, optimizer, scaler, state, resume, resume_state, gb)
        offset = on_every_rank(restore, env)  # a file only one rank reads (rng/rank<r>.pt) may be what fails

    saver = None
    if cfg.save_dir:
        if env.is_main:
            ckpt_io.clean_partials(Path(cfg.save_dir))
        saver = ckpt_io.Saver(cfg, backend, args, tok, lora_cfg, total_steps=total)
    train_batches = GlobalBatches(
        data.train, data.order, data.collate, cfg.batch_size, env.world_size, env.rank, cfg.gradient_accumulation_steps
    )
    train_batches.offset = offset
    valid_batches, valid_steps = None, 0
    if data.valid is not None:
        valid_batches = GlobalBatches(
            data.valid, data.valid_order, data.collate, cfg.batch_size, env.world_size, env.rank, 1
        )
        valid_steps = min(cfg.eval_iters or 10**12, len(data.valid) // (cfg.batch_size * env.world_size))

    peak = cfg.peak_tflops or (measure_matmul_tflops(env.device) if env.is_main else 0.0)
    flops = flops_per_token(args, seq_length) / env.world_size
    logger = MetricsLogger(cfg, env, total, state.step, flops, peak * 1e12)
    logger.restore_window((resume_state or {}).get("log_window"))
    if env.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.message(
            f" {env.env_type} on {env.world_size} x {env.device.type} | model {cfg.model_name} from {source.describe()}"
            f" ({args.num_params() / 1e6:.1f}M params, {n_train / 1e6:.2f}M trainable) | seq {seq_length}"
            f" | global batch {gb} | iterations {state.step}->{total} | precision {backend.mixed_precision}"
            f" | peak {peak:.3g} TFLOP/s per process"
        )
        if tok is None and saver is not None:
            logger.message(" note: no tokenizer (set tokenizer_dir): checkpoints will hold no tokenizer files")
    trainer = Trainer(
        cfg=cfg,
        backend=backend,
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
        seq_length=seq_length,
    )
    t0, first = time.perf_counter(), state.step + 1
    try:
        with trainer.stop.installed():
            trainer.fit()
    finally:
        logger.close()
    logged = logger.logged_losses
    if env.is_main and state.step >= first:
        losses = ""
        if logged:
            losses = (f" | first loss {logged[0]:.4f} | last loss {logged[-1]:.4f} (logged means over log_interval"
                      f" {cfg.log_interval})")  # fmt: skip
        logger.message(
            f" done: {state.step - first + 1} iterations ({first}-{state.step}) in {time.perf_counter() - t0:.1f}s"
            f"{losses}"
        )
    return PREEMPTED_EXIT if state.stopped_by else 0


def _restore(cfg, backend, model, optimizer, scaler, state: TrainState, ckpt: Path, saved: dict, gb: int) -> int:
    """Counters, optimizer, loss scale and RNG from a checkpoint. Returns the data offset (in samples)."""
    env = backend.env
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
