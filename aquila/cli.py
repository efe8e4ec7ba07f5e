"""`aquila <verb> ...`: each verb is a short entry point in its own module, imported only when used."""

from __future__ import annotations

import importlib
import sys

from aquila.errors import run_command

# verb -> (module, help). Each module has `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("aquila.info", "print a model's config and parameter count"),
    "convert": ("aquila.convert", "convert checkpoints between FlagAI, Hugging Face and GGUF (llama.cpp) formats"),
    "train-tokenizer": ("aquila.tokenizer.train", "train a byte-level BPE tokenizer"),
    "preprocess": ("aquila.data.preprocess", "tokenize jsonl into Megatron .bin/.idx"),
    "merge-datasets": ("aquila.data.merge", "merge several .bin/.idx prefixes into one"),
    "check-dataset": ("aquila.data.check", "validate a .bin/.idx prefix and print its counts"),
    "pretrain": ("aquila.train.pretrain", "pretrain from indexed datasets (YAML config)"),
    "sft": ("aquila.train.sft", "supervised fine-tuning on conversations (YAML config)"),
    "plot": ("aquila.train.plot", "plot loss and learning rate of a run to PNG"),
    "generate": ("aquila.inference.cli", "generate text from a prompt"),
    "chat": ("aquila.inference.chat", "interactive multi-turn chat"),
    "quantize": ("aquila.inference.quantize", "save an int8 weight-only quantized model"),
    "serve": ("aquila.serve.app", "HTTP server: OpenAI-compatible and FlagAI endpoints"),
    "eval": ("aquila.evaluation.cli", "the model card's benchmarks and perplexity"),
}


def _usage() -> str:
    lines = ["usage: aquila <command> [options]", "", "commands:"]
    lines += [f"  {verb:<16} {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        print(f"error: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Imported inside run_command: a verb whose optional extra is missing fails with one error line.
    return run_command(lambda: importlib.import_module(COMMANDS[verb][0]).main(rest))


if __name__ == "__main__":
    sys.exit(main())
