"""Multi-process (2 gloo processes via torchrun) and crash-safety tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from aquila.checkpoint import ModelDir, load_model_dir
from tests.train_helpers import REPO, losses, pretrain_config, torchrun, write_yaml

pytestmark = pytest.mark.slow


def _run(tmp_path, name, nproc, **overrides):
    cfg = pretrain_config(tmp_path, save_dir=str(tmp_path / name), max_steps=3, save_interval=3, **overrides)
    y = write_yaml(tmp_path / f"{name}.yaml", cfg)
    if nproc == 1:
        from aquila.train.pretrain import main

        assert main(["--yaml_config", str(y)]) == 0
        return
    res = torchrun(["--yaml_config", str(y)], nproc=nproc, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]


def test_ddp_and_fsdp_match_single_process(tmp_path):
    """Same global batch (8) on 1 process, DDP (2 x 2 x accumulation 2) and FSDP2 (2 x 4, activation
    checkpointing): same parameters."""
    _run(tmp_path, "single", 1, batch_size=8, env_type="pytorch")
    _run(tmp_path, "ddp", 2, batch_size=2, gradient_accumulation_steps=2, env_type="pytorchDDP")
    _run(tmp_path, "fsdp", 2, batch_size=4, env_type="fsdp", checkpoint_activations=True)
    ref = ModelDir.open(tmp_path / "single" / "3").read_state()
    ref_losses = losses(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        got = ModelDir.open(tmp_path / name / "3").read_state()
        assert set(got) == set(ref)
        for k in ref:
            # Adam divides by sqrt(v): where a gradient is ~0, fp32 reduction-order noise can move a weight by up
            # to ~lr. So: almost every element within 1e-5, none further than a tenth of lr (3e-3) from single.
            diff = (got[k] - ref[k]).abs()
            assert float(diff.max()) < 3e-4 and float((diff > 1e-5).float().mean()) < 1e-3, (name, k)
        for step, value in losses(tmp_path / name).items():
            assert value == pytest.approx(ref_losses[step], rel=1e-5), (name, step)


def test_fsdp_exact_resume_and_reshard_to_one_process(tmp_path):
    common = dict(batch_size=2, env_type="fsdp", max_steps=4, save_full_interval=4)  # step 2: the ranks' shards
    cfg = pretrain_config(tmp_path, save_dir=str(tmp_path / "full"), save_interval=2, num_checkpoints=2, **common)
    res = torchrun(["--yaml_config", str(write_yaml(tmp_path / "full.yaml", cfg))], cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    full = losses(tmp_path / "full")
    step2 = tmp_path / "full" / "2"
    assert not (step2 / "pytorch_model.bin").exists() and len(list((step2 / "model").glob("*.distcp"))) == 2
    cfg.update(save_dir=str(tmp_path / "resumed"), load_dir=str(tmp_path / "full" / "2"))
    res = torchrun(["--yaml_config", str(write_yaml(tmp_path / "resumed.yaml", cfg))], cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = losses(tmp_path / "resumed")
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]  # bitwise, same rank count
    # One process, same global batch (4): DCP reshards the optimizer state; the data continues at sample 8.
    cfg.update(save_dir=str(tmp_path / "one"), batch_size=4, env_type="pytorch")
    from aquila.train.pretrain import main

    assert main(["--yaml_config", str(write_yaml(tmp_path / "one.yaml", cfg))]) == 0
    one = losses(tmp_path / "one")
    for s in (3, 4):
        assert one[s] == pytest.approx(full[s], rel=1e-5)


KILLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import aquila.train.checkpointing as ck
    orig = ck.save_weights
    def slow(state, directory, formats):
        orig(state, directory, formats)
        if Path(directory).name == ".4.partial":
            Path(sys.argv[1]).write_text("in save")
            time.sleep(120)
    ck.save_weights = slow
    from aquila.train.pretrain import main
    sys.exit(main(sys.argv[2:]))
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    cfg = pretrain_config(tmp_path, max_steps=6, save_interval=2)
    y = write_yaml(tmp_path / "c.yaml", cfg)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(marker), "--yaml_config", str(y)], cwd=REPO)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before saving step 4"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = tmp_path / "out"
    assert (out / "latest_iteration.txt").read_text().split()[0] == "2"
    assert (out / ".4.partial").is_dir() and not (out / "4").exists()
    load_model_dir(out / "2")  # the previous checkpoint is complete and loads strictly
    from aquila.train.pretrain import main

    cfg.update(load_dir=str(out))
    assert main(["--yaml_config", str(write_yaml(tmp_path / "r.yaml", cfg))]) == 0
    assert not (out / ".4.partial").exists() and (out / "latest_iteration.txt").read_text().split()[0] == "6"
