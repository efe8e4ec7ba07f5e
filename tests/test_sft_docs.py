"""docs/sft.md stays true: its example records are valid SFT data rendered by the one template, the keys and
commands it names exist, and the README's model-card section shows the chat call beside the plain one."""

from __future__ import annotations

import json
import re
from pathlib import Path

from aquila.chat_template import DEFAULT_SYSTEM, render_for_training
from aquila.data.sft import SFTDataset, record_to_conversation
from aquila.tokenizer import Tokenizer
from aquila.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "sft.md").read_text(encoding="utf-8")


def doc_records() -> list[dict]:
    (block,) = re.findall(r"```json\n(.*?)```", DOC, re.S)
    return [json.loads(line) for line in block.splitlines()]


def test_the_docs_example_records_are_valid_sft_data(tmp_path):
    records = doc_records()
    assert len(records) == 5
    path = tmp_path / "doc.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    data = SFTDataset(path, Tokenizer.from_pretrained(REPO / "examples" / "aquila" / "demo_tokenizer"), max_length=512)
    assert len(data) == 5 and data.skipped == 0
    # multi-turn: both answers trained; a leading system turn replaces the default system prompt
    messages, instruction = record_to_conversation(records[1], "doc")
    text, spans = render_for_training(messages, instruction)
    assert len(spans) == 2 and text.startswith(DEFAULT_SYSTEM)
    text, _ = render_for_training(*record_to_conversation(records[2], "doc"))
    assert text.startswith("You answer in one word.\n\n### Human: Capital of Italy?\n### Assistant: Rome.\n")


def test_the_docs_template_is_the_one_template():
    messages = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}]
    text, _ = render_for_training(messages, instruction="I")
    assert text == f"{DEFAULT_SYSTEM}\n\n### System: I\n### Human: U1\n### Assistant: A1\n"
    for line in ("### System: {instruction}\\n", "### Human: {user turn}\\n", "### Assistant: {answer}\\n"):
        assert line in DOC
    assert DEFAULT_SYSTEM.split(". ")[0] in DOC.replace("\n                                    ", " ")


def test_the_keys_and_commands_the_doc_names_exist():
    keys = set(re.findall(r"`([a-z_]+)(?:: [^`]*)?`", DOC))
    fields = set(TrainConfig.__dataclass_fields__)
    named = {
        k for k in keys if k.startswith(("enable_sft", "lora", "train_on", "sft_", "pre_load", "bmt_pre", "seq_len"))
    }
    assert named and named <= fields, named - fields
    for path in ("examples/aquila/Aquila-sft-tiny.yaml", "examples/aquila/Aquila-sft-lora.yaml", "docs/serving.md"):
        assert (REPO / path).exists() and Path(path).name in DOC
    assert "python -m aquila.train.lora" in DOC and "--adapter-dir" in DOC
    for verb in ("aquila generate", "aquila chat", "aquila serve", "predict_chat(", "predict_chat_stream("):
        assert verb in DOC, verb


def test_readme_shows_the_chat_call_beside_the_model_card_snippet():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    use = readme.split("## Use", 1)[1].split("\n## ", 1)[0]
    plain, chat = use.index("predict_generate_randomsample("), use.index("predictor.predict_chat(")
    assert plain < chat and "docs/sft.md" in use and "'\\n'" in use
