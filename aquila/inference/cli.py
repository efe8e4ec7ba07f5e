"""`aquila generate`: one prompt (or a file of prompts) -> generated text on stdout.

aquila generate --model-dir ./checkpoints_in --model-name aquila-7b --prompt "北京是" --temperature 0

Flags combine: `--chat` wraps every prompt (from `--prompt` or `--prompt-file`) in the chat template, with sampling
or `--beam-size`; `--stop` adds stop strings everywhere. `--stream` prints one prompt's text as it is generated, so
it needs `--prompt` and sampling (not `--prompt-file`, not `--beam-size`).
"""

from __future__ import annotations

import argparse
import sys

from aquila.chat_template import STOP_STRINGS
from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.inference.options import add_model_args, add_sampling_args, load_predictor
from aquila.inference.sampling import SamplingParams


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise AquilaError(f"{path}: cannot read prompts ({e})") from None
    if not prompts:
        raise AquilaError(f"{path}: no prompts")
    return prompts


def check_combination(args: argparse.Namespace) -> None:
    if args.stream and args.prompt_file:
        raise AquilaError("--stream prints one prompt as it is generated: use it with --prompt, not --prompt-file")
    if args.stream and args.beam_size:
        raise AquilaError("--stream cannot show a beam search, which picks its text at the end: drop one of them")
    if args.beam_size < 0:
        raise AquilaError(f"--beam-size must be >= 0 (0 = sample), got {args.beam_size}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aquila generate", description="generate text from a prompt", formatter_class=HelpFormatter
    )
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a UTF-8 file with one prompt per line (generated as one batch)")
    add_sampling_args(parser)
    parser.add_argument("--input-max-length", type=int, default=256, help="keep BOS + the last N-1 prompt tokens")
    parser.add_argument("--beam-size", type=int, default=0, help="beam search with this many beams (0 = sample)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated (--prompt only)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template (a user turn)")
    args = parser.parse_args(argv)
    check_combination(args)

    texts = read_prompts(args.prompt_file) if args.prompt_file else [args.prompt]
    predictor = load_predictor(args, rows=args.beam_size or len(texts))
    stop = (*STOP_STRINGS, *(args.stop or ())) if args.chat else tuple(args.stop or ())
    if args.chat:
        prompts = [predictor.encode_chat(t) for t in texts]
    else:
        prompts = [predictor.encode_prompt(t, args.input_max_length) for t in texts]
    if args.beam_size:
        outputs = [
            predictor.beam(ids, args.max_new_tokens, args.beam_size, stop=stop, strip=args.chat) for ids in prompts
        ]
    else:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        requests = [predictor.request(ids, args.max_new_tokens, params, args.seed, stop, args.chat) for ids in prompts]
        if args.stream:
            for piece in predictor.stream(requests[0]):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return 0
        outputs = [c.text for c in predictor.generate(requests)]
    for text in outputs:
        print(text.replace("\n", "\\n") if args.prompt_file else text)
    return 0
