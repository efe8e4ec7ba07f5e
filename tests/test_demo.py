"""The main job's pieces (examples/aquila/run_demo.sh): decoded text without special tokens, the demo data."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from aquila.inference.text import TextAssembler
from aquila.tokenizer import Tokenizer
from tests.test_launcher import EXAMPLES
from tests.test_launcher_train import REPO, real_env, tiny_yaml

DEMO_TOKENIZER = EXAMPLES / "demo_tokenizer"
SFT_EPOCHS = 40


def test_generated_text_never_shows_special_tokens():
    tok = Tokenizer.from_pretrained(DEMO_TOKENIZER)
    # A briefly trained model emits BOS mid-text: in packed pretraining rows [CLS] follows every </s>.
    ids = [*tok.encode("北京是中国的"), tok.token_start_id, *tok.encode(" capital")]
    asm = TextAssembler(tok)
    text = "".join(asm.push([i]) for i in ids) + asm.finish()
    assert text == "北京是中国的 capital"


@pytest.mark.slow
def test_demo_pipeline_pretrain_sft_chat_plot(tmp_path):
    """run_demo.sh on a tiny budget: 2 pretraining steps, then SFT on two demo questions until the greedy chat
    gives their trained answers; the report shows one loss summary, no special tokens, and the plots' paths."""
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    chat = [json.loads(line) for line in (EXAMPLES / "data" / "demo_chat.jsonl").read_text().splitlines()]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(chat[i], ensure_ascii=False) + "\n" for i in (1, 2)))
    data = str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document")
    pre = tiny_yaml(tmp_path, "Aquila-pretrain-tiny.yaml", data_prefix=data, max_steps=2, save_interval=2)
    sft = yaml.safe_load((EXAMPLES / "Aquila-sft-tiny.yaml").read_text())
    sft.update(enable_sft_dataset_dir=str(tmp_path), enable_sft_dataset_file="two.jsonl", epochs=SFT_EPOCHS)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    env = real_env()
    env.update(AQUILA_DEMO_HOME=str(tmp_path), AQUILA_DEMO_PRETRAIN_YAML=pre, AQUILA_DEMO_SFT_YAML="sft.yaml")
    r = subprocess.run(["bash", str(EXAMPLES / "run_demo.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.stdout.split("== 3/4", 1)[1]
    summary = r"first -> last iteration: pretraining: [\d.]+ -> [\d.]+ \(2 iterations\) +SFT: [\d.]+ -> [\d.]+ \("
    assert re.search(summary, r.stdout) and r.stdout.count("first -> last") == 1, r.stdout
    assert "2/2 answers are exactly the trained ones" in report, report
    assert not any(token in report for token in ("[CLS]", "</s>", "<|endoftext|>", "[SEP]", "[PAD]", "[UNK]"))
    plots = re.findall(r"^wrote (.*metrics\.png)$", r.stdout, re.M)
    assert len(plots) == 2 and all(Path(p).is_file() for p in plots)
