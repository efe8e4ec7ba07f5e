"""Build the demo pretraining data `examples/indexed_dataset/data/demo_text_document.{bin,idx}`.

Runs the demo corpus builder (scripts/build_demo_corpus.py), takes a deterministic subsample of its
train.jsonl (every --stride-th document, shuffled with a fixed seed, up to --max-chars characters: about 1-2 MB of uint16 tokens)
and tokenizes it with `aquila preprocess` and the demo tokenizer (examples/aquila/demo_tokenizer).
Documents are wrapped [BOS] ... [EOS] like FlagAI's; the ids are demo-tokenizer ids (FlagAI shipped
GPT-2 ids here by mistake).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aquila.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from aquila.io_utils import atomic_path  # noqa: E402

DEFAULT_CORPUS = Path("/tmp/aquila_demo_corpus")
DEFAULT_OUTPUT = ROOT / "examples" / "indexed_dataset" / "data" / "demo"
TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"


def subsample(src: Path, dst: Path, stride: int, max_chars: int, seed: int = 1234) -> tuple[int, int]:
    """Every `stride`-th document of `src`, in a seeded shuffled order, up to `max_chars` characters.

    The corpus interleaves zh/en/code only until its smaller sources run out, so without the shuffle the last
    documents (which become the valid split) would all be Chinese.
    """
    with open(src, encoding="utf-8") as fin:
        lines = list(itertools.islice(fin, 0, None, stride))
    random.Random(seed).shuffle(lines)
    docs = chars = 0
    with atomic_path(dst) as tmp, open(tmp, "w", encoding="utf-8") as fout:
        for line in lines:
            n = len(json.loads(line)["text"])
            if chars + n > max_chars:
                break
            fout.write(line)
            docs, chars = docs + 1, chars + n
    return docs, chars


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="demo corpus directory (built if missing)")
    p.add_argument("--output-prefix", type=Path, default=DEFAULT_OUTPUT, help="writes <prefix>_text_document.*")
    p.add_argument("--stride", type=int, default=5)
    p.add_argument("--max-chars", type=int, default=2_500_000)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.corpus / "train.jsonl").is_file():
        cmd = [sys.executable, str(ROOT / "scripts" / "build_demo_corpus.py"), "--output", str(args.corpus)]
        if subprocess.run(cmd).returncode:
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "demo.jsonl"
        docs, chars = subsample(args.corpus / "train.jsonl", sample, args.stride, args.max_chars)
        print(f"subsample: {docs} documents, {chars:,} characters")
        cmd = [sys.executable, "-m", "aquila", "preprocess", "--input", str(sample), "--json-keys", "text"]
        cmd += ["--tokenizer", str(TOKENIZER), "--output-prefix", str(args.output_prefix)]
        cmd += ["--workers", str(args.workers), "--dtype", "uint16", "--quiet"]
        if subprocess.run(cmd, cwd=ROOT).returncode:
            return 2
    ds = MMapIndexedDataset(f"{args.output_prefix}_text_document")
    print(f"{ds.prefix}: {len(ds)} documents, {ds.num_tokens:,} tokens ({ds.dtype}, {ds.num_tokens * 2 / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
