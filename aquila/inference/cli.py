"""`aquila generate`: one prompt (or a file of prompts) -> generated text on stdout.

aquila generate --model-dir ./checkpoints_in --model-name aquila-7b --prompt "北京是" --temperature 0
"""

from __future__ import annotations

import argparse
import sys

from aquila.errors import AquilaError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate, chat and serve: where the model is and how to load it."""
    parser.add_argument("--model-dir", default="./checkpoints_in", help="directory holding model folders")
    parser.add_argument("--model-name", default="aquila-7b", help="folder name under --model-dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    parser.add_argument("--int8", action="store_true", help="int8 weight-only quantization at load time")
    parser.add_argument("--adapter-dir", default=None, help="LoRA adapter to merge at load time")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")


def add_sampling_args(parser: argparse.ArgumentParser, temperature: float = 1.0, top_p: float = 1.0) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=30, help="0 = no limit")
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def load_predictor(args: argparse.Namespace):
    from aquila.inference.loader import AutoLoader
    from aquila.inference.predictor import Predictor

    loader = AutoLoader(
        "lm",
        model_dir=args.model_dir,
        model_name=args.model_name,
        device=args.device,
        torch_dtype=args.dtype,
        adapter_dir=args.adapter_dir,
        quantize="int8" if args.int8 else None,
    )
    return Predictor(loader.get_model(), loader.get_tokenizer(), compile=args.compile)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        out_max_length=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aquila generate", description="generate text from a prompt")
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line (generated as one batch)")
    add_sampling_args(parser)
    parser.add_argument("--input-max-length", type=int, default=256, help="keep BOS + the last N-1 prompt tokens")
    parser.add_argument("--beam-size", type=int, default=0, help="beam search with this many beams (0 = sample)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    args = parser.parse_args(argv)

    predictor = load_predictor(args)
    kwargs = sampling_kwargs(args)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise AquilaError(f"{args.prompt_file}: cannot read prompts ({e})") from None
        if not prompts:
            raise AquilaError(f"{args.prompt_file}: no prompts")
        for text in predictor.predict_generate_batch(
            prompts, input_max_length=args.input_max_length, stop=args.stop, **kwargs
        ):
            print(text.replace("\n", "\\n"))
        return 0
    if args.beam_size:
        print(
            predictor.predict_generate_beamsearch(
                args.prompt, args.input_max_length, args.max_new_tokens, beam_size=args.beam_size
            )
        )
        return 0
    if args.chat:
        pieces = predictor.predict_chat_stream(args.prompt, **kwargs)
    else:
        pieces = predictor.predict_generate_stream(
            args.prompt, input_max_length=args.input_max_length, stop=args.stop, **kwargs
        )
    if args.stream:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print("".join(pieces))
    return 0
