"""SFT conversations: read FlagAI / ShareGPT / OpenAI-messages / Alpaca records, tokenize, mask, collate, pack.

Record formats, detected per line (jsonl) or per element (a .json file holding a list):
- FlagAI `convo_samples.jsonl` / ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}],
  "instruction": optional str}
- OpenAI style: {"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}
- Alpaca: {"instruction": ..., "input": optional, "output": ...} -> user = instruction (+ "\\n\\n" + input)

Each conversation is rendered with `aquila.chat_template` (the same text the model sees at inference),
tokenized in one pass with offsets, and wrapped as [BOS] + ids + [EOS]. Labels are -100 except on tokens
inside an assistant answer span and on the final EOS. Span rule: a token belongs to the span that holds its
first character (offsets as the tokenizer reports them), so a token straddling a span boundary is labelled
iff it starts inside the answer: exactly the tokens the model must generate after the prompt.
With `train_on_prompt=True` the system header and the `### Assistant:` markers are labelled too, as FlagAI
did (human turns stay masked). Trailing user turns after the last answer are dropped; a conversation with
no answer is an error. Conversations longer than `max_length` are truncated from the end; any that keep no
labelled token are skipped (counted in `SFTDataset.skipped`) since they would give a NaN loss.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from aquila.chat_template import DEFAULT_SYSTEM, render_segments
from aquila.constants import IGNORE_INDEX
from aquila.errors import AquilaError

log = logging.getLogger(__name__)


def record_to_conversation(obj: object, where: str) -> tuple[list[dict], str | None]:
    """(messages, instruction) of one record in any supported format (a bare list is a list of messages)."""
    if isinstance(obj, list):
        return obj, None
    if not isinstance(obj, dict):
        raise AquilaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        instruction = obj.get("instruction") or None
        if instruction is not None and not isinstance(instruction, str):
            raise AquilaError(f"{where}: 'instruction' must be a string")
        return obj["conversations"], instruction
    if "messages" in obj:
        return obj["messages"], None
    if "instruction" in obj and "output" in obj:
        user = obj["instruction"]
        extra = obj.get("input") or ""
        if not isinstance(user, str) or not isinstance(extra, str):
            raise AquilaError(f"{where}: Alpaca 'instruction' and 'input' must be strings")
        if extra.strip():
            user = f"{user.strip()}\n\n{extra.strip()}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}], None
    keys = ", ".join(map(repr, list(obj)[:8]))
    raise AquilaError(
        f"{where}: unrecognised record (keys {keys}); expected 'conversations', 'messages' or Alpaca 'instruction'+'output'"
    )


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """(location, parsed object) for each record of a .jsonl file, or of a .json file holding a list."""
    p = Path(path)
    if not p.is_file():
        raise AquilaError(f"{p}: SFT data file not found")
    with open(p, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if p.suffix == ".json" and head.startswith("["):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise AquilaError(f"{p}: not valid JSON ({e})") from None
        for i, obj in enumerate(data):
            yield f"{p}: record {i}", obj
        return
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise AquilaError(f"{p}:{lineno}: not valid JSON ({str(e).splitlines()[0][:80]})") from None
            yield f"{p}:{lineno}", obj


def tokenize_conversation(
    tokenizer,
    messages: Sequence[dict],
    instruction: str | None = None,
    system: str | None = DEFAULT_SYSTEM,
    train_on_prompt: bool = False,
    where: str = "conversation",
) -> dict[str, list[int]]:
    """{"input_ids": [BOS] + ids + [EOS], "labels": same with -100 outside the trained spans}."""
    msgs = list(messages)
    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict) and _is_assistant(m)), default=None)
    if last is None:
        # normalise first so unknown roles / empty turns are reported before "no answer"
        render_segments(msgs, instruction, system, where)
        raise AquilaError(f"{where}: conversation has no assistant turn to train on")
    text, segments = render_segments(msgs[: last + 1], instruction, system, where)
    trained = {"answer"} | ({"header", "assistant_marker"} if train_on_prompt else set())
    spans = [(s.start, s.end) for s in segments if s.kind in trained]
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([o[0] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    ids_arr = np.asarray(ids, dtype=np.int64)
    labels = np.where(mask, ids_arr, IGNORE_INDEX)
    bos, eos = tokenizer.token_start_id, tokenizer.token_end_id
    return {"input_ids": [bos, *ids_arr.tolist(), eos], "labels": [IGNORE_INDEX, *labels.tolist(), eos]}


def _is_assistant(m: dict) -> bool:
    role = m.get("role", m.get("from"))
    return isinstance(role, str) and role.lower() in ("assistant", "gpt", "chatgpt")


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized conversations: items {"input_ids": list[int], "labels": list[int]} of at most max_length."""

    def __init__(
        self,
        path_or_records: str | os.PathLike | Iterable[dict],
        tokenizer,
        max_length: int = 2048,
        train_on_prompt: bool = False,
        system: str | None = DEFAULT_SYSTEM,
    ) -> None:
        if max_length < 2:
            raise AquilaError(f"max_length must be >= 2, got {max_length}")
        if isinstance(path_or_records, (str, os.PathLike)):
            records: Iterable[tuple[str, object]] = read_records(path_or_records)
            self.source = os.fspath(path_or_records)
        else:
            records = ((f"record {i}", r) for i, r in enumerate(path_or_records))
            self.source = "records"
        self.max_length = max_length
        self.items: list[dict[str, list[int]]] = []
        self.skipped = 0
        self.truncated = 0
        for where, obj in records:
            messages, instruction = record_to_conversation(obj, where)
            item = tokenize_conversation(tokenizer, messages, instruction, system, train_on_prompt, where)
            if len(item["input_ids"]) > max_length:
                self.truncated += 1
                item = {k: v[:max_length] for k, v in item.items()}
            if all(x == IGNORE_INDEX for x in item["labels"]):
                self.skipped += 1
                continue
            self.items.append(item)
        if not self.items:
            raise AquilaError(f"{self.source}: no conversations to train on")
        if self.skipped or self.truncated:
            log.warning(
                "%s: %d conversations truncated to %d tokens, %d skipped (no answer token left)",
                self.source,
                self.truncated,
                max_length,
                self.skipped,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        item = self.items[idx]
        return {"input_ids": list(item["input_ids"]), "labels": list(item["labels"])}


def sft_collate(
    batch: Sequence[dict[str, Sequence[int]]], pad_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item (rounded up to `pad_to_multiple_of`): input pad `pad_id`, labels -100.

    Returns LongTensors input_ids, labels and attention_mask (1 on real tokens)."""
    if not batch:
        raise AquilaError("sft_collate: empty batch")
    longest = max(len(b["input_ids"]) for b in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(batch)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        if len(b["labels"]) != k:
            raise AquilaError(f"sft_collate: item {i} has {k} input_ids but {len(b['labels'])} labels")
        input_ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(b["labels"], dtype=torch.long)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def pack_sft(items: Iterable[dict[str, Sequence[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate consecutive conversations into sequences of at most `max_length` tokens.

    Next-fit: an item joins the current pack if it fits, else starts a new one (order is kept; items longer
    than max_length are truncated). Labels keep their masks; each conversation still starts with BOS, whose
    label is -100, so no loss crosses from one conversation into the next. Attention is NOT reset between
    packed conversations (like Megatron's pretraining samples): a later conversation can attend to earlier ones.
    """
    packs: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for item in items:
        ids, labels = list(item["input_ids"])[:max_length], list(item["labels"])[:max_length]
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_length:
            packs.append(cur)
            cur = {"input_ids": [], "labels": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
    if cur["input_ids"]:
        packs.append(cur)
    return packs
