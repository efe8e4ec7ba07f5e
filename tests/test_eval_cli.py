"""`aquila eval` end to end on a tiny random model with the shipped example data, and its error exits."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main
from aquila.evaluation.tasks import CARD_COLUMNS, TASKS
from tests.conftest import tiny_args
from tests.test_eval_scoring import byte_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eval_data"


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_model_dir(build_model(tiny_args(max_seq_len=512), seed=0), root / "tiny", formats=("safetensors",))
    byte_tokenizer().save_pretrained(root / "tiny")
    return root


def test_eval_all_tasks_prints_the_card_table_and_writes_json(model_root, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "--model-dir", str(model_root), "--model-name", "tiny", "--data-dir", str(EXAMPLES)]
    argv += ["--tasks", ",".join(TASKS), "--shots", "1", "--limit", "2", "--batch-size", "3", "--output", str(out)]
    assert main(argv + ["--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| 名称/Name | " + " | ".join(c for c, _ in CARD_COLUMNS) + " |"
    assert lines[0].split(" | ")[1:] == [
        "MMLU_Chinese_EM",
        "CLUE-EM",
        "MMLU-EM",
        "BoolQ-EM",
        "TruthfulQA-EM",
        "IMDB-EM",
        "RAFT-EM |",
    ]
    em_row, acc_row = lines[2].split(" | "), lines[3].split(" | ")
    assert em_row[0] == "| tiny" and acc_row[0] == "| tiny (log-likelihood acc)"
    assert all(0.0 <= float(v.strip(" |")) <= 1.0 for v in em_row[1:] + acc_row[1:])
    report = json.loads(out.read_text())
    assert list(report["card"]) == [c for c, _ in CARD_COLUMNS]
    assert set(report["tasks"]) == set(TASKS) and report["shots"] == 1
    mmlu = report["tasks"]["mmlu"]
    assert mmlu["n"] == 4 and set(mmlu["subsets"]) == {"elementary_arithmetic", "world_geography"}
    assert mmlu["acc"] == pytest.approx(np.mean([s["acc"] for s in mmlu["subsets"].values()]))  # 2 + 2 items
    assert report["card"]["MMLU-EM"] == mmlu["em"] and report["loglik_acc"]["mmlu"] == mmlu["acc"]
    assert report["tasks"]["clue"]["aggregate"] == "macro" and len(report["tasks"]["clue"]["subsets"]) == 3
    # Same seed, same prompts, same numbers.
    assert main(argv[:-1] + [str(tmp_path / "again.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["tasks"] == report["tasks"]


def test_eval_perplexity_matches_the_model_loss(model_root, tmp_path, capsys):
    from aquila.checkpoint import load_model_dir
    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 265, size=n) for n in (30, 50, 20)]
    with MMapIndexedDatasetBuilder(tmp_path / "ppl", dtype=np.uint16) as builder:
        for doc in docs:
            builder.add_document(doc)
    out = tmp_path / "ppl.json"
    argv = ["eval", "--model-dir", str(model_root / "tiny"), "--perplexity", str(tmp_path / "ppl"), "--window", "128"]
    assert main(argv + ["--stride", "64", "--output", str(out), "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    ids = torch.tensor(np.concatenate(docs).astype(np.int64))[None]
    with torch.no_grad():
        loss = float(load_model_dir(model_root / "tiny")(ids, labels=ids)["loss"])
    report = json.loads(out.read_text())
    assert report["tokens"] == 99 and report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_eval_perplexity_default_window_is_the_models_max_seq_len(model_root, tmp_path, capsys):
    """The tiny model's max_seq_len is 512: a fixed default window of 1024 used to fail here."""
    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

    with MMapIndexedDatasetBuilder(tmp_path / "ppl", dtype=np.uint16) as builder:
        builder.add_document(np.random.default_rng(0).integers(0, 265, size=700))
    out = tmp_path / "ppl.json"
    argv = ["eval", "--model-dir", str(model_root / "tiny"), "--perplexity", str(tmp_path / "ppl"), "--device", "cpu"]
    assert main(argv + ["--output", str(out)]) == 0
    assert "(window 512, stride 256)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert (report["window"], report["stride"], report["tokens"]) == (512, 256, 699)
    assert main(argv + ["--stride", "500"]) == 0 and "(window 512, stride 500)" in capsys.readouterr().out


def test_eval_perplexity_default_window_is_the_trained_seq_length_and_progress_shows_when_piped(
    model_root, tmp_path, capsys
):
    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

    step = tmp_path / "step"
    shutil.copytree(model_root / "tiny", step)
    (step / "trainer_state.json").write_text(json.dumps({"iteration": 10, "seq_length": 128}))
    with MMapIndexedDatasetBuilder(tmp_path / "ppl", dtype=np.uint16) as builder:
        builder.add_document(np.random.default_rng(0).integers(0, 265, size=700))
    argv = ["eval", "--model-dir", str(step), "--perplexity", str(tmp_path / "ppl"), "--device", "cpu"]
    assert main(argv + ["--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "(window 128, stride 64)" in out
    progress = [line for line in err.splitlines() if line.startswith("perplexity: ")]  # stderr is not a terminal
    assert progress[-1].startswith("perplexity: 10/10 windows (100%) in ") and len(progress) == 5, err


def _run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors_exit_2_with_one_line(model_root, tmp_path, capsys):
    base = ["eval", "--model-dir", str(model_root), "--model-name", "tiny", "--device", "cpu"]
    err = _run_error(base + ["--data-dir", str(EXAMPLES), "--tasks", "mmlu,squad"], capsys)
    assert (
        err
        == "error: unknown task 'squad'; known tasks: mmlu_zh, clue, mmlu, boolq, truthfulqa, imdb, raft, multiple_choice"
    )
    shutil.copytree(EXAMPLES / "boolq", tmp_path / "boolq")
    (tmp_path / "boolq" / "dev.jsonl").write_text("")
    err = _run_error(base + ["--data-dir", str(tmp_path), "--tasks", "boolq"], capsys)
    assert err == f"error: {tmp_path / 'boolq' / 'dev.jsonl'}: empty file (no items)"
    shutil.copytree(EXAMPLES / "mmlu", tmp_path / "mmlu")
    bad = tmp_path / "mmlu" / "test" / "world_geography_test.csv"
    bad.write_text(bad.read_text() + "Too short,1,2,3\n")
    err = _run_error(base + ["--data-dir", str(tmp_path), "--tasks", "mmlu"], capsys)
    assert err.startswith(f"error: {bad}:4: expected 6 columns")
    assert _run_error(base + ["--tasks", "mmlu"], capsys).startswith("error: --data-dir is required")
    assert (
        _run_error(base + ["--data-dir", str(EXAMPLES), "--shots", "-1"], capsys)
        == "error: --shots must be >= 0, got -1"
    )
    err = _run_error(base + ["--perplexity", str(tmp_path / "nothing")], capsys)
    assert "indexed dataset file not found" in err
    err = _run_error(base + ["--perplexity", str(tmp_path / "nothing"), "--window", "8", "--stride", "8"], capsys)
    assert "1 <= stride < window" in err


def test_mmlu_5_shot_scores_the_same_with_and_without_the_prefix_cache(model_root, tmp_path, capsys):
    base = ["eval", "--model-dir", str(model_root), "--model-name", "tiny", "--data-dir", str(EXAMPLES)]
    base += ["--tasks", "mmlu", "--shots", "5", "--device", "cpu", "--output"]
    assert main([*base, str(tmp_path / "shared.json")]) == 0
    assert main([*base, str(tmp_path / "whole.json"), "--no-prefix-cache"]) == 0
    shared, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("shared", "whole"))
    assert shared["tasks"] == whole["tasks"]
    assert shared["prefix_cache"]["enabled"] and shared["prefix_cache"]["hit_blocks"] > 0
    assert whole["prefix_cache"] == {"enabled": False, "hit_blocks": 0}
