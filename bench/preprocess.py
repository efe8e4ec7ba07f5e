"""Data pipeline benchmark: `aquila preprocess` throughput and random-access sample rates.

    python bench/preprocess.py [--corpus /tmp/aquila_demo_corpus] [--mb 4] [--update-readme]

Preprocessing: MB/s and docs/s of `preprocess()` with 1 and 2 workers on a few MB of the bilingual demo corpus
(zh news, en news, Python code), against a reference run in the same process: the plain FlagAI-style loop
(json.loads, encode_plus, add_document per line, single process). Reading: random sequences/s from
MMapIndexedDataset (reference: seek + np.fromfile per sequence) and random samples/s from the GPT dataset
(seq_length 1024). Builds the demo corpus first if it is missing. --update-readme rewrites the
`## Preprocessing` section of bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cores as n_cores  # noqa: E402  (bench/ is on sys.path when run as a script)
from machine import cpu_name, load_average  # noqa: E402  (bench/ is on sys.path when run as a script)

from aquila.data.gpt_dataset import build_pretrain_datasets  # noqa: E402
from aquila.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype  # noqa: E402
from aquila.data.preprocess import preprocess  # noqa: E402
from aquila.io_utils import write_text_atomic  # noqa: E402
from aquila.tokenizer import Tokenizer  # noqa: E402

TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
NOTE = (
    "The tokenizer bounds preprocessing (its `encode_batch` ran at about 2 MB/s on one idle core here); workers "
    "split chunks across processes, so throughput scales with free cores. On this shared 2-core machine, busy with "
    "other jobs during the run, the second worker found no free core. Output bytes are identical for any worker count."
)


def machine() -> str:
    model = cpu_name()
    cores = n_cores()
    load = f", {load_average()} at start (shared machine)"
    return f"{cores} cores, {model}; Python {platform.python_version()}, numpy {np.__version__}{load}"


def make_input(corpus: Path, dst: Path, mb: float) -> tuple[int, int]:
    """The first `mb` MB of the corpus's train.jsonl (its sources are interleaved, so any prefix is mixed)."""
    if not (corpus / "train.jsonl").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_demo_corpus.py"), "--output", str(corpus)], check=True
        )
    docs = nbytes = 0
    with open(corpus / "train.jsonl", "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            if nbytes + len(line) > mb * 1e6:
                break
            fout.write(line)
            docs, nbytes = docs + 1, nbytes + len(line)
    return docs, nbytes


def reference_preprocess(src: Path, prefix: str) -> None:
    tok = Tokenizer.from_pretrained(TOKENIZER)
    with MMapIndexedDatasetBuilder(prefix, best_dtype(len(tok))) as b:
        with open(src, encoding="utf-8") as f:
            for line in f:
                b.add_document(tok.encode_plus(json.loads(line)["text"])["input_ids"])


def timed(fn, *args, repeat: int = 1, **kwargs) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t)
    return best


def reference_reads(prefix: str, ds: MMapIndexedDataset, order: np.ndarray) -> None:
    with open(f"{prefix}.bin", "rb") as f:
        for i in order:
            f.seek(int(ds.pointers[i]))
            np.fromfile(f, dtype=ds.dtype, count=int(ds.sizes[i]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=Path("/tmp/aquila_demo_corpus"))
    p.add_argument("--mb", type=float, default=4.0, help="megabytes of jsonl to preprocess")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    where = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        docs, nbytes = make_input(args.corpus, src, args.mb)
        preprocess(src, TOKENIZER, f"{tmp}/warm", workers=1)  # warm the page cache and imports
        t_ref = timed(reference_preprocess, src, f"{tmp}/ref_text_document")
        results = [("reference: encode_plus loop, 1 process", t_ref)]
        for w in (1, 2):
            results.append(
                (f"aquila preprocess --workers {w}", timed(preprocess, src, TOKENIZER, f"{tmp}/w{w}", workers=w))
            )
        same = all(
            Path(f"{tmp}/ref_text_document.{e}").read_bytes() == Path(f"{tmp}/w2_text_document.{e}").read_bytes()
            for e in ("bin", "idx")
        )
        for label, secs in results:
            rows.append((label, f"{nbytes / secs / 1e6:.2f} MB/s", f"{docs / secs:,.0f} docs/s", f"{secs:.2f} s"))

        prefix = f"{tmp}/w2_text_document"
        ds = MMapIndexedDataset(prefix)
        rng = np.random.default_rng(0)
        order = rng.integers(0, len(ds), size=20000)
        t_ref = timed(reference_reads, prefix, ds, order, repeat=3)
        t_mmap = timed(lambda: [ds[int(i)] for i in order], repeat=3)
        tokens = int(ds.sizes[order].sum())
        rows.append(
            (
                "reference: seek + np.fromfile per sequence",
                f"{len(order) / t_ref:,.0f} seq/s",
                f"{tokens / t_ref / 1e6:.0f} M tok/s",
                "",
            )
        )
        rows.append(
            (
                "MMapIndexedDataset[i] (random)",
                f"{len(order) / t_mmap:,.0f} seq/s",
                f"{tokens / t_mmap / 1e6:.0f} M tok/s",
                "",
            )
        )
        t_build = time.perf_counter()
        train, _, _ = build_pretrain_datasets(prefix, "100", (20000, 0, 0), 1024, seed=1)
        t_build = time.perf_counter() - t_build
        picks = rng.integers(0, len(train), size=5000)
        t_gpt = timed(lambda: [train[int(i)] for i in picks], repeat=3)
        rows.append(
            (f"GPT dataset, seq_length 1024 (index build {t_build:.2f} s)", f"{len(picks) / t_gpt:,.0f} samples/s", f"{len(picks) * 1025 / t_gpt / 1e6:.0f} M tok/s", "")
        )  # fmt: skip

    header = f"Input: {nbytes / 1e6:.1f} MB jsonl, {docs} documents of the demo corpus; demo tokenizer; output identical to the reference: {same}."
    table = ["| run | throughput | | time |", "|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join([header, "", *table, "", f"Machine: {where}."])
    print(text)
    if args.update_readme:
        readme = ROOT / "bench" / "README.md"
        body = readme.read_text(encoding="utf-8")
        section = f"## Preprocessing\n\n`python bench/preprocess.py --update-readme`\n\n{text}\n\n{NOTE}\n\n"
        new, n = re.subn(r"## Preprocessing\n.*?(?=\n## |\Z)", section.rstrip("\n") + "\n", body, flags=re.S)
        if n != 1:
            print("bench/README.md has no '## Preprocessing' section", file=sys.stderr)
            return 2
        write_text_atomic(readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
