import json
from pathlib import Path

import pytest
import torch

from aquila.chat_template import (
    ASSISTANT_HEADER,
    DEFAULT_SYSTEM,
    STOP_STRINGS,
    encode_prompt,
    render_answer,
    render_for_training,
    render_prompt,
)
from aquila.data.sft import IGNORE_INDEX, SFTDataset, pack_sft, sft_collate, tokenize_conversation
from aquila.errors import AquilaError
from aquila.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "aquila" / "demo_tokenizer"
CONVOS = ROOT / "examples" / "aquila" / "data" / "convo_samples.jsonl"

CONV = [
    {"role": "user", "content": "北京是哪个国家的首都？"},
    {"role": "assistant", "content": "北京是中国的首都。"},
    {"role": "user", "content": "And how big is it?"},
    {"role": "assistant", "content": "About 16,410 km², home to over 21 million people."},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(TOKENIZER)


def load_convos():
    out = []
    for line in CONVOS.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        msgs = [
            {"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]}
            for m in obj["conversations"]
        ]
        out.append((msgs, obj["instruction"] or None))
    return out


def test_template_text():
    text, spans = render_for_training(CONV, instruction="Be brief.")
    assert text == (
        f"{DEFAULT_SYSTEM}\n\n### System: Be brief.\n"
        "### Human: 北京是哪个国家的首都？\n### Assistant: 北京是中国的首都。\n"
        "### Human: And how big is it?\n### Assistant: About 16,410 km², home to over 21 million people.\n"
    )
    assert [text[a:b] for a, b in spans] == [
        " 北京是中国的首都。\n",
        " About 16,410 km², home to over 21 million people.\n",
    ]
    assert render_prompt(CONV[:1]).endswith("### Human: 北京是哪个国家的首都？\n### Assistant:")
    assert "### Human:" in STOP_STRINGS


def test_training_text_is_prompt_plus_answer_for_every_turn():
    for msgs, instruction in load_convos() + [(CONV, "Be brief.")]:
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            text, spans = render_for_training(msgs[: k + 1], instruction)
            prompt = render_prompt(msgs[:k], instruction)
            assert text == prompt + render_answer(m["content"])
            assert spans[-1] == (len(prompt), len(text))


def test_prompt_tokens_are_a_prefix_of_training_tokens(tok):
    for msgs, instruction in load_convos() + [(CONV, "Be brief.")]:
        item = tokenize_conversation(tok, msgs, instruction)
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                prompt_ids = encode_prompt(tok, msgs[:k], instruction)
                assert item["input_ids"][: len(prompt_ids)] == prompt_ids
                if k == len(msgs) - 1:  # the first answer token is the first labelled token after the prompt
                    assert item["labels"][len(prompt_ids)] != IGNORE_INDEX
                    assert all(x == IGNORE_INDEX for x in item["labels"][len(prompt_ids) - 2 : len(prompt_ids)])


def segment_pieces(msgs, instruction):
    """The template's pieces, built by hand: (text, trained?)."""
    pieces = [(f"{DEFAULT_SYSTEM}\n\n", False)]
    if instruction:
        pieces.append((f"### System: {instruction}\n", False))
    for m in msgs:
        if m["role"] == "user":
            pieces.append((f"### Human: {m['content']}\n", False))
        else:
            pieces += [("### Assistant:", False), (f" {m['content']}\n", True)]
    return pieces


def test_labels_masked_exactly_on_non_assistant_tokens(tok):
    item = tokenize_conversation(tok, CONV, "Be brief.")
    expected_ids, expected_labels = [tok.token_start_id], [IGNORE_INDEX]
    # Neighbouring prompt pieces are tokenized together (a "\n\n" run at a piece's end would tokenize
    # differently on its own); prompt/answer boundaries fall between pre-tokens, so pieces split there.
    merged: list[tuple[str, bool]] = []
    for text, trained in segment_pieces(CONV, "Be brief."):
        if merged and not trained and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        else:
            merged.append((text, trained))
    for text, trained in merged:
        ids = tok.encode(text)
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    expected_ids.append(tok.token_end_id)
    expected_labels.append(tok.token_end_id)
    assert item["input_ids"] == expected_ids
    for j, (got, want) in enumerate(zip(item["labels"], expected_labels)):
        assert got == want, f"token {j} ({tok.decode([item['input_ids'][j]])!r}): label {got}, expected {want}"
    assert len(item["labels"]) == len(expected_labels)
    trained = [i for i, x in zip(item["input_ids"], item["labels"]) if x != IGNORE_INDEX]
    assert tok.decode(trained[:-1]) == "".join(t for t, tr in segment_pieces(CONV, None) if tr)


def test_train_on_prompt_labels_header_but_not_user(tok):
    item = tokenize_conversation(tok, CONV[:2], instruction="Be brief.", train_on_prompt=True)
    ids, labels = item["input_ids"], item["labels"]
    trained = [i for i, x in zip(ids[1:-1], labels[1:-1]) if x != IGNORE_INDEX]
    masked = [i for i, x in zip(ids[1:-1], labels[1:-1]) if x == IGNORE_INDEX]
    header = f"{DEFAULT_SYSTEM}\n\n### System: Be brief.\n"
    assert tok.decode(trained) == header + ASSISTANT_HEADER + " 北京是中国的首都。\n"
    assert tok.decode(masked) == "### Human: 北京是哪个国家的首都？\n"
    assert labels[0] == IGNORE_INDEX and labels[-1] == tok.token_end_id


def test_formats_and_demo_file(tok, tmp_path):
    ds = SFTDataset(CONVOS, tok)
    assert len(ds) == len(CONVOS.read_text(encoding="utf-8").splitlines())
    lines = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
            "instruction": "",
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "hi", "input": "", "output": "hello"},
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
            ]
        },
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = SFTDataset(path, tok)
    assert ds[0] == ds[1] == ds[2]
    assert tok.decode(ds[3]["input_ids"][1:]).startswith("Be terse.\n\n### Human: hi")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"}]))
    item = SFTDataset(alpaca, tok)[0]
    assert "### Human: Add\n\n1 and 2\n" in tok.decode(item["input_ids"])
    assert SFTDataset(lines[:1], tok)[0] == ds[0]


@pytest.mark.parametrize(
    "record,match",
    [
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}, "empty turn"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "only come first",
        ),
        ({"text": "plain"}, "unrecognised record"),
    ],
)
def test_bad_records_name_file_and_line(tok, tmp_path, record, match):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(AquilaError, match=match) as e:
        SFTDataset(path, tok)
    assert f"{path}:2" in str(e.value) and "\n" not in str(e.value)


def test_bad_json_line(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [}\n')
    with pytest.raises(AquilaError, match=rf"{path}:1: not valid JSON"):
        SFTDataset(path, tok)
    with pytest.raises(AquilaError, match="not found"):
        SFTDataset(tmp_path / "missing.jsonl", tok)


def test_truncation_and_skipping(tok):
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ds = SFTDataset([CONV, long], tok, max_length=64)
    assert len(ds) == 1 and ds.skipped == 1
    assert len(ds[0]["input_ids"]) == 64 and ds.truncated == 2
    with pytest.raises(AquilaError, match="no conversations"):
        SFTDataset([long], tok, max_length=64)


def test_collate_pads_right():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = sft_collate(batch, pad_id=0, pad_to_multiple_of=4)
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape == (2, 4)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert sft_collate(batch)["input_ids"].shape == (2, 3)


def test_pack(tok):
    items = [tokenize_conversation(tok, m, i) for m, i in load_convos()]
    packs = pack_sft(items, 256)
    assert all(len(p["input_ids"]) <= 256 and len(p["labels"]) == len(p["input_ids"]) for p in packs)
    assert len(packs) < len(items)
    assert sum((p["input_ids"] for p in packs), []) == sum((it["input_ids"] for it in items), [])
    assert sum((p["labels"] for p in packs), []) == sum((it["labels"] for it in items), [])
