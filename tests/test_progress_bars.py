"""Long verbs (eval, eval --perplexity, preprocess, merge-datasets) show a tqdm bar on a terminal, none in a pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

from aquila.checkpoint import build_model, save_model_dir
from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder
from tests.conftest import tiny_args
from tests.test_eval_scoring import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
EVAL_DATA = ROOT / "examples" / "eval_data"
pytestmark = pytest.mark.slow  # each case starts a fresh interpreter that imports torch


def run_aquila(argv: list[str], terminal: bool) -> tuple[int, str]:
    """`python -m aquila ARGV` with stdout/stderr on a pseudo-terminal (terminal=True) or on pipes."""
    cmd = [sys.executable, "-m", "aquila", *argv]
    env = {**os.environ, "COLUMNS": "120"}
    if not terminal:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout + proc.stderr
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=child_fd, stdout=child_fd, stderr=child_fd)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bars")
    save_model_dir(build_model(tiny_args(max_seq_len=128), seed=0), d / "tiny", formats=("safetensors",))
    byte_tokenizer().save_pretrained(d / "tiny")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with MMapIndexedDatasetBuilder(d / name, dtype=np.uint16) as builder:
            for n in (300, 200):
                builder.add_document(rng.integers(0, 265, size=n))
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} 文本"}) + "\n" for i in range(50)))
    return d


def verbs(d: Path) -> dict[str, tuple[list[str], str]]:
    """verb -> (argv, the bar's label)."""
    model = ["--model-dir", str(d / "tiny"), "--device", "cpu"]
    return {
        "perplexity": (["eval", *model, "--perplexity", str(d / "a"), "--batch-size", "2"], "perplexity"),
        "eval": (["eval", *model, "--data-dir", str(EVAL_DATA), "--tasks", "boolq", "--limit", "3"], "eval"),
        "preprocess": (
            [
                "preprocess",
                "--input",
                str(d / "docs.jsonl"),
                "--tokenizer",
                str(DEMO_TOKENIZER),
                "--output-prefix",
                str(d / "pre"),
            ],
            "preprocess",
        ),  # fmt: skip
        "merge-datasets": (
            ["merge-datasets", "--prefixes", str(d / "a"), str(d / "b"), "--output-prefix", str(d / "ab")],
            "merge",
        ),  # fmt: skip
    }


@pytest.mark.parametrize("verb", ["perplexity", "eval", "preprocess", "merge-datasets"])
def test_bar_on_a_terminal_only(work, verb):
    argv, label = verbs(work)[verb]
    rc, shown = run_aquila(argv, terminal=True)
    assert rc == 0, shown
    assert f"{label}: 100%|" in shown, shown
    rc, piped = run_aquila(argv, terminal=False)
    assert rc == 0, piped
    assert "%|" not in piped, piped
