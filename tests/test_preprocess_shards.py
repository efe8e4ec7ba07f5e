"""Sharded preprocessing: Slurm-style array tasks and Ray tasks, merged byte-identical to one process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aquila import cli
from aquila.data.preprocess import preprocess
from tests.test_preprocess import TOKENIZER, corpus, write_jsonl

KILL_MARK = "AQUILA_TEST_KILL_SHARD_MARK"


def inputs(tmp_path, n_files=4):
    texts = corpus(120)
    d = tmp_path / "in"
    d.mkdir()
    step = len(texts) // n_files
    files = [write_jsonl(d / f"part{i}.jsonl", texts[i * step : (i + 1) * step]) for i in range(n_files)]
    one = preprocess(files, TOKENIZER, tmp_path / "one")
    return files, {e: Path(f"{one.outputs[0]}.{e}").read_bytes() for e in ("bin", "idx")}


def same_as_one_process(prefix, expected):
    return all(Path(f"{prefix}.{e}").read_bytes() == expected[e] for e in ("bin", "idx"))


def args(files, prefix, *extra):
    return ["preprocess", "--input", *map(str, files), "--tokenizer", str(TOKENIZER), "--output-prefix", str(prefix), "--quiet", *extra]  # fmt: skip


def test_array_tasks_then_merge_equal_one_process(tmp_path, capsys):
    files, expected = inputs(tmp_path)
    out = tmp_path / "out" / "corpus"
    rc = cli.main(args(files, out, "--merge-shards"))
    assert rc == 2 and "shards not complete: 0 (" in capsys.readouterr().err
    # shard 2's task is killed mid-way (kill -9 after its first chunk): only hidden temporaries remain
    code = (
        "import os, signal, sys\n"
        "import aquila.data.indexed_dataset as idx\n"
        "orig = idx.MMapIndexedDatasetBuilder.add_documents\n"
        "def add(self, *a):\n"
        "    orig(self, *a); os.kill(os.getpid(), signal.SIGKILL)\n"
        "idx.MMapIndexedDatasetBuilder.add_documents = add\n"
        "from aquila import cli\n"
        "cli.main(sys.argv[1:])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args(files, out, "--shard-index", "2")])
    assert r.returncode == -signal.SIGKILL
    assert [p for p in os.listdir(out.parent / "corpus_shards") if not p.startswith(".")] == []
    for i in range(len(files)):  # the array job, then its rerun: complete shards are skipped
        assert cli.main(args(files, out, "--shard-index", str(i))) == 0
    assert cli.main(args(files, out, "--shard-index", "1")) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("shard 1 (") and "already complete" in last
    assert cli.main(args(files, out, "--merge-shards")) == 0
    assert same_as_one_process(f"{out}_text_document", expected)
    assert sorted(os.listdir(out.parent)) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_changed_input_redoes_its_shard(tmp_path):
    files, _ = inputs(tmp_path, n_files=2)
    out = tmp_path / "c"
    for i in range(2):
        assert cli.main(args(files, out, "--shard-index", str(i))) == 0
    write_jsonl(files[1], ["a new document", "and another"])
    assert cli.main(args(files, out, "--shard-index", "1")) == 0
    assert cli.main(args(files, out, "--merge-shards", "--keep-shards")) == 0
    expected = preprocess(files, TOKENIZER, tmp_path / "ref").outputs[0]
    assert same_as_one_process(
        f"{out}_text_document", {e: Path(f"{expected}.{e}").read_bytes() for e in ("bin", "idx")}
    )
    assert (tmp_path / "c_shards").is_dir()


def kill_first_attempt_of_shard_1():
    """Ray worker setup hook: the first attempt of shard 1 dies (SIGKILL) after writing its first chunk."""
    import aquila.data.indexed_dataset as idx

    mark = Path(os.environ[KILL_MARK])
    orig = idx.MMapIndexedDatasetBuilder.add_documents

    def add(self, *a):
        orig(self, *a)
        if "000001_" in self.prefix and not mark.exists():
            mark.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    idx.MMapIndexedDatasetBuilder.add_documents = add


@pytest.mark.slow
def test_ray_tasks_with_one_killed_equal_one_process(tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    files, expected = inputs(tmp_path)
    mark = tmp_path / "killed"
    root = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        runtime_env={
            "worker_process_setup_hook": "tests.test_preprocess_shards.kill_first_attempt_of_shard_1",
            "env_vars": {KILL_MARK: str(mark), "PYTHONPATH": root},
        },
    )
    try:
        out = tmp_path / "ray" / "corpus"
        rc = cli.main(args(files, out, "--engine", "ray", "--chunk-size", "5"))
        assert rc == 0, capsys.readouterr().err
        assert mark.exists()  # shard 1's first attempt was killed, and Ray retried it
        assert same_as_one_process(f"{out}_text_document", expected)
        assert sorted(os.listdir(out.parent)) == ["corpus_text_document.bin", "corpus_text_document.idx"]
        assert "from 4 shards (0 already complete)" in capsys.readouterr().out
    finally:
        ray.shutdown()
