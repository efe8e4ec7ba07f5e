"""Perplexity over an indexed dataset with a sliding window.

The dataset's sequences are read as one token stream (as pretraining reads them). Windows of `window` tokens
advance by `stride` tokens; each window scores only the tokens after the previous window's end, so every token
after the first is scored exactly once, with at least `window - stride` tokens of context carried over.
The default window is the length the model was trained at when its checkpoint records it (`seq_length` in
trainer_state.json), else its max_seq_len.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aquila.constants import IGNORE_INDEX
from aquila.errors import AquilaError
from aquila.model import AquilaModel


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    targets: int  # the last `targets` tokens of [begin, end) are scored (the very first token never is)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows ending at window, window+stride, ... (the last at n_tokens), each `window` long where the stream
    allows, scoring the tokens after the previous window's end."""
    if window < 2 or not 1 <= stride < window:
        raise AquilaError(
            f"need window >= 2 and 1 <= stride < window (each window keeps some context), got {window} and {stride}"
        )
    windows, prev_end = [], 0
    while prev_end < n_tokens:
        end = min(prev_end + stride if prev_end else window, n_tokens)
        windows.append(Window(max(0, end - window), end, end - prev_end))
        prev_end = end
    return windows


def read_stream(prefix: str | os.PathLike, max_tokens: int | None = None) -> np.ndarray:
    """The tokens of every sequence of `<prefix>.bin/.idx`, concatenated (at most `max_tokens`)."""
    from aquila.data.indexed_dataset import MMapIndexedDataset

    dataset = MMapIndexedDataset(prefix)
    parts, total = [], 0
    for i in range(len(dataset)):
        if max_tokens is not None and total >= max_tokens:
            break
        seq = np.asarray(dataset[i], dtype=np.int64)
        parts.append(seq)
        total += len(seq)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def default_window(model_dir: str | os.PathLike, max_seq_len: int) -> int:
    """The checkpoint's training `seq_length` (trainer_state.json) when it records one, else `max_seq_len`."""
    path = Path(model_dir) / "trainer_state.json"
    try:
        seq_length = json.loads(path.read_text(encoding="utf-8")).get("seq_length")
    except (OSError, ValueError, AttributeError):
        return max_seq_len
    if isinstance(seq_length, int) and not isinstance(seq_length, bool) and 2 <= seq_length <= max_seq_len:
        return seq_length
    return max_seq_len


class _PipedProgress:
    """A line on stderr every `every` windows when stderr is not a terminal (a log file, a pipe), where tqdm's
    bar would be silent: a long run must not look like a hang."""

    def __init__(self, total: int, every: int) -> None:
        self.total, self.every, self.done, self.t0 = total, every, 0, time.perf_counter()

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every > before // self.every or self.done == self.total:
            elapsed = time.perf_counter() - self.t0
            print(f"perplexity: {self.done}/{self.total} windows ({100 * self.done / self.total:.0f}%)"
                  f" in {elapsed:.0f}s", file=sys.stderr, flush=True)  # fmt: skip


@torch.no_grad()
def perplexity(
    model: AquilaModel,
    tokens: np.ndarray | list[int],
    window: int = 1024,
    stride: int = 512,
    batch_size: int = 1,
    progress: bool = False,
    progress_every: int | None = None,
) -> dict[str, float]:
    """{'perplexity', 'nll' (mean per token), 'tokens' (scored)} from the model's own loss over sliding windows.

    With `progress`, a bar of windows done on stderr when it is a terminal, else a line every `progress_every`
    windows (default: every 5% of them, at most 100).
    """
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if len(tokens) < 2:
        raise AquilaError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    vocab = model.args.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise AquilaError(
            f"token ids must lie in 0..{vocab - 1} (the model's vocabulary), got up to {int(tokens.max())}"
        )
    if window > model.args.max_seq_len:
        raise AquilaError(f"window {window} exceeds the model's max_seq_len {model.args.max_seq_len}")
    device = model.device
    windows = sliding_windows(len(tokens), window, stride)
    nll, count = 0.0, 0
    bar = tqdm(
        total=len(windows), unit="window", desc="perplexity", disable=None if progress else True, file=sys.stderr
    )
    piped = None
    if progress and bar.disable:
        piped = _PipedProgress(len(windows), progress_every or min(100, max(1, math.ceil(len(windows) / 20))))
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        # Rows of one forward need one length: the last, shorter window goes on its own.
        for same in _same_length_runs(group):
            ids = torch.stack([tokens[w.begin : w.end] for w in same]).to(device)
            labels = ids.clone()
            for row, w in enumerate(same):
                labels[row, : w.end - w.begin - w.targets] = IGNORE_INDEX
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = model(ids, labels=labels)["loss"]
            nll += float(loss) * n
            count += n
            bar.update(len(same))
            if piped is not None:
                piped.update(len(same))
    bar.close()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def _same_length_runs(windows: list[Window]) -> list[list[Window]]:
    runs: list[list[Window]] = []
    for w in windows:
        if runs and runs[-1][0].end - runs[-1][0].begin == w.end - w.begin:
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs
