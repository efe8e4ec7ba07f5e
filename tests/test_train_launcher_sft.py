"""SFT through the real launcher from our own pretraining run, with the SFT YAML's documented settings
(`pre_load_dir: <save_dir of the pretrain run>`, `model_name: "<step>"`, `bmt_pre_load: True`)."""

from __future__ import annotations

import shutil

import pytest

from aquila.errors import AquilaError
from aquila.launch import hostfile as hf
from tests.test_launcher import EXAMPLES, run, save_dir_of
from tests.test_launcher_train import REPO, real_env, tiny_yaml

DEMO_DATA = REPO / "examples" / "indexed_dataset" / "data" / "demo_text_document"


def test_launcher_check_follows_pre_load_dir(tmp_path):
    run_dir = tmp_path / "checkpoints_out" / "demo" / "2026113001"
    (run_dir / "80").mkdir(parents=True)
    (run_dir / "80" / "config.json").write_text("{}")
    yaml_data = {"pre_load_dir": str(run_dir), "model_name": "80", "bmt_pre_load": True}
    with pytest.raises(AquilaError, match="bmt_pre_load is set but .*/80 has no weights"):
        hf.check_model("80", tmp_path, yaml_data)
    (run_dir / "80" / "model.safetensors").write_bytes(b"")
    assert hf.check_model("80", tmp_path, yaml_data) == str(run_dir / "80" / "model.safetensors")
    with pytest.raises(AquilaError, match="bmt_pre_load is set but .*checkpoints_in/80/config.json does not exist"):
        hf.check_model("80", tmp_path, {"bmt_pre_load": True})


@pytest.mark.slow
def test_sft_through_launcher_from_own_pretraining_run(tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    pre = tiny_yaml(tmp_path, "Aquila-pretrain-tiny.yaml", data_prefix=str(DEMO_DATA), max_steps=4, save_interval=2)
    launch = ("local_trigger_docker.sh", "--follow", "hostfile", pre, "aquila-tiny", "demo")
    r = run(*launch, cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    pretrain_dir = save_dir_of(r.stdout)
    assert "load_dir auto: no checkpoint in" in r.stdout

    # A crash after iteration 3: the last checkpoint is step 2. The same command again continues from it.
    shutil.rmtree(pretrain_dir / "4")
    (pretrain_dir / "latest_iteration.txt").write_text("2\t2\n")
    r = run(*launch, cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert save_dir_of(r.stdout).parent == pretrain_dir.parent  # same experiment (a new run dir if the hour changed)
    assert (
        f"load_dir auto: resuming from {pretrain_dir / '2'}" in r.stdout and " done: 2 iterations (3-4) in " in r.stdout
    )
    pretrain_dir = save_dir_of(r.stdout)

    (tmp_path / "hostfile2").write_text("127.0.0.1 slots=2\n")
    sft = tiny_yaml(
        tmp_path,
        "Aquila-sft-tiny.yaml",
        enable_sft_dataset_dir=str(EXAMPLES / "data"),
        max_steps=1,
        pre_load_dir=str(pretrain_dir),
        model_name="4",
        bmt_pre_load=True,
    )
    r = run("dist_trigger_docker.sh", "--follow", "hostfile2", sft, "aquila-tiny", "chat", cwd=tmp_path, env=real_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"model 4 from {pretrain_dir / '4' / 'pytorch_model.bin'}" in r.stdout
    assert (save_dir_of(r.stdout) / "1" / "pytorch_model.bin").is_file()
