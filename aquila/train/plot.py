"""`aquila plot RUN_DIR [--out PNG]`: loss (train and validation) and learning rate from RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError, run_command
from aquila.optional import require


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise AquilaError(f"{path}: not found (a training save_dir holds metrics.jsonl)")
    train, valid = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise AquilaError(f"{path}:{lineno}: not valid JSON") from None
        (valid if rec.get("kind") == "valid" else train).append(rec)
    if not train:
        raise AquilaError(f"{path}: no training records yet")
    return train, valid


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    matplotlib = require("matplotlib", "aquila plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, valid = read_metrics(run_dir)
    out = Path(out) if out else (run_dir if run_dir.is_dir() else run_dir.parent) / "metrics.png"
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if valid:
        ax_loss.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aquila plot", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run_dir", help="a training save_dir (with metrics.jsonl) or the metrics.jsonl file")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        print(f"wrote {plot(args.run_dir, args.out)}")
        return 0

    return run_command(go)


if __name__ == "__main__":
    sys.exit(main())
