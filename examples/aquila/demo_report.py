"""The main job's last step: one loss summary, then what each run learned, all greedy (temperature 0).

usage: python demo_report.py PRETRAIN_YAML PRETRAIN_RUN SFT_YAML SFT_RUN    (paths in the YAMLs: from the cwd)

- pretraining: continuations of sentence beginnings from its data, beside what the data says next;
- SFT: the answer to each single-turn question it was trained on, beside the trained answer.
A model this small memorises what it saw many times; it does not generalise (see README, Quick start).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from aquila import AutoLoader, Predictor
from aquila.chat_template import normalize_messages
from aquila.data.indexed_dataset import MMapIndexedDataset
from aquila.data.sft import record_to_conversation
from aquila.errors import AquilaError
from aquila.io_utils import read_yaml

# Sentence beginnings from the demo data (scripts/build_demo_dataset.py): People's Daily, BBC News, bisect.py.
PROMPTS = ["环顾全球，", "同胞们、朋友们、", "Jobs growth still", "def bisect_right("]
CONTINUATION_CHARS = 40
DONE_LINE = re.compile(r"done: (\d+) iterations .*\| first loss ([\d.]+) \| last loss ([\d.]+)")


def first_last_loss(run: Path, config: Path) -> tuple[float, float, int]:
    """(first loss, last loss: logged window means; iterations) from the trainer's closing 'done:' line in the run's log."""
    log = run / f"{config.name}.log.txt"
    if not log.is_file():
        raise AquilaError(f"{log}: not found (the launcher writes the run's log there)")
    found = DONE_LINE.findall(log.read_text(encoding="utf-8", errors="replace"))
    if not found:
        raise AquilaError(f"{log}: no 'done: ... first loss ... last loss' line (did the run finish?)")
    iterations, first, last = found[-1]
    return float(first), float(last), int(iterations)


def latest_step(run: Path) -> str:
    path = run / "latest_iteration.txt"
    if not path.is_file():
        raise AquilaError(f"{path}: not found (the run saved no checkpoint)")
    return path.read_text().split()[0]


def load_predictor(run: Path) -> Predictor:
    loader = AutoLoader("lm", model_dir=str(run), model_name=latest_step(run))
    model = loader.get_model()
    model.eval()
    return Predictor(model, loader.get_tokenizer())


def corpus_continuation(documents: list[str], prompt: str, chars: int) -> str | None:
    """What the demo corpus says after `prompt` (its first occurrence), or None if it never occurs."""
    for doc in documents:
        at = doc.find(prompt)
        if at >= 0:
            return doc[at + len(prompt) : at + len(prompt) + chars]
    return None


def trained_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, trained answer) of every single-turn conversation in an SFT file."""
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            messages, _ = record_to_conversation(json.loads(line), where)
        except json.JSONDecodeError:
            raise AquilaError(f"{where}: not valid JSON") from None
        _, turns = normalize_messages(messages, where)
        if len(turns) == 2:
            pairs.append((turns[0]["content"], turns[1]["content"]))
    return pairs


def shown(text: str) -> str:
    return text.replace("\n", "⏎")


def yaml_value(path: Path, key: str) -> str:
    value = read_yaml(path).get(key)
    if not isinstance(value, str) or not value:
        raise AquilaError(f"{path}: {key} must be set to a path (the demo reads it)")
    return value


def report(pretrain_yaml: Path, pretrain_run: Path, sft_yaml: Path, sft_run: Path) -> None:
    pre, sft = first_last_loss(pretrain_run, pretrain_yaml), first_last_loss(sft_run, sft_yaml)
    print(f"   loss, first -> last logged window: pretraining: {pre[0]:.2f} -> {pre[1]:.2f} ({pre[2]} iterations)"
          f"    SFT: {sft[0]:.2f} -> {sft[1]:.2f} ({sft[2]} iterations)")  # fmt: skip

    predictor = load_predictor(pretrain_run)
    data = MMapIndexedDataset(yaml_value(pretrain_yaml, "data_prefix"))
    documents = [predictor.tokenizer.decode(data[i], skip_special_tokens=True) for i in range(len(data))]
    print(f"\n== pretraining: greedy continuations ({pretrain_run / latest_step(pretrain_run)})")
    with torch.no_grad():
        for prompt in PROMPTS:
            text = predictor.predict_generate_randomsample(prompt, out_max_length=24, temperature=0)
            corpus = corpus_continuation(documents, prompt, CONTINUATION_CHARS)
            print(f"   prompt: {prompt}\n   model:  {shown(text)}\n   corpus: {shown(corpus or '(not in the data)')}")

    predictor = load_predictor(sft_run)
    sft_dir = read_yaml(sft_yaml).get("enable_sft_dataset_dir") or "."
    pairs = trained_pairs(Path(sft_dir) / yaml_value(sft_yaml, "enable_sft_dataset_file"))
    print(f"\n== chat: greedy answers of the SFT model ({sft_run / latest_step(sft_run)})")
    same = 0
    with torch.no_grad():
        for question, trained in pairs:
            answer = predictor.predict_chat(question, temperature=0, out_max_length=48)
            same += answer == trained
            print(f"   Q: {shown(question)}\n   A: {shown(answer)}")
            if answer != trained:
                print(f"      (trained answer: {shown(trained)})")
    print(f"   {same}/{len(pairs)} answers are exactly the trained ones")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        report(*map(Path, argv))
    except AquilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
