"""Command-line options shared by `aquila generate`, `aquila chat` and `aquila serve`, and loading the model."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Where the model is and how to load it."""
    parser.add_argument("--model-dir", default="./checkpoints_in", help="directory holding model folders")
    parser.add_argument("--model-name", default="aquila-7b", help="folder name under --model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="int8 weight-only quantization at load time")
    quant.add_argument(
        "--int4",
        action="store_true",
        help="int4 weight-only quantization at load time (CPU; groups of 64; `aquila quantize --bits 4` saves it)",
    )
    parser.add_argument("--adapter-dir", default=None, help="LoRA adapter to merge at load time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="keep plain nn.Linear weights. fp32 CPU weights are otherwise packed once at load: for aquila's "
        "AVX-512 kernel where it builds (any row count: it reads weights at memory speed), else for oneDNN where "
        "several rows decode together (serve with --max-batch > 1, generate with several prompts or beams), so a "
        "step of many rows reads each weight once. Never with --compile",
    )


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float = 1.0, top_p: float = 1.0) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=30, help="0 = no limit")
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def load_predictor(args: argparse.Namespace, rows: int = 1):
    """The Predictor for these flags; `rows` = how many sequences will decode together (see `should_pack`)."""
    from aquila.inference.loader import AutoLoader
    from aquila.inference.packing import pack_linears, should_pack
    from aquila.inference.predictor import Predictor

    loader = AutoLoader(
        "lm",
        model_dir=args.model_dir,
        model_name=args.model_name,
        device=args.device,
        torch_dtype=args.dtype,
        adapter_dir=args.adapter_dir,
        quantize="int8" if args.int8 else "int4" if getattr(args, "int4", False) else None,
    )
    model = loader.get_model()
    if not (args.compile or args.no_pack) and should_pack(model, rows):
        pack_linears(model)
    return Predictor(model, loader.get_tokenizer(), compile=args.compile)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The FlagAI-named keyword arguments of Predictor's predict_* methods."""
    return dict(
        out_max_length=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
