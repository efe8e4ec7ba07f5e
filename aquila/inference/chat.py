"""`aquila chat`: multi-turn chat on stdin/stdout with streamed answers.

Each input line is one user turn; the answer streams back and joins the history (the SFT template,
`aquila.chat_template`). Commands (`COMMANDS`): `/help` lists them, `/reset` clears the history, `/exit` (or end
of input) quits; any other line, even one starting with `/`, is a user turn. On a terminal a one-line banner
(stderr) names the model and the commands. Works with piped input (no banner, no prompt):
`printf 'hi\\nand then?\\n' | aquila chat --model-name aquilachat-7b`.
"""

from __future__ import annotations

import argparse
import sys

from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.inference.options import add_model_args, add_sampling_args, load_predictor, sampling_kwargs

COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation history",
    "/exit": "quit (so does end of input, Ctrl-D)",
}


def commands_help() -> str:
    return "\n".join(f"  {name:<8}{what}" for name, what in COMMANDS.items())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="aquila chat",
        description="interactive multi-turn chat: each line you type is one user turn",
        epilog="commands typed at the prompt:\n" + commands_help(),
        formatter_class=HelpFormatter,
    )
    add_model_args(parser)
    add_sampling_args(parser, temperature=0.8, top_p=0.95)
    parser.add_argument("--system", default=None, help="replace the default system prompt")
    parser.add_argument("--instruction", default=None, help="a '### System:' instruction line")
    parser.add_argument("--max-turns", type=int, default=20, help="history turns kept (oldest dropped first)")
    args = parser.parse_args(argv)
    if args.max_turns < 1:
        raise AquilaError(f"--max-turns must be >= 1, got {args.max_turns}")

    predictor = load_predictor(args)
    kwargs = sampling_kwargs(args)
    extra = {"instruction": args.instruction}
    if args.system is not None:
        extra["system"] = args.system
    interactive = sys.stdin.isatty()
    if interactive:
        name = f"{args.model_dir}/{args.model_name}"
        print(f"aquila chat: {name}; /help for commands, /reset clears the history, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/help":
            print(commands_help())
            continue
        if text == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        pieces = []
        try:
            for piece in predictor.predict_chat_stream(text, history=history, **extra, **kwargs):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except AquilaError as e:  # e.g. the conversation outgrew the model: say so and keep going
            print(f"error: {e}", file=sys.stderr)
            history.clear()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        answer = "".join(pieces)
        history += [{"role": "user", "content": text}]
        if answer.strip():
            history += [{"role": "assistant", "content": answer}]
        else:
            history.pop()  # an empty answer cannot be rendered as a turn
        history = history[-2 * args.max_turns :]
    return 0
