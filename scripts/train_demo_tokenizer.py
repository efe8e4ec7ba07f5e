"""Train the demo tokenizer: 16,000 base entries (+8 specials = 16,008, the `aquila-tiny` preset's vocab_size).

    python scripts/build_demo_corpus.py            # -> /tmp/aquila_demo_corpus (deterministic)
    python scripts/train_demo_tokenizer.py         # -> examples/aquila/demo_tokenizer/

Builds the corpus first if --corpus has no train.jsonl. Training is deterministic for a given corpus.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_demo_corpus  # noqa: E402

from aquila.errors import AquilaError  # noqa: E402
from aquila.tokenizer.train import estimate_documents, iter_corpus, train_bpe  # noqa: E402

DEMO_VOCAB = 16000
DEFAULT_OUT = ROOT / "examples" / "aquila" / "demo_tokenizer"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=build_demo_corpus.DEFAULT_OUT, help="demo corpus directory")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT, help=f"tokenizer directory (default {DEFAULT_OUT})")
    parser.add_argument("--vocab-size", type=int, default=DEMO_VOCAB)
    args = parser.parse_args(argv)
    try:
        if not (args.corpus / "train.jsonl").is_file():
            build_demo_corpus.build(args.corpus)
        start = time.perf_counter()
        files = [args.corpus / "train.jsonl"]
        tok = train_bpe(iter_corpus(files), args.vocab_size, show_progress=True, length=estimate_documents(files))
        seconds = time.perf_counter() - start
        if tok.base_size != args.vocab_size:
            raise AquilaError(f"corpus too small: got {tok.base_size} base entries, wanted {args.vocab_size}")
        tok.save_pretrained(args.output)
    except AquilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (args.corpus / "train.jsonl").stat().st_size
    print(f"trained in {seconds:.1f} s ({size / 1e6:.1f} MB of jsonl); wrote {args.output}: {len(tok)} ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
