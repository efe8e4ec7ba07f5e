"""Each task format parses (the shipped examples and variants); bad files give one-line errors naming file:line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aquila.errors import AquilaError
from aquila.evaluation.prompts import fit_context, render, select_shots
from aquila.evaluation.tasks import LETTERS, TASKS, Item, Subset, load_task

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval_data"


@pytest.mark.parametrize("task", list(TASKS))
def test_every_shipped_task_parses(task):
    subsets = load_task(task, EXAMPLES, seed=0)
    assert subsets
    for subset in subsets:
        assert subset.items and subset.pool and subset.em_mode in ("letter", "label")
        for item in subset.items + subset.pool:
            assert 0 <= item.gold < len(item.choices) and all(c.strip() for c in item.choices)
            assert item.where.startswith(str(EXAMPLES / task))


def test_mmlu_items_and_header():
    (arith, geo) = load_task("mmlu", EXAMPLES)
    assert (arith.name, len(arith.items), len(arith.pool)) == ("elementary_arithmetic", 4, 5)
    assert arith.header.startswith("The following are multiple choice questions (with answers) about elementary")
    first = arith.items[0]
    assert first.query == "What is 15 - 6?\nA. 8\nB. 9\nC. 10\nD. 7\nAnswer:"
    assert (first.choices, first.gold, first.answer) == ((" A", " B", " C", " D"), 1, " B")
    assert first.where.endswith("elementary_arithmetic_test.csv:1")
    assert geo.items[1].where.endswith(":2") and geo.items[1].gold == 3  # a quoted field with a comma


def test_cmmlu_layout_with_header_row():
    (subset,) = load_task("mmlu_zh", EXAMPLES)
    assert subset.name == "daily_life" and [i.gold for i in subset.items] == [1, 3, 0]
    assert subset.items[0].query.startswith("题目：下雨天出门通常会带什么？\nA. 扇子")
    assert subset.items[0].query.endswith("答案是：") and subset.items[0].choices == ("A", "B", "C", "D")
    assert subset.items[0].where.endswith("daily_life.csv:2")


def test_boolq_imdb_raft_clue_labels():
    (boolq,) = load_task("boolq", EXAMPLES)
    assert [i.answer for i in boolq.items] == [" Yes", " No", " Yes"]
    assert "Question: Does water boil" in boolq.items[0].query
    (imdb,) = load_task("imdb", EXAMPLES)
    assert [i.answer for i in imdb.items] == [" Positive", " Negative", " Positive", " Negative"]
    (raft,) = load_task("raft", EXAMPLES)
    assert raft.header.startswith("Each message") and raft.items[0].query.startswith("Message: Please support")
    assert [i.answer for i in raft.items] == [" feature request", " bug report", " bug report"]
    clue = {s.name: s for s in load_task("clue", EXAMPLES)}
    assert clue["tnews"].items[0].choices == ("故事", "体育", "财经", "汽车")
    assert [i.answer for i in clue["tnews"].items] == ["体育", "汽车", "财经"]
    assert clue["iflytek"].items[0].answer == "地图导航"
    assert [i.answer for i in clue["afqmc"].items] == ["是", "否"]


def test_truthfulqa_choices_are_shuffled_with_the_seed_and_gold_follows_the_true_answer():
    (a,) = load_task("truthfulqa", EXAMPLES, seed=0)
    (b,) = load_task("truthfulqa", EXAMPLES, seed=0)
    assert [i.query for i in a.items] == [i.query for i in b.items]
    assert a.leave_one_out and a.pool is a.items
    golds = set()
    for seed in range(5):
        for item in load_task("truthfulqa", EXAMPLES, seed=seed)[0].items:
            line = f"\n{LETTERS[item.gold]}. "
            assert line in item.query
            true_text = item.query.split(line)[1].split("\n")[0]
            assert true_text.startswith(("It passes", "No,", "Blue, because air"))
            golds.add(item.gold)
    assert len(golds) > 1  # the released file lists the true answer first; the letters must not give it away


def test_truthfulqa_hugging_face_layout(tmp_path):
    rec = {"question": "Q?", "mc1_targets": {"choices": ["right", "wrong", "also wrong"], "labels": [1, 0, 0]}}
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "validation.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    (subset,) = load_task("truthfulqa", tmp_path)
    item = subset.items[0]
    assert f"{LETTERS[item.gold]}. right" in item.query and len(item.choices) == 3


def test_jsonl_imdb_and_superglue_boolq(tmp_path):
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "test.jsonl").write_text('{"text": "great", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "val.jsonl").write_text('{"question": "q", "passage": "p", "label": 0, "idx": 0}\n')
    assert [i.gold for i in load_task("imdb", tmp_path)[0].items] == [1, 0]
    (boolq,) = load_task("boolq", tmp_path)
    assert boolq.items[0].gold == 0 and boolq.leave_one_out


def test_few_shot_draws_are_seeded_and_never_the_item_itself():
    items = [Item(f"q{i}:", (" a", " b"), i % 2, f"f:{i}") for i in range(6)]
    subset = Subset("t", "s", "H\n\n", items, items, "leave-one-out", "label", leave_one_out=True)
    for i in range(6):
        shots = select_shots(subset, i, 5, seed=3)
        assert len(shots) == 5 and items[i] not in shots
        assert shots == select_shots(subset, i, 5, seed=3)
    assert any(select_shots(subset, i, 2, 3) != select_shots(subset, i, 2, 4) for i in range(6))
    dup = Subset("t", "s", "", items[:1], [Item("q0:", (" a", " b"), 1, "dev:1"), items[1]], "dev", "label")
    assert select_shots(dup, 0, 5, 0) == [items[1]]  # the same question in the dev split is skipped
    assert render(subset, items[0], [items[1]]) == "H\n\nq1: b\n\nq0:"
    dev = Subset("t", "s", "", items, [Item(f"d{i}:", (" a",), 0, f"dev:{i}") for i in range(8)], "dev", "label")
    assert all(select_shots(dev, i, 5, 7) == select_shots(dev, 0, 5, 7) for i in range(6))  # one prefix a subset
    shots = [select_shots(subset, i, 3, 3) for i in range(6)]  # leave-one-out: the same but for the item itself
    assert max(shots.count(s) for s in shots) == 3  # the 3 items outside the first 3 of the order


def test_fit_context_drops_shots_then_keeps_the_end():
    items = [Item(f"{i}" + "x" * 9 + ":", (" a",), 0, f"f:{i}") for i in range(4)]
    subset = Subset("t", "s", "", items, items, "loo", "label", leave_one_out=True)
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    shots = select_shots(subset, 0, 3, 0)
    ids, k, cut = fit_context(encode, 1, subset, 0, shots, budget=100)
    assert (k, cut, ids[0], len(ids)) == (3, False, 1, 1 + 3 * 15 + 11)
    ids, k, cut = fit_context(encode, 1, subset, 0, shots, budget=30)
    assert (k, cut, len(ids)) == (1, False, 1 + 15 + 11)
    ids, k, cut = fit_context(encode, 1, subset, 0, shots, budget=5)
    assert (k, cut, ids) == (0, True, [1, *encode("xxx:")])  # the question's last tokens, after BOS


def _copy(tmp_path: Path, task: str) -> Path:
    shutil.copytree(EXAMPLES / task, tmp_path / task)
    return tmp_path / task


def _error(tmp_path: Path, task: str) -> str:
    with pytest.raises(AquilaError) as info:
        load_task(task, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_csv_row_with_missing_columns(tmp_path):
    path = _copy(tmp_path, "mmlu") / "test" / "world_geography_test.csv"
    path.write_text(path.read_text() + "What is north of south?,A,B\n")
    assert _error(tmp_path, "mmlu") == f"{path}:4: expected 6 columns (question, A, B, C, D, answer letter), got 3"
    zh = _copy(tmp_path, "mmlu_zh") / "test" / "daily_life.csv"
    zh.write_text(zh.read_text() + "3,题目,甲,乙\n")
    assert _error(tmp_path, "mmlu_zh").startswith(f"{zh}:5: expected 7 columns")
    raft = _copy(tmp_path, "raft") / "support_tickets" / "test.csv"
    raft.write_text(raft.read_text() + '"only a message"\n')
    assert _error(tmp_path, "raft").startswith(f"{raft}:5: expected 3 columns")


def test_answer_letter_outside_the_options(tmp_path):
    path = _copy(tmp_path, "mmlu") / "dev" / "elementary_arithmetic_dev.csv"
    path.write_text(path.read_text().replace("27,24,21,30,A", "27,24,21,30,E"))
    assert _error(tmp_path, "mmlu") == f"{path}:2: answer 'E' is not one of A, B, C, D"


def test_empty_file(tmp_path):
    path = _copy(tmp_path, "boolq") / "dev.jsonl"
    path.write_text("\n")
    assert _error(tmp_path, "boolq") == f"{path}: empty file (no items)"
    csv_path = _copy(tmp_path, "imdb") / "test.csv"
    csv_path.write_text("text,label\n")
    assert _error(tmp_path, "imdb") == f"{csv_path}: empty file (a header but no items)"


def test_unknown_task_and_missing_directory(tmp_path):
    with pytest.raises(AquilaError, match=r"unknown task 'hellaswag'; known tasks: mmlu_zh, clue, mmlu"):
        load_task("hellaswag", tmp_path)
    with pytest.raises(AquilaError, match=r"boolq: task directory not found"):
        load_task("boolq", tmp_path)


@pytest.mark.parametrize(
    ("task", "file", "old", "new", "expected"),
    [
        ("boolq", "dev.jsonl", '"answer": true}', '"answer": "yes"}', "dev.jsonl:1: field 'answer' should be bool or int"),
        ("boolq", "dev.jsonl", '"passage"', '"text"', "dev.jsonl:1: missing field 'passage'"),
        ("boolq", "train.jsonl", "{", "[", "train.jsonl:1: not valid JSON"),
        ("truthfulqa", "mc_task.json", '"It wraps around your heart.": 0', '"It wraps around your heart.": 1',
         "mc_task.json: item 0: mc1_targets should mark exactly one choice 1"),
        ("imdb", "test.csv", ",pos", ",great", "test.csv:4: label 'great' is not one of 0, 1"),
        ("raft", "support_tickets/test.csv", ",12,1", ",12,0", "test.csv:4: Label 0 is outside 1..2 (0 is RAFT's"),
        ("raft", "support_tickets/test.csv", "bug report\n", "bug\n", "test.csv:3: Label 'bug' is neither"),
        ("clue", "tnews/dev.json", '"label": "107"', '"label": "999"', "dev.json:2: label '999' is not in the label set"),
        ("clue", "afqmc/dev.json", '"label": "0"', '"label": "2"', "dev.json:2: label '2' should be 0 or 1"),
    ],
)  # fmt: skip
def test_bad_fields_name_file_and_line(tmp_path, task, file, old, new, expected):
    path = _copy(tmp_path, task) / file
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    assert expected in _error(tmp_path, task)


def test_unknown_clue_task_directory(tmp_path):
    (_copy(tmp_path, "clue") / "wsc").mkdir()
    assert "unknown CLUE task 'wsc' (known: tnews, iflytek, afqmc)" in _error(tmp_path, "clue")


def test_line_numbers_count_quoted_newlines_and_only_real_line_ends(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    path = tmp_path / "mmlu" / "test" / "x_test.csv"
    path.write_text('"Two\nline question\u2028?",a,b,c,d,A\r\nq,a,b,c,d,B\nbad,a,b,c,d,Z\n', newline="")
    with pytest.raises(AquilaError, match=rf"^{path}:4: answer 'Z' is not one of A, B, C, D$"):
        load_task("mmlu", tmp_path)
    path.write_text('"Two\nline question\u2028?",a,b,c,d,A\r\nq,a,b,c,d,B\n', newline="")
    (subset,) = load_task("mmlu", tmp_path)
    assert [i.where.rsplit(":", 1)[1] for i in subset.items] == ["1", "3"]
    assert subset.items[0].query.startswith("Two\nline question\u2028?\nA. a")


def test_clue_labels_from_the_data_files_and_mmlu_without_dev(tmp_path):
    tnews = _copy(tmp_path, "clue") / "tnews"
    (tnews / "labels.json").unlink()
    shutil.rmtree(tmp_path / "clue" / "afqmc")
    shutil.rmtree(tmp_path / "clue" / "iflytek")
    (subset,) = load_task("clue", tmp_path)
    assert subset.items[0].choices == ("故事", "体育", "财经", "汽车")  # ordered by label id: 100, 103, 104, 107
    (_copy(tmp_path, "mmlu") / "dev" / "world_geography_dev.csv").unlink()
    geo = {s.name: s for s in load_task("mmlu", tmp_path)}["world_geography"]
    assert geo.leave_one_out and geo.pool is geo.items and geo.pool_source == "leave-one-out"
