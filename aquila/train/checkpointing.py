"""Training checkpoints in FlagAI's layout, written atomically, and exact resume.

`<save_dir>/<step>/` holds a model directory (config.json, tokenizer files and the weights, written once: FlagAI's
pytorch_model.bin as a plain full state dict from rank 0 (model.safetensors with save_full_format) at the steps
divisible by save_full_interval (default save_interval: every checkpoint) and the run's last step, otherwise
model/, a torch.distributed.checkpoint where every rank writes its own part; `checkpoint.ModelDir` opens both;
LoRA runs write adapter_config.json + adapter_model.{safetensors,bin} instead of the base weights) plus the
training state: trainer_state.json
(step, consumed samples, batch geometry), optim/ (a torch.distributed.checkpoint of the optimizer, which
reshards across rank counts) when save_optim, and rng/rank<r>.pt when save_rng. `<save_dir>/latest_iteration.txt`
holds FlagAI's "<step>\\t<best step>".

Atomicity: every rank writes into `<save_dir>/.<step>.partial`; after a barrier rank 0 writes manifest.json
(size and CRC32 of every file), renames the directory to `<step>` and only then rewrites the tracker (atomically)
and prunes old steps. A process killed mid-save, or a write that fails (a full disk), leaves the tracker pointing
at the previous complete checkpoint and no step directory behind. Loading checks the manifest first.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import random
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from aquila.checkpoint import CONFIG_NAME, SHARDED_DIR, save_weights
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.io_utils import read_json, write_text_atomic
from aquila.manifest import MANIFEST, verify_manifest, write_manifest
from aquila.train.config import TrainConfig
from aquila.train.distributed import Backend, DistEnv, any_rank, barrier

TRACKER = "latest_iteration.txt"
LOCK_NAME = ".aquila.lock"
STATE_NAME = "trainer_state.json"
OPTIM_DIR = "optim"
RNG_DIR = "rng"


# -- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"], has_gauss, cached)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- locating checkpoints -------------------------------------------------------------------------
def read_tracker(save_dir: str | os.PathLike) -> tuple[int, int] | None:
    path = Path(save_dir) / TRACKER
    if not path.is_file():
        return None
    fields = path.read_text(encoding="utf-8").split()
    try:
        latest = int(fields[0])
        best = int(fields[1]) if len(fields) > 1 else latest
    except (ValueError, IndexError):
        raise AquilaError(
            f"{path}: expected '<step>' or '<step>\\t<best step>', got {path.read_text()[:40]!r}"
        ) from None
    return latest, best


def resolve_checkpoint(load_dir: str | os.PathLike, load_type: str = "latest") -> Path:
    """The step directory to resume from: via load_dir's tracker, or load_dir itself if it is a step dir."""
    load_dir = Path(load_dir)
    if not load_dir.is_dir():
        raise AquilaError(f"load_dir {load_dir}: directory not found")
    tracked = read_tracker(load_dir)
    if tracked is not None:
        step = tracked[1] if load_type == "best" else tracked[0]
        path = load_dir / str(step)
        if not path.is_dir():
            raise AquilaError(f"{load_dir / TRACKER} points to step {step} but {path} does not exist")
        return path
    if (load_dir / STATE_NAME).is_file() or (load_dir / CONFIG_NAME).is_file():
        return load_dir
    raise AquilaError(f"load_dir {load_dir}: no checkpoint ({TRACKER} or {STATE_NAME} not found)")


def read_train_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / STATE_NAME
    if not path.is_file():
        raise AquilaError(f"{ckpt}: not a training checkpoint ({STATE_NAME} missing)")
    state = read_json(path)
    for key in ("iteration", "consumed_samples", "global_batch_size"):
        if not isinstance(state.get(key), int):
            raise AquilaError(f"{path}: key {key!r} missing or not an integer (corrupt checkpoint?)")
    return state


def verify_checkpoint(ckpt: Path) -> bool:
    """Check every file of a training step against its manifest.json (one error naming the first bad file).
    A step without one is not trusted: every complete save writes it, so its files may be anything."""
    if not verify_manifest(ckpt):
        raise AquilaError(
            f"{ckpt}: no {MANIFEST}, so its files cannot be checked (every complete save writes one); if you trust"
            f" this step, record its files as they are with `python -m aquila.manifest write {ckpt}`"
        )
    return True


def experiment_runs(save_dir: Path) -> list[Path]:
    """save_dir, plus its sibling runs when it is a launcher run dir (checkpoints_out/<exp>/<YYYYMMDDHH>), newest first."""
    if not save_dir.name.isdigit() or not save_dir.parent.is_dir():
        return [save_dir]
    runs = {p for p in save_dir.parent.iterdir() if p.is_dir() and p.name.isdigit()} | {save_dir}
    return sorted(runs, key=lambda p: p.name, reverse=True)


def check_rng_files(ckpt: Path, state: dict[str, Any], world_size: int) -> None:
    """With load_rng: every rank's rng/rank<r>.pt is there (when the rank count is the saved one and save_rng was
    on), checked by every rank before any reads its own, so one rank cannot fail alone."""
    if state.get("world_size", world_size) != world_size or not (ckpt / RNG_DIR).is_dir():
        return
    for rank in range(world_size):
        path = ckpt / RNG_DIR / f"rank{rank}.pt"
        if not path.is_file():
            raise AquilaError(f"{path}: missing (load_rng is set; the other ranks' RNG files are there)")


def find_latest(save_dir: Path, warn, check=None) -> Path | None:
    """The experiment's newest checkpoint that passes its manifest check (and `check(step, train_state)`);
    `warn` is told about each one skipped. None when there is none; an error when there are some but every one
    fails (starting over would silently throw the run's progress away)."""
    skipped = []
    for run in experiment_runs(save_dir):
        if not run.is_dir():
            continue
        steps = sorted((p for p in run.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: -int(p.name))
        for step in steps:
            try:
                verify_checkpoint(step)
                state = read_train_state(step)
                if check is not None:
                    check(step, state)
                return step
            except AquilaError as e:
                warn(f"warning: skipping checkpoint {step}: {e}")
                skipped.append(step)
    if skipped:
        raise AquilaError(
            f"load_dir auto: all {len(skipped)} checkpoints of {save_dir} (and its experiment's earlier runs) fail"
            f" their check (see the warnings above; the newest is {skipped[0]}); refusing to start over from"
            " iteration 0; to start over anyway set load_dir: null (or --load_dir null)"
        )
    return None


def clean_partials(save_dir: str | os.PathLike) -> None:
    """Remove `.<step>.partial` directories left by a save that was killed."""
    save_dir = Path(save_dir)
    if save_dir.is_dir():
        for p in save_dir.glob(".*.partial"):
            shutil.rmtree(p, ignore_errors=True)


def prune_steps(save_dir: Path, keep: int, protect: set[int]) -> None:
    steps = sorted(int(p.name) for p in save_dir.iterdir() if p.is_dir() and p.name.isdigit())
    for step in steps[: max(0, len(steps) - keep)]:
        if step not in protect:
            shutil.rmtree(save_dir / str(step), ignore_errors=True)


# -- one run per save_dir ------------------------------------------------------------------------
@contextlib.contextmanager
def save_dir_lock(save_dir: str | os.PathLike | None, is_main: bool):
    """Hold an exclusive lock on `save_dir` for the run (rank 0; the OS releases it when the process dies): a
    second run on the same save_dir would interleave metrics.jsonl and race on `.<step>.partial`. The lock file
    is removed on exit, and save_dir too if this created it and left it empty."""
    if not save_dir or not is_main:
        yield
        return
    directory = Path(save_dir)
    if directory.exists() and not directory.is_dir():
        raise AquilaError(f"save_dir {directory}: exists and is not a directory")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AquilaError(f"save_dir {directory}: cannot create it ({e.strerror or e})") from None
    path = directory / LOCK_NAME
    fd = _take_lock(path, directory)
    try:
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode())
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it: a waiting opener sees the inode change and retries
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty


def _take_lock(path: Path, directory: Path) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AquilaError(
                f"save_dir {directory} is in use by another run ({holder}; lock {path}); two runs on one save_dir"
                " would mix their metrics.jsonl and checkpoints: wait for it, stop it, or choose another save_dir"
            ) from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            print(f" warning: save_dir {directory}: cannot lock {path} ({e.strerror}); nothing stops a second run"
                  " on it", flush=True)  # fmt: skip
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we opened it: take the new one


# -- saving ---------------------------------------------------------------------------------------
@dataclass
class Saver:
    """Everything a checkpoint needs besides the live model, optimizer and counters."""

    cfg: TrainConfig  # save_dir, save_optim, save_rng, num_checkpoints
    backend: Backend
    model_args: ModelArgs
    tokenizer: Any | None  # has save_pretrained(dir)
    lora_config: dict | None = None  # set for LoRA runs: adapters only
    total_steps: int | None = None  # the run's last step, whose checkpoint always holds the full weights

    @property
    def save_dir(self) -> Path:
        return Path(self.cfg.save_dir)

    def writes_full(self, step: int) -> bool:
        """Whether checkpoint `step` holds the full weights file (else only the ranks' shards)."""
        if self.lora_config is not None or not _shards_model(self.backend):
            return True
        every = self.cfg.save_full_interval or self.cfg.save_interval
        return step % every == 0 or (self.total_steps is not None and step >= self.total_steps)

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], prune: bool = True
    ) -> Path:
        """Write checkpoint `step`; `prune` False keeps every older step (a NaN stop's weights may be bad)."""
        env = self.backend.env
        final = self.save_dir / str(step)
        tmp = self.save_dir / f".{step}.partial"
        sharded = not self.writes_full(step)
        full = None if sharded else self.backend.full_state_dict(model)
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        self._checked(final, tmp, functools.partial(self._write_files, full, sharded, tmp, model, optimizer, state))
        del full
        if env.is_main:
            self._checked(final, tmp, lambda: (_fsync_tree(tmp), write_manifest(tmp)))
        else:
            self._checked(final, tmp, lambda: None)
        if env.is_main:
            old = self.save_dir / f".{step}.old.partial"
            if final.exists():  # re-saving a step: move the old copy aside, swap, then delete it
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            best = state.get("best_iteration") or step
            if best != step and not (self.save_dir / str(best)).is_dir():
                best = step  # the best evaluation fell between checkpoints: "best" is the newest one then
            write_text_atomic(self.save_dir / TRACKER, f"{step}\t{best}\n")
            if prune:
                prune_steps(self.save_dir, self.cfg.num_checkpoints, protect={step, best})
        barrier()
        return final

    def _write_files(self, full, sharded: bool, tmp: Path, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        env = self.backend.env
        if self.cfg.save_optim and state["optimizer_state"]:  # collective first: DCP reports a failure to every rank
            with _part("the optimizer state"):
                self.backend.save_optimizer(model, optimizer, tmp / OPTIM_DIR)
        if sharded:
            with _part("the weight shards"):
                save_model_shards(model, tmp / SHARDED_DIR)
        if env.is_main:
            self._write_model(full, tmp, sharded)
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if self.cfg.save_rng:
            (tmp / RNG_DIR).mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / RNG_DIR / f"rank{env.rank}.pt")

    def _checked(self, final: Path, tmp: Path, write) -> None:
        """Run this rank's part of a save; if any rank fails, remove the partial directory and stop every rank."""
        error = None
        try:
            write()
        except (Exception, CheckpointException) as e:  # ENOSPC: OSError, RuntimeError (torch.save) or DCP's
            error = e  # CheckpointException, a BaseException
        if not any_rank(error is not None, self.backend.env):
            return
        if self.backend.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        tracked = read_tracker(self.save_dir)
        kept = f"{self.save_dir / str(tracked[0])} is still the latest checkpoint" if tracked else "no checkpoint kept"
        if error is None:
            raise AquilaError(f"cannot write checkpoint {final}: another rank failed (see its log); {kept}")
        free = shutil.disk_usage(self.save_dir).free
        need = self.model_args.num_params() * 4 * (3 if self.cfg.save_optim else 1)  # fp32 weights once (+ Adam)
        raise AquilaError(
            f"cannot write checkpoint {final}: {_describe(error)[:200]}; it needs about {need} bytes and {free} are free"
            f" on {self.save_dir}; {kept}"
        ) from None

    def _write_model(self, full: dict[str, torch.Tensor] | None, directory: Path, sharded: bool) -> None:
        self.model_args.save(directory / CONFIG_NAME)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if sharded:
            return
        if self.lora_config is not None:
            from aquila.train.lora import adapter_state, write_adapter

            write_adapter(adapter_state(full), self.lora_config, directory)
        else:
            save_weights(full, directory, (self.cfg.save_full_format,))


def _shards_model(backend: Backend) -> bool:
    """BMTrain's blocks gather their own shards and are not DTensors: its checkpoints always hold the full file."""
    return type(backend).__name__ != "BMTrainBackend"


def save_model_shards(model: nn.Module, path: Path) -> None:
    """The model's weights as a torch.distributed.checkpoint (collective): FSDP2 ranks write their own shards and
    replicated (DDP) weights are split between the ranks, so each tensor is written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with warnings.catch_warnings():  # single process: DCP warns that it saves without a process group
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.save(get_model_state_dict(model), checkpoint_id=str(path))


def _describe(error: BaseException) -> str:
    """The error's own line; for DCP's CheckpointException (a traceback per rank), the first rank's error."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (inner, _) = next(iter(sorted(error.failures.items(), key=lambda item: item[0])))
        return f"{_describe(inner)} (rank {rank}, in {getattr(error, 'aquila_part', 'a distributed checkpoint')})"
    part = f" (in {error.aquila_part})" if hasattr(error, "aquila_part") else ""
    return (str(error) or type(error).__name__) + part


@contextlib.contextmanager
def _part(name: str):
    """Name the part of a save a CheckpointException comes from (DCP writes both the optimizer and weight shards)."""
    try:
        yield
    except (Exception, CheckpointException) as e:
        e.aquila_part = name
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def load_rng(ckpt: Path, env: DistEnv, saved_world: int) -> bool:
    """Restore this rank's RNG states; False (nothing restored) when the rank count changed."""
    path = ckpt / RNG_DIR / f"rank{env.rank}.pt"
    if saved_world != env.world_size:
        return False
    if not path.is_file():
        why = "lost or deleted: the other ranks' files are there" if path.parent.is_dir() else "save_rng was off"
        raise AquilaError(f"{ckpt}: load_rng is set but {RNG_DIR}/{path.name} is missing ({why})")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:
        raise AquilaError(f"{path}: cannot read RNG state ({type(e).__name__})") from None
    set_rng_state(state)
    return True
