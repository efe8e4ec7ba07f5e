"""The main job's pieces (examples/aquila/run_demo.sh): decoded text without special tokens, the demo data."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from aquila.data.indexed_dataset import MMapIndexedDataset
from aquila.errors import AquilaError
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
    summary = r"first -> last logged window: pretraining: [\d.]+ -> [\d.]+ \(2 iterations\) +SFT: [\d.]+ -> [\d.]+ \("
    assert re.search(summary, r.stdout) and r.stdout.count("first -> last") == 1, r.stdout
    assert "2/2 answers are exactly the trained ones" in report, report
    assert not any(token in report for token in ("[CLS]", "</s>", "<|endoftext|>", "[SEP]", "[PAD]", "[UNK]"))
    plots = re.findall(r"^wrote (.*metrics\.png)$", r.stdout, re.M)
    assert len(plots) == 2 and all(Path(p).is_file() for p in plots)


def load_report():
    spec = importlib.util.spec_from_file_location("demo_report", EXAMPLES / "demo_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_prompts_are_in_the_demo_data_and_questions_have_answers():
    report = load_report()
    tok = Tokenizer.from_pretrained(DEMO_TOKENIZER)
    data = MMapIndexedDataset(str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"))
    docs = [tok.decode(data[i], skip_special_tokens=True) for i in range(len(data))]
    assert all(report.corpus_continuation(docs, prompt, 20) for prompt in report.PROMPTS)
    pairs = report.trained_pairs(EXAMPLES / "data" / "demo_chat.jsonl")
    assert len(pairs) == 8 and ("What is the capital of France?", "The capital of France is Paris.") in pairs
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in q) for q, _ in pairs) == 4  # half of the questions Chinese


def test_report_loss_summary_is_the_trainers_done_line(tmp_path):
    report = load_report()
    with pytest.raises(AquilaError, match=r"x\.yaml\.log\.txt: not found"):
        report.first_last_loss(tmp_path, Path("x.yaml"))
    log = tmp_path / "x.yaml.log.txt"
    log.write_text(" iteration 500/ 500 | loss 1.1E+00\n")
    with pytest.raises(AquilaError, match="no 'done: "):
        report.first_last_loss(tmp_path, Path("x.yaml"))
    log.write_text(" done: 500 iterations (1-500) in 604.4s | first loss 9.7385 | last loss 0.3301\n")
    assert report.first_last_loss(tmp_path, Path("x.yaml")) == (9.7385, 0.3301, 500)


def test_demo_refuses_an_experiment_name_that_is_a_path(tmp_path):
    env = real_env() | {"AQUILA_DEMO_HOME": str(tmp_path), "AQUILA_DEMO_EXP": "../x"}
    (tmp_path / "checkpoints_out" / "keep").mkdir(parents=True)
    r = subprocess.run(["bash", str(EXAMPLES / "run_demo.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: AQUILA_DEMO_EXP '../x'") and r.stderr.count("\n") == 1
    assert (tmp_path / "checkpoints_out" / "keep").is_dir()
