"""The launchers with the real training scripts: aquila-tiny for a few steps on the demo data, from a tmp PROJ_HOME
(so no checkpoints_out is left in the repo). YAMLs are the shipped tiny ones with absolute data paths and fewer steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_launcher import EXAMPLES, launcher_env, run, save_dir_of

REPO = EXAMPLES.parents[1]


def tiny_yaml(proj: Path, name: str, **overrides) -> str:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    data.update({"tokenizer_dir": str(EXAMPLES / "demo_tokenizer"), "log_interval": 1, "seq_length": 64, **overrides})
    (proj / name).write_text(yaml.safe_dump(data))
    return name


def real_env() -> dict[str, str]:
    env = launcher_env(AQUILA_PYTHON=sys.executable)
    del env["SCRIPT_FILE"]  # the launcher picks aquila_pretrain.py / aquila_sft.py from the YAML
    return env


@pytest.mark.slow
def test_pretrain_tiny_one_node_two_processes(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n")
    cfg = tiny_yaml(
        tmp_path,
        "Aquila-pretrain-tiny.yaml",
        data_prefix=str(REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"),
        max_steps=4,
        save_interval=2,
        batch_size=2,
        eval_interval=1000,
        env_type="fsdp",
    )
    r = run("local_trigger_docker.sh", "--follow", "hostfile", cfg, "aquila-tiny", "demo", cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    save_dir = save_dir_of(r.stdout)
    assert "aquila_pretrain.py --not_call_launch" in r.stdout and "fsdp on 2 x cpu" in r.stdout
    assert (save_dir / "latest_iteration.txt").read_text().split()[0] == "4"
    step = save_dir / "4"
    for f in ("pytorch_model.bin", "model.safetensors", "config.json", "tokenizer.json"):
        assert (step / f).is_file(), f
    assert json.loads((step / "config.json").read_text())["dim"] == 256
    assert (save_dir / cfg).is_file() and (save_dir / "hostfile").is_file()


@pytest.mark.slow
def test_sft_tiny_two_local_nodes(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    cfg = tiny_yaml(
        tmp_path, "Aquila-sft-tiny.yaml", enable_sft_dataset_dir=str(EXAMPLES / "data"), max_steps=2, env_type="fsdp"
    )
    r = run("dist_trigger_docker.sh", "--follow", "hostfile", cfg, "aquila-tiny", "chat", cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    save_dir = save_dir_of(r.stdout)
    assert "aquila_sft.py --not_call_launch" in r.stdout and "fsdp on 2 x cpu" in r.stdout
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 1" in (save_dir / "launch" / "node1.log.txt").read_text()
    assert (save_dir / "latest_iteration.txt").read_text().split()[0] == "2"
    assert (save_dir / "2" / "model.safetensors").is_file()
