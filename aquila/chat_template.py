"""The one chat template, shared by SFT training and inference.

FlagAI rendered conversations one way for training and another at inference (reference §5.4 vs §7); here
both use the same text, so the tokens a model is trained to answer after are exactly the prompt it sees:

    {system}\\n\\n                                  (omitted when system is empty)
    ### System: {instruction}\\n                    (only with an instruction)
    ### Human: {user text}\\n
    ### Assistant: {assistant text}\\n
    ...
    ### Human: {user text}\\n
    ### Assistant:                                  <- render_prompt() ends here; the model answers

An assistant turn is rendered as `### Assistant:` followed by its *answer part* `" " + text + "\\n"`
(`render_answer`). Its character span in the text is an "assistant span": in training, tokens that
start inside one get labels. For a conversation whose last turn is the assistant's:

    render_for_training(messages)[0] == render_prompt(messages[:-1]) + render_answer(messages[-1]["content"])

Turn texts are stripped of surrounding whitespace (at training and inference alike). A model trained
this way ends an answer with "\\n" then EOS; `STOP_STRINGS` catch a model that goes on to write the
next turn's header instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from aquila.errors import AquilaError

DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
ASSISTANT_HEADER = "### Assistant:"
TURN_END = "\n"
STOP_STRINGS: tuple[str, ...] = ("### Human:", "### Assistant:", "### System:")

# Role spellings accepted on input -> canonical role (FlagAI/ShareGPT "from", OpenAI "role").
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text: kind is header, user, assistant_marker or answer."""

    kind: str
    start: int
    end: int


def normalize_messages(messages: Sequence[dict], where: str = "messages") -> tuple[str | None, list[dict]]:
    """Validate and convert messages to [{"role": "user"|"assistant", "content": str}].

    Accepts {"role", "content"} and FlagAI's {"from": "human"|"gpt", "value"}. A leading system message
    is returned separately (it replaces the default system prompt). `where` prefixes error messages.
    """
    if not isinstance(messages, (list, tuple)):
        raise AquilaError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    system = None
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise AquilaError(f"{where}: message {i} is {type(m).__name__}, expected an object")
        raw_role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise AquilaError(
                f"{where}: message {i} has unknown role {raw_role!r} (expected user/human, assistant/gpt or system)"
            )
        if not isinstance(content, str) or not content.strip():
            raise AquilaError(f"{where}: message {i} ({raw_role}) is an empty turn")
        if role == "system":
            if out or system is not None:
                raise AquilaError(f"{where}: message {i}: a system message may only come first")
            system = content.strip()
            continue
        out.append({"role": role, "content": content.strip()})
    return system, out


def render_answer(content: str) -> str:
    """The text that follows `### Assistant:` for an answer (what the model generates, end included)."""
    return " " + content.strip() + TURN_END


def render_segments(
    messages: Sequence[dict],
    instruction: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    where: str = "messages",
) -> tuple[str, list[Segment]]:
    """Render a conversation; also return its segments (header, user, assistant_marker, answer)."""
    override, msgs = normalize_messages(messages, where)
    system = override if override is not None else system
    parts: list[str] = []
    segments: list[Segment] = []
    pos = 0

    def add(kind: str, text: str) -> None:
        nonlocal pos
        parts.append(text)
        segments.append(Segment(kind, pos, pos + len(text)))
        pos += len(text)

    header = ""
    if system:
        header += system.strip() + "\n\n"
    if instruction and instruction.strip():
        header += f"### {ROLE_NAMES['system']}: {instruction.strip()}{TURN_END}"
    if header:
        add("header", header)
    for m in msgs:
        if m["role"] == "user":
            add("user", f"### {ROLE_NAMES['user']}: {m['content']}{TURN_END}")
        else:
            add("assistant_marker", ASSISTANT_HEADER)
            add("answer", render_answer(m["content"]))
    return "".join(parts), segments


def render_prompt(messages: Sequence[dict], instruction: str | None = None, system: str | None = DEFAULT_SYSTEM) -> str:
    """Text ready for the assistant's next answer: the conversation so far, then `### Assistant:`."""
    _, msgs = normalize_messages(messages)
    if not msgs or msgs[-1]["role"] != "user":
        raise AquilaError("render_prompt: the last message must be the user's")
    text, _ = render_segments(messages, instruction, system)
    return text + ASSISTANT_HEADER


def render_for_training(
    messages: Sequence[dict], instruction: str | None = None, system: str | None = DEFAULT_SYSTEM
) -> tuple[str, list[tuple[int, int]]]:
    """(text, [(start, end) character span of each assistant answer]) for SFT."""
    text, segments = render_segments(messages, instruction, system)
    return text, [(s.start, s.end) for s in segments if s.kind == "answer"]


def encode_prompt(
    tokenizer, messages: Sequence[dict], instruction: str | None = None, system: str | None = DEFAULT_SYSTEM
) -> list[int]:
    """[BOS] + tokens of `render_prompt(...)`: the ids a chat model trained by `aquila sft` expects."""
    return [tokenizer.token_start_id, *tokenizer.encode(render_prompt(messages, instruction, system))]


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Jinja string literal


def _jinja_roles(canonical: str) -> str:
    return "[" + ", ".join(_jinja_str(a) for a, r in ROLE_ALIASES.items() if r == canonical) + "]"


# `render_prompt` (add_generation_prompt=True) / `render_for_training` as a Jinja chat template, after the BOS that
# `encode_prompt` prepends: Hugging Face's `apply_chat_template` and llama.cpp (GGUF `tokenizer.chat_template`) give
# the ids aquila gives. A leading system message replaces DEFAULT_SYSTEM; the template errors where
# normalize_messages does (unknown role, empty turn, late system message, generation prompt after the assistant).
# Their tokenizers match special-token text inside messages ("</s>" -> EOS), as aquila's split_special_tokens=True.
JINJA_CHAT_TEMPLATE = (
    "{%- set system = " + _jinja_str(DEFAULT_SYSTEM) + " -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] | lower == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- if not system -%}{{- raise_exception('message 0 (system) is an empty turn') -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = m['role'] | lower -%}"
    "{%- set content = m['content'] | trim -%}"
    "{%- if not content -%}{{- raise_exception('message ' ~ (loop.index0 + (messages | length) - (turns | length)) ~ ' (' ~ m['role'] ~ ') is an empty turn') -}}"
    "{%- elif role in " + _jinja_roles("user") + " -%}"
    "{{- " + _jinja_str(f"### {ROLE_NAMES['user']}: ") + " + content + " + _jinja_str(TURN_END) + " -}}"
    "{%- elif role in " + _jinja_roles("assistant") + " -%}"
    "{{- " + _jinja_str(ASSISTANT_HEADER + " ") + " + content + " + _jinja_str(TURN_END) + " -}}"
    "{%- elif role == 'system' -%}{{- raise_exception('a system message may only come first') -}}"
    "{%- else -%}{{- raise_exception('unknown role ' ~ m['role'] ~ ' (expected user or assistant)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if not turns or turns[-1]['role'] | lower not in " + _jinja_roles("user") + " -%}"
    "{{- raise_exception('the last message must be the user\\'s') -}}"
    "{%- endif -%}"
    "{{- " + _jinja_str(ASSISTANT_HEADER) + " -}}"
    "{%- endif -%}"
)
