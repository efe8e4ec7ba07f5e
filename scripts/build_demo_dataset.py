"""Build the demo pretraining data `examples/indexed_dataset/data/demo_text_document.{bin,idx}`.

The main job (`make demo`) has about two minutes of 2-core pretraining: ~250k tokens for an 11M-parameter model.
Spread over the whole demo corpus that teaches little more than frequent characters and punctuation, so the demo
data is a small fixed slice of it, about 3k tokens, which the model sees ~80 times and visibly learns:
  zh   the first People's Daily documents of 1 January 1998 (the New Year speeches), 4 paragraphs each;
  en   the first BBC News business articles that are plain ASCII (others carry mis-decoded pound signs);
  code the running Python's `bisect.py`.
Documents are tokenized by `aquila preprocess` with the demo tokenizer (examples/aquila/demo_tokenizer) and wrapped
[BOS] ... [EOS] like FlagAI's; the ids are demo-tokenizer ids (FlagAI shipped GPT-2 ids here by mistake).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_demo_corpus  # noqa: E402

from aquila.data.indexed_dataset import MMapIndexedDataset  # noqa: E402
from aquila.errors import AquilaError  # noqa: E402
from aquila.io_utils import atomic_path  # noqa: E402

DEFAULT_OUTPUT = ROOT / "examples" / "indexed_dataset" / "data" / "demo"
TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
ZH_DOCS = 4
EN_DOCS = 3
CODE_MODULES = ("bisect.py",)


def demo_documents() -> list[str]:
    """The demo slice: zh, en and code documents interleaved, so every part of the data is bilingual."""
    zh = [d for _, d in zip(range(ZH_DOCS), build_demo_corpus.zh_documents())]
    en = [d for d in build_demo_corpus.en_documents() if d.isascii()][:EN_DOCS]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = []
    for name in CODE_MODULES:
        if not (stdlib / name).is_file():
            raise AquilaError(f"{stdlib / name}: standard-library module not found")
        code.append((stdlib / name).read_text(encoding="utf-8"))
    docs: list[str] = []
    for i in range(max(len(zh), len(en), len(code))):
        docs += [part[i] for part in (zh, en, code) if i < len(part)]
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-prefix", type=Path, default=DEFAULT_OUTPUT, help="writes <prefix>_text_document.*")
    args = p.parse_args(argv)
    try:
        docs = demo_documents()
    except AquilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "demo.jsonl"
        with atomic_path(sample) as path, open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        print(f"demo slice: {len(docs)} documents, {sum(map(len, docs)):,} characters")
        cmd = [sys.executable, "-m", "aquila", "preprocess", "--input", str(sample), "--json-keys", "text"]
        cmd += ["--tokenizer", str(TOKENIZER), "--output-prefix", str(args.output_prefix)]
        cmd += ["--workers", "1", "--dtype", "uint16", "--quiet"]
        if subprocess.run(cmd, cwd=ROOT).returncode:
            return 2
    ds = MMapIndexedDataset(f"{args.output_prefix}_text_document")
    print(f"{ds.prefix}: {len(ds)} documents, {ds.num_tokens:,} tokens ({ds.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
