"""lm-evaluation-harness (lm-eval) against aquila, offline, on the local tasks in tests/data/lm_eval/:
`--model hf` on an `aquila convert --to hf` export and `--model local-completions` against `aquila serve` give the
same scores, item by item, and `aquila eval`'s log-likelihood accuracy on the same jsonl equals theirs."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aquila.cli import main as cli_main
from aquila.errors import AquilaError
from aquila.evaluation.tasks import load_task
from tests.test_inference import write_checkpoint

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval"
TASKS = "aquila_mc,aquila_gen"
# A choice's log-probability sums <= 5 tokens, each a log-softmax over V = 16,008 logits. HF's Llama and aquila's
# model compute them with different fp32 kernels: the log-sum-exp may differ by eps * sqrt(V) ~ 1.5e-5 (relative
# error of the sum of V exps, absolute in its log) and the logits by much less (64-term dots through 2 layers), so
# a sum of 5 tokens is within 1e-4. The choices of these items differ by >= 1e-3 (asserted), so the argmax is stable.
LOGLIK_ATOL = 1e-4


def offline_env(tmp: Path) -> dict[str, str]:
    """Hugging Face libraries offline, their caches in `tmp`, and any other HTTP(S) sent to a closed port."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
        HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost",
        OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )  # fmt: skip
    return env


def run_lm_eval(model: str, model_args: str, out: Path, env: dict[str, str], *extra: str) -> dict:
    """Run lm-eval's CLI in the tasks' directory (their data_files are relative); its results and samples."""
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", TASKS]
    cmd += ["--include_path", ".", "--batch_size", "1", "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, cwd=TASKS_DIR, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = glob.glob(f"{out}/*/results_*.json")
    samples = {}
    for path in glob.glob(f"{out}/*/samples_*.jsonl"):
        for line in Path(path).read_text().splitlines():
            rec = json.loads(line)
            task = "aquila_mc" if "samples_aquila_mc_" in path else "aquila_gen"
            samples[task, rec["doc_id"]] = rec["filtered_resps"]
    return {"results": json.loads(Path(results).read_text())["results"], "samples": samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("lm_eval")
    aquila_dir = write_checkpoint(root / "models", "tiny")
    assert cli_main(["convert", str(aquila_dir), str(root / "models" / "tiny-hf"), "--to", "hf"]) == 0
    return root, aquila_dir, root / "models" / "tiny-hf"


@pytest.fixture(scope="module")
def hf_run(models):
    root, _, hf_dir = models
    args = f"pretrained={hf_dir},dtype=float32,add_bos_token=True"
    return run_lm_eval("hf", args, root / "out_hf", offline_env(root), "--device", "cpu")


@pytest.fixture(scope="module")
def server_run(models):
    root, aquila_dir, hf_dir = models
    env, port = offline_env(root), free_port()
    cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(aquila_dir.parent), "--model-name", "tiny"]
    log = root / "serve.log"
    with open(log, "w") as f:
        server = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "aquila serve did not start in 300 s"
                time.sleep(1)
        # lm-eval tokenizes with the export's tokenizer (the same ids as aquila's) and sends token ids, BOS first
        args = (
            f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={hf_dir},add_bos_token=True,num_concurrent=1,max_retries=1"
        )
        return run_lm_eval("local-completions", args, root / "out_api", env)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_hf_export_and_aquila_serve_score_alike(hf_run, server_run):
    assert hf_run["results"]["aquila_mc"]["acc,none"] == server_run["results"]["aquila_mc"]["acc,none"]
    assert (
        hf_run["results"]["aquila_gen"]["exact_match,none"] == server_run["results"]["aquila_gen"]["exact_match,none"]
    )
    assert hf_run["samples"].keys() == server_run["samples"].keys() and len(hf_run["samples"]) == 8 + 4
    for key, hf_resps in hf_run["samples"].items():
        api_resps = server_run["samples"][key]
        if key[0] == "aquila_gen":  # greedy text up to the first newline, token for token
            assert api_resps == hf_resps, key
            continue
        hf_ll, api_ll = ([float(r[0]) for r in resps] for resps in (hf_resps, api_resps))
        assert all(abs(a - b) <= LOGLIK_ATOL for a, b in zip(hf_ll, api_ll)), (key, hf_ll, api_ll)
        best = sorted(hf_ll)
        assert best[-1] - best[-2] >= 1e-3, (key, hf_ll)  # the prediction does not hang on rounding


@pytest.mark.slow
def test_aquila_eval_loglikelihood_accuracy_equals_lm_eval(models, hf_run, tmp_path, capsys):
    _, aquila_dir, _ = models
    out = tmp_path / "eval.json"
    argv = ["eval", "--model-dir", str(aquila_dir.parent), "--model-name", "tiny", "--data-dir", str(TASKS_DIR)]
    assert cli_main([*argv, "--tasks", "multiple_choice", "--shots", "0", "--output", str(out)]) == 0
    acc = json.loads(out.read_text())["tasks"]["multiple_choice"]["acc"]
    assert acc == hf_run["results"]["aquila_mc"]["acc,none"]
    assert f"multiple_choice: acc {acc:.3f}" in capsys.readouterr().out
    # lm-eval's per-item predictions (argmax of its log-likelihoods) are aquila's too: the same number right
    (subset,) = load_task("multiple_choice", TASKS_DIR)
    predicted = {i: max(range(len(r)), key=lambda c: float(r[c][0])) for (t, i), r in hf_run["samples"].items() if t == "aquila_mc"}  # fmt: skip
    assert sum(predicted[i] == item.gold for i, item in enumerate(subset.items)) / len(subset.items) == acc


def test_multiple_choice_reader_matches_the_lm_eval_task_yaml():
    """aquila eval's `multiple_choice` task reads the jsonl the task YAML names, with the YAML's prompt."""
    import yaml

    spec = yaml.safe_load((TASKS_DIR / "aquila_mc.yaml").read_text())
    assert (
        spec["dataset_path"] == "json" and spec["dataset_kwargs"]["data_files"]["test"] == "multiple_choice/test.jsonl"
    )
    (subset,) = load_task("multiple_choice", TASKS_DIR)
    records = [json.loads(line) for line in (TASKS_DIR / "multiple_choice" / "test.jsonl").read_text().splitlines()]
    assert len(subset.items) == len(records) == 8
    for item, rec in zip(subset.items, records):
        assert item.query == spec["doc_to_text"].replace("{{question}}", rec["question"])
        assert (
            item.choices == tuple(spec["target_delimiter"] + c for c in rec["choices"]) and item.gold == rec["answer"]
        )


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "index of the right choice"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "index of the right choice"),
        ({"question": "q", "answer": 0}, "choices"),
    ],
)
def test_multiple_choice_reader_errors_name_the_line(tmp_path, record, message):
    (tmp_path / "multiple_choice").mkdir()
    (tmp_path / "multiple_choice" / "test.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(AquilaError, match=message) as e:
        load_task("multiple_choice", tmp_path)
    assert "test.jsonl:1" in str(e.value) and "\n" not in str(e.value)
