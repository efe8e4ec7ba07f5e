"""The card's seven benchmarks, each read from local files in its usual public format into `Subset`s.

Every task lives in `<data-dir>/<task>/` (layouts in docs/evaluation.md). A subset is what gets its own score and
few-shot pool: an MMLU subject, a CLUE or RAFT sub-task, or the whole of BoolQ/TruthfulQA/IMDB.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aquila.errors import AquilaError
from aquila.evaluation.readers import field as get_field
from aquila.evaluation.readers import first_existing, read_csv_dicts, read_csv_rows, read_json_records
from aquila.io_utils import read_json

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    """One question: `query` is the prompt text right up to the answer, `choices` the candidate continuations."""

    query: str
    choices: tuple[str, ...]
    gold: int
    where: str  # "file:line", for messages and the results file

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


@dataclass
class Subset:
    task: str
    name: str
    header: str  # instruction printed once before the shots
    items: list[Item]  # what is scored
    pool: list[Item]  # few-shot examples; when `leave_one_out`, the scored items themselves
    pool_source: str
    em_mode: str  # "letter": EM on the first generated token; "label": EM on the first generated line
    leave_one_out: bool = False
    notes: list[str] = field(default_factory=list)


def _letter_query(question: str, options: list[str], prefix: str = "", answer_cue: str = "Answer:") -> str:
    lines = [f"{prefix}{question}", *(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))]
    return "\n".join(lines) + f"\n{answer_cue}"


def _leave_one_out_or(pool_path: Path | None, read: Callable[[Path], list[Item]], items: list[Item]):
    if pool_path is None:
        return items, "leave-one-out", True
    return read(pool_path), str(pool_path), False


# --- MMLU and MMLU Chinese -------------------------------------------------------------------------------------
def _subject_files(task_dir: Path) -> dict[str, dict[str, Path]]:
    """{subject: {"dev": path, "test": path}} from `<subject>_dev.csv`/`<subject>_test.csv` (Hendrycks' MMLU) or
    `dev/<subject>.csv`/`test/<subject>.csv` (CMMLU), anywhere under `task_dir`. Other csv files are ignored."""
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(task_dir.rglob("*.csv")):
        split = next((s for s in ("test", "dev") if path.stem.endswith(f"_{s}")), None)
        if split:
            subject = path.stem[: -len(split) - 1]
        elif path.parent.name in ("test", "dev"):
            split, subject = path.parent.name, path.stem
        else:
            continue
        if split in files.setdefault(subject, {}):
            raise AquilaError(f"{path}: second {split} file for subject {subject!r} ({files[subject][split]})")
        files[subject][split] = path
    if not any("test" in f for f in files.values()):
        raise AquilaError(f"{task_dir}: no test files (expected <subject>_test.csv or test/<subject>.csv)")
    return files


def _mc_csv_rows(path: Path) -> list[tuple[str, list[str]]]:
    """(where, [question, A, B, C, D, answer]) from a header-less MMLU csv or a CMMLU/C-Eval csv with a header."""
    rows = read_csv_rows(path)
    first = [f.strip().lower() for f in rows[0][1]]
    columns = ["question", "a", "b", "c", "d", "answer"]
    if all(c in first for c in columns):
        required = ["Question", "A", "B", "C", "D", "Answer"]
        return [(where, [rec[c] for c in required]) for where, rec in read_csv_dicts(path, required)]
    out = []
    for line, fields in rows:
        if len(fields) != 6:
            raise AquilaError(
                f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer letter), got {len(fields)}"
            )
        out.append((f"{path}:{line}", fields))
    return out


def _mc_items(path: Path, chinese: bool) -> list[Item]:
    items = []
    for where, (question, *options, answer) in _mc_csv_rows(path):
        letter = answer.strip().upper()
        if len(letter) != 1 or letter not in LETTERS[: len(options)]:
            raise AquilaError(f"{where}: answer {answer!r} is not one of {', '.join(LETTERS[: len(options)])}")
        if chinese:
            query, choices = _letter_query(question, options, "题目：", "答案是："), tuple(LETTERS[:4])
        else:
            query, choices = _letter_query(question, options), tuple(f" {c}" for c in LETTERS[:4])
        items.append(Item(query, choices, LETTERS.index(letter), where))
    return items


def _load_mmlu(task: str, task_dir: Path, seed: int, chinese: bool) -> list[Subset]:
    subsets = []
    for subject, files in sorted(_subject_files(task_dir).items()):
        if "test" not in files:
            continue
        name = subject.replace("_", " ")
        if chinese:
            header = f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"
        else:
            header = f"The following are multiple choice questions (with answers) about {name}.\n\n"
        items = _mc_items(files["test"], chinese)
        pool, source, loo = _leave_one_out_or(files.get("dev"), lambda p: _mc_items(p, chinese), items)
        subsets.append(Subset(task, subject, header, items, pool, source, "letter", loo))
    return subsets


# --- BoolQ -----------------------------------------------------------------------------------------------------
def _boolq_items(path: Path) -> list[Item]:
    items = []
    for where, rec in read_json_records(path):
        question = get_field(where, rec, "question").strip()
        passage = get_field(where, rec, "passage").strip()
        answer = get_field(where, rec, "answer", "label", kind=(bool, int))
        if answer not in (0, 1):
            raise AquilaError(f"{where}: answer should be true/false (or 1/0), got {answer!r}")
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        query = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
        items.append(Item(query, (" No", " Yes"), int(answer), where))
    return items


def _load_boolq(task: str, task_dir: Path, seed: int) -> list[Subset]:
    path = _require(task_dir, ("dev.jsonl", "val.jsonl", "test.jsonl"))
    items = _boolq_items(path)
    pool, source, loo = _leave_one_out_or(first_existing(task_dir, ("train.jsonl",)), _boolq_items, items)
    return [Subset(task, "boolq", "", items, pool, source, "label", loo)]


# --- TruthfulQA (multiple choice, mc1) -------------------------------------------------------------------------
def _mc1_targets(where: str, rec: dict) -> tuple[list[str], int]:
    targets = get_field(where, rec, "mc1_targets", kind=dict)
    if "choices" in targets and "labels" in targets:  # the Hugging Face datasets layout
        choices, labels = list(targets["choices"]), list(targets["labels"])
    else:  # the TruthfulQA repository's mc_task.json: {choice text: 0/1}
        choices, labels = list(targets), list(targets.values())
    if len(choices) != len(labels) or not 2 <= len(choices) <= len(LETTERS):
        raise AquilaError(f"{where}: mc1_targets should have 2 to {len(LETTERS)} choices with one label each")
    if sorted(labels) != [0] * (len(labels) - 1) + [1]:
        raise AquilaError(f"{where}: mc1_targets should mark exactly one choice 1 and the others 0, got {labels}")
    return [str(c) for c in choices], labels.index(1)


def _truthfulqa_items(path: Path, seed: int) -> list[Item]:
    items = []
    for i, (where, rec) in enumerate(read_json_records(path)):
        question = get_field(where, rec, "question").strip()
        choices, gold = _mc1_targets(where, rec)
        # The released file lists the true answer first: shuffle the letters, fixed per (seed, item).
        order = list(range(len(choices)))
        random.Random(f"{seed}/truthfulqa/{i}").shuffle(order)
        options = [choices[j] for j in order]
        query = _letter_query(question, options, "Question: ")
        items.append(Item(query, tuple(f" {c}" for c in LETTERS[: len(options)]), order.index(gold), where))
    return items


def _load_truthfulqa(task: str, task_dir: Path, seed: int) -> list[Subset]:
    path = _require(task_dir, ("mc_task.json", "mc_task.jsonl", "validation.jsonl", "test.jsonl"))
    items = _truthfulqa_items(path, seed)
    pool_path = first_existing(task_dir, ("dev.json", "dev.jsonl", "train.jsonl"))
    pool, source, loo = _leave_one_out_or(pool_path, lambda p: _truthfulqa_items(p, seed + 1), items)
    return [Subset(task, "mc1", "", items, pool, source, "letter", loo)]


# --- IMDB ------------------------------------------------------------------------------------------------------
IMDB_LABELS = {"0": 0, "1": 1, "neg": 0, "pos": 1, "negative": 0, "positive": 1}


def _imdb_items(path: Path) -> list[Item]:
    if path.suffix == ".csv":
        records = read_csv_dicts(path, ["text", "label"])
    else:
        records = read_json_records(path)
    items = []
    for where, rec in records:
        text = get_field(where, rec, "text").strip()
        raw = get_field(where, rec, "label", kind=(str, int))
        label = IMDB_LABELS.get(str(raw).strip().lower())
        if label is None or isinstance(raw, bool):
            raise AquilaError(f"{where}: label {raw!r} is not one of 0, 1, neg, pos, negative, positive")
        items.append(Item(f"Passage: {text}\nSentiment:", (" Negative", " Positive"), label, where))
    return items


def _load_imdb(task: str, task_dir: Path, seed: int) -> list[Subset]:
    path = _require(task_dir, ("test.csv", "test.jsonl"))
    items = _imdb_items(path)
    pool, source, loo = _leave_one_out_or(first_existing(task_dir, ("train.csv", "train.jsonl")), _imdb_items, items)
    return [Subset(task, "imdb", "", items, pool, source, "label", loo)]


# --- RAFT ------------------------------------------------------------------------------------------------------
def _raft_items(path: Path, labels: list[str], text_fields: list[str] | None) -> list[Item]:
    records = read_csv_dicts(path, ["Label", *(text_fields or [])])
    items = []
    for where, rec in records:
        raw = rec["Label"].strip()
        if raw.isdigit():
            if not 1 <= int(raw) <= len(labels):
                hint = " (0 is RAFT's 'Unlabeled': put labelled rows in test.csv)" if raw == "0" else ""
                raise AquilaError(f"{where}: Label {raw} is outside 1..{len(labels)}{hint}")
            gold = int(raw) - 1
        elif raw in labels:
            gold = labels.index(raw)
        else:
            raise AquilaError(f"{where}: Label {raw!r} is neither a number 1..{len(labels)} nor one of {labels}")
        names = text_fields or [c for c in rec if c.lower() not in ("id", "label")]
        query = "".join(f"{n}: {rec[n].strip()}\n" for n in names) + "Label:"
        items.append(Item(query, tuple(f" {name}" for name in labels), gold, where))
    return items


def _load_raft(task: str, task_dir: Path, seed: int) -> list[Subset]:
    subsets = []
    dirs = sorted(d for d in task_dir.iterdir() if d.is_dir())
    if not dirs:
        raise AquilaError(f"{task_dir}: no sub-task directories (expected <subtask>/labels.json and train.csv)")
    for sub in dirs:
        spec_path = sub / "labels.json"
        spec = read_json(spec_path)
        labels = spec.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels):
            raise AquilaError(f"{spec_path}: 'labels' should be a list of at least two non-empty label names")
        text_fields = spec.get("text_fields")
        if text_fields is not None and (
            not isinstance(text_fields, list) or not all(isinstance(x, str) for x in text_fields)
        ):
            raise AquilaError(f"{spec_path}: 'text_fields' should be a list of column names")
        header = str(spec.get("instructions", "")).strip()
        test, train = sub / "test.csv", _require(sub, ("train.csv",))
        if test.is_file():
            items = _raft_items(test, labels, text_fields)
            pool, source, loo = _raft_items(train, labels, text_fields), str(train), False
        else:
            items = _raft_items(train, labels, text_fields)
            pool, source, loo = items, "leave-one-out", True
        subsets.append(Subset(task, sub.name, f"{header}\n\n" if header else "", items, pool, source, "label", loo))
    return subsets


# --- CLUE ------------------------------------------------------------------------------------------------------
TNEWS_NAMES = {
    "news_story": "故事", "news_culture": "文化", "news_entertainment": "娱乐", "news_sports": "体育",
    "news_finance": "财经", "news_house": "房产", "news_car": "汽车", "news_edu": "教育", "news_tech": "科技",
    "news_military": "军事", "news_travel": "旅游", "news_world": "国际", "news_stock": "股票",
    "news_agriculture": "农业", "news_game": "电竞",
}  # fmt: skip
CLUE_HEADERS = {
    "tnews": "请判断新闻标题的类别。\n\n",
    "iflytek": "请判断应用描述所属的类别。\n\n",
    "afqmc": "请判断两个句子的意思是否相同。\n\n",
}


def _clue_label_names(sub: Path, kind: str, files: list[Path]) -> dict[str, str]:
    """label id -> label name, from labels.json (one JSON object a line) or else from the data files."""
    names: dict[str, str] = {}
    labels_path = sub / "labels.json"
    sources = [labels_path] if labels_path.is_file() else files
    for path in sources:
        for where, rec in read_json_records(path):
            if "label_desc" in rec or "label_des" in rec:
                label = str(get_field(where, rec, "label", kind=(str, int)))
                desc = get_field(where, rec, "label_desc", "label_des")
                names.setdefault(label, TNEWS_NAMES.get(desc, desc) if kind == "tnews" else desc)
    if not names:
        raise AquilaError(f"{sub}: no label names (expected labels.json or 'label_desc' fields)")
    return dict(sorted(names.items(), key=lambda kv: (len(kv[0]), kv[0])))


def _clue_items(path: Path, kind: str, names: dict[str, str]) -> list[Item]:
    items = []
    for where, rec in read_json_records(path):
        label = str(get_field(where, rec, "label", kind=(str, int)))
        if kind == "afqmc":
            s1, s2 = get_field(where, rec, "sentence1").strip(), get_field(where, rec, "sentence2").strip()
            query = f"句子一：{s1}\n句子二：{s2}\n问：这两个句子的意思相同吗？\n答："
            choices = ("否", "是")
            if label not in ("0", "1"):
                raise AquilaError(f"{where}: label {label!r} should be 0 or 1")
            gold = int(label)
        else:
            sentence = get_field(where, rec, "sentence").strip()
            query = f"{'新闻标题' if kind == 'tnews' else '应用描述'}：{sentence}\n类别："
            choices = tuple(names.values())
            if label not in names:
                raise AquilaError(f"{where}: label {label!r} is not in the label set ({len(names)} labels)")
            gold = list(names).index(label)
        items.append(Item(query, choices, gold, where))
    return items


def _load_clue(task: str, task_dir: Path, seed: int) -> list[Subset]:
    subsets = []
    dirs = sorted(d for d in task_dir.iterdir() if d.is_dir())
    if not dirs:
        raise AquilaError(f"{task_dir}: no CLUE task directories (expected {', '.join(CLUE_HEADERS)})")
    for sub in dirs:
        kind = sub.name.lower().removesuffix("_public")
        if kind not in CLUE_HEADERS:
            raise AquilaError(f"{sub}: unknown CLUE task {sub.name!r} (known: {', '.join(CLUE_HEADERS)})")
        dev = _require(sub, ("dev.json", "dev.jsonl"))
        train = first_existing(sub, ("train.json", "train.jsonl"))
        names = {} if kind == "afqmc" else _clue_label_names(sub, kind, [p for p in (train, dev) if p])
        items = _clue_items(dev, kind, names)
        pool, source, loo = _leave_one_out_or(train, lambda p, k=kind, n=names: _clue_items(p, k, n), items)
        subsets.append(Subset(task, kind, CLUE_HEADERS[kind], items, pool, source, "label", loo))
    return subsets


# --- a local multiple-choice jsonl (not on the card) -----------------------------------------------------------
def _choice_items(path: Path) -> list[Item]:
    """{"question", "choices": [...], "answer": index} a line: the usual local lm-evaluation-harness task."""
    items = []
    for where, rec in read_json_records(path):
        question = get_field(where, rec, "question").strip()
        choices = get_field(where, rec, "choices", kind=list)
        answer = get_field(where, rec, "answer", kind=int)
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise AquilaError(f"{where}: choices should be a list of at least 2 non-empty strings")
        if isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise AquilaError(f"{where}: answer should be the index of the right choice (0-{len(choices) - 1})")
        items.append(Item(f"Question: {question}\nAnswer:", tuple(f" {c.strip()}" for c in choices), answer, where))
    return items


def _load_choice(task: str, task_dir: Path, seed: int) -> list[Subset]:
    path = _require(task_dir, ("test.jsonl", "validation.jsonl"))
    items = _choice_items(path)
    pool, source, loo = _leave_one_out_or(first_existing(task_dir, ("train.jsonl", "dev.jsonl")), _choice_items, items)
    return [Subset(task, path.stem, "", items, pool, source, "label", loo)]


# --- registry --------------------------------------------------------------------------------------------------
def _require(directory: Path, names: tuple[str, ...]) -> Path:
    path = first_existing(directory, names)
    if path is None:
        raise AquilaError(f"{directory}: none of {', '.join(names)} found")
    return path


Loader = Callable[[str, Path, int], list[Subset]]
# task -> (card column, loader, how subsets are averaged into the task's score)
TASKS: dict[str, tuple[str, Loader, str]] = {
    "mmlu_zh": ("MMLU_Chinese_EM", lambda t, d, s: _load_mmlu(t, d, s, chinese=True), "micro"),
    "clue": ("CLUE-EM", _load_clue, "macro"),
    "mmlu": ("MMLU-EM", lambda t, d, s: _load_mmlu(t, d, s, chinese=False), "micro"),
    "boolq": ("BoolQ-EM", _load_boolq, "micro"),
    "truthfulqa": ("TruthfulQA-EM", _load_truthfulqa, "micro"),
    "imdb": ("IMDB-EM", _load_imdb, "micro"),
    "raft": ("RAFT-EM", _load_raft, "macro"),
}
CARD_COLUMNS: list[tuple[str, str]] = [(column, task) for task, (column, _, _) in TASKS.items()]
# Tasks beyond the card (not in the default --tasks, no column in the table; their scores are in --output)
LOCAL_TASKS: dict[str, tuple[str, Loader, str]] = {"multiple_choice": ("-", _load_choice, "micro")}
ALL_TASKS = {**TASKS, **LOCAL_TASKS}


def check_task_names(names: list[str]) -> None:
    for name in names:
        if name not in ALL_TASKS:
            raise AquilaError(f"unknown task {name!r}; known tasks: {', '.join(ALL_TASKS)}")


def load_task(name: str, data_dir: str | Path, seed: int = 0) -> list[Subset]:
    """All subsets of task `name` from `<data_dir>/<name>/`."""
    check_task_names([name])
    task_dir = Path(data_dir) / name
    if not task_dir.is_dir():
        raise AquilaError(f"{task_dir}: task directory not found (see docs/evaluation.md for the layout)")
    return ALL_TASKS[name][1](name, task_dir, seed)
