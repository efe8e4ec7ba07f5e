"""TrainConfig precedence and checks; every bad input fails with one line and status 2 before training."""

from __future__ import annotations

import pytest

from aquila.errors import AquilaError
from aquila.train.config import SCRIPT_DEFAULTS, TrainConfig, parse_config
from aquila.train.pretrain import main as pretrain_main
from tests.train_helpers import micro_model_dir, pretrain_config, write_yaml


def test_precedence_defaults_flags_yaml(tmp_path):
    y = write_yaml(tmp_path / "c.yaml", {"lr": 3.0e-4, "batch_size": 10})
    cfg = parse_config(["--lr", "6.0e-5", "--epochs", "3", "--yaml_config", str(y)], "t", SCRIPT_DEFAULTS)
    assert cfg.lr == 3.0e-4 and cfg.batch_size == 10  # YAML beats flags
    assert cfg.epochs == 3  # flag beats script default (100)
    assert cfg.log_interval == 10  # script default beats EnvArgs default (100)
    assert TrainConfig().log_interval == 100


def test_flagai_launcher_flags_accepted():
    argv = "--not_call_launch --local-rank 0 --batch_size 6 --epochs 1 --gradient_accumulation_steps 1 --lr 6.0e-5"
    argv += " --warm_up 0.2 --weight_decay 0.1 --adam_beta1 0.9 --adam_beta2 0.95 --save_dir s --pre_load_dir p"
    argv += " --experiment_name e --model_name aquila-7b --wandb_dir w --fp16 True --bmt_cpu_offload false"
    cfg = parse_config(argv.split() + ["--local_rank=1"], "t")
    assert (cfg.batch_size, cfg.lr, cfg.adam_beta2, cfg.fp16, cfg.bmt_cpu_offload) == (6, 6.0e-5, 0.95, True, False)


def test_cli_lists_and_none():
    cfg = parse_config(["--lora_target_modules", "[wq,wk,wv]", "--load_dir", "None", "--data_prefix", "a"], "t")
    assert cfg.lora_target_modules == ["wq", "wk", "wv"] and cfg.load_dir is None and cfg.data_prefix == "a"


@pytest.mark.parametrize(
    "yaml_data, argv, needle",
    [
        ({"lr": "3e-4"}, [], "YAML 1.1"),
        ({"learning_rate": 0.1}, [], "unknown key 'learning_rate'"),
        ({"batch_size": "ten"}, [], "key 'batch_size'"),
        ({}, ["--batch_size", "x"], "--batch_size"),
        ({}, ["--bogus", "1"], "--bogus"),
        ({}, ["--fp16", "maybe"], "--fp16"),
        ({"batch_size": 0}, [], "batch_size must be positive"),
        ({"env_type": "deepspeed"}, [], "env_type"),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_data, argv, needle):
    y = write_yaml(tmp_path / "c.yaml", yaml_data)
    with pytest.raises(AquilaError, match=needle.replace("(", r"\(")):
        parse_config(argv + ["--yaml_config", str(y)], "t")


def _run_bad(tmp_path, capsys, **overrides):
    cfg = pretrain_config(tmp_path, **overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    y = write_yaml(tmp_path / "bad.yaml", cfg)
    rc = pretrain_main(["--yaml_config", str(y)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"data_prefix": None}, "data_prefix is not set"),
        ({"data_prefix": "/nonexistent/prefix"}, "not found"),
        ({"seq_length": 4096}, "above the model's max_seq_len 128"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"model_name": "nope"}, "model_name 'nope'"),
        ({"lr": "3e-4"}, "YAML 1.1"),
        ({"max_steps": 0, "epochs": 1, "batch_size": 4096}, "fewer than one global batch"),
        ({"seed": -1}, "seed must be in 0..4294967295"),
        ({"seed": 2**32}, "seed must be in 0..4294967295"),
        ({"data_prefix": [1.0]}, "data_prefix [1.0]: expected [prefix] or [weight1, prefix1"),
        ({"data_prefix": ["a", 1.0]}, "got 'a', 1.0 where a weight and a path belong"),
        ({"clip_grad": -1.0}, "clip_grad must be >= 0 (0: no clipping), got -1.0"),
    ],
)
def test_bad_inputs_one_line_before_training(tmp_path, capsys, overrides, needle):
    rc, out, err = _run_bad(tmp_path, capsys, **overrides)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "iteration" not in out


def test_load_dir_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out, err = _run_bad(tmp_path, capsys, load_dir=str(tmp_path / "empty"))
    assert rc == 2 and err.count("\n") == 1 and "no checkpoint" in err
    assert "iteration" not in out


def test_corrupt_checkpoint_detected_before_training(tmp_path, capsys):
    rc, _, _ = _run_bad(tmp_path, capsys, max_steps=2, save_interval=2)
    assert rc == 0
    step_dir = tmp_path / "out" / "2"
    data = (step_dir / "pytorch_model.bin").read_bytes()
    (step_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    rc, out, err = _run_bad(
        tmp_path, capsys, load_dir=str(tmp_path / "out"), max_steps=4, save_dir=str(tmp_path / "o2")
    )
    assert rc == 2 and err.count("\n") == 1 and "pytorch_model.bin" in err, err
    assert "iteration" not in out


def test_pre_load_dir_config_takes_precedence_over_preset(tmp_path, capsys):
    micro_model_dir(tmp_path / "pre" / "aquila-micro", dim=48, n_heads=4)
    rc, out, _ = _run_bad(tmp_path, capsys, pre_load_dir=str(tmp_path / "pre"), max_steps=1)
    assert rc == 0
    assert '"dim": 48' in (tmp_path / "out" / "1" / "config.json").read_text()


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 2\nlr: [1\n")
    with pytest.raises(AquilaError, match=rf"config {bad}:\d+: not valid YAML"):
        parse_config(["--yaml_config", str(bad)], "t")
    with pytest.raises(AquilaError, match=rf"config {tmp_path / 'missing.yaml'}: file not found"):
        parse_config(["--yaml_config", str(tmp_path / "missing.yaml")], "t")


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    bad = tmp_path / "dup.yaml"
    bad.write_text("batch_size: 2\nlr: 1.0e-4\nseed: 1\nlr: 3.0e-4\n")
    with pytest.raises(AquilaError, match=rf"config {bad}:4: key 'lr' is given twice \(lines 2 and 4\)"):
        parse_config(["--yaml_config", str(bad)], "t")
    merged = tmp_path / "merge.yaml"  # a YAML merge key may still be overridden
    merged.write_text("base: &b {x: 1}\nm:\n  <<: *b\n  x: 2\n")
    from aquila.io_utils import read_yaml

    assert read_yaml(merged)["m"] == {"x": 2}


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_yaml_says_it_is_empty(tmp_path, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(AquilaError, match=rf"config {empty}: the file is empty"):
        parse_config(["--yaml_config", str(empty)], "t")


def test_cli_data_prefix_weights_are_text(tmp_path):
    assert parse_config(["--data_prefix", "[0.5,a,0.5,b]"], "t").data_prefix == ["0.5", "a", "0.5", "b"]


def test_model_parallel_size_above_one_is_an_error(tmp_path):
    y = write_yaml(tmp_path / "c.yaml", {"model_parallel_size": 8})
    with pytest.raises(AquilaError, match="model_parallel_size 8: tensor parallelism is not implemented"):
        parse_config(["--yaml_config", str(y)], "t")


def test_keys_without_effect_get_one_warning_each(tmp_path, capsys):
    rc, out, _ = _run_bad(tmp_path, capsys, max_steps=1, hostfile="hosts", wandb=True, enable_sft_dataset=True)
    assert rc == 0
    warnings = [line for line in out.splitlines() if line.startswith(" warning: ")]
    assert warnings == [
        " warning: wandb: True has no effect: no wandb logging here; tensorboard: True writes the same scalars",
        " warning: hostfile: hosts has no effect: the launcher (hostfile, dist_trigger_docker.sh) and torchrun's"
        " environment decide this",
        " warning: enable_sft_dataset: True has no effect: the entry script decides the dataset kind"
        " (aquila_pretrain.py: indexed data, aquila_sft.py: jsonl)",
    ]


def test_ignored_keys_are_one_table_not_fields(tmp_path):
    """IGNORED_KEYS are accepted (flag and YAML, typed, YAML over flags), kept apart, and nothing else can read them."""
    import dataclasses

    from aquila.train.config import IGNORED_KEYS, no_effect_notes

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not fields & set(IGNORED_KEYS)
    y = write_yaml(tmp_path / "c.yaml", {"master_port": 9000, "wandb": True})
    cfg = parse_config(["--master_port", "1", "--wandb_dir", "w", "--hostfile", "h", "--yaml_config", str(y)], "t")
    assert cfg.flagai_ignored == {"master_port": 9000, "wandb_dir": "w", "hostfile": "h", "wandb": True}
    assert [n.split(":")[0] for n in no_effect_notes(cfg)] == ["wandb", "master_port", "hostfile"]  # wandb_dir: silent
    bad = write_yaml(tmp_path / "bad.yaml", {"master_port": "high"})
    with pytest.raises(AquilaError, match="key 'master_port'"):
        parse_config(["--yaml_config", str(bad)], "t")
    inner = write_yaml(tmp_path / "inner.yaml", {"flagai_ignored": {"wandb": True}})
    with pytest.raises(AquilaError, match="unknown key 'flagai_ignored'"):
        parse_config(["--yaml_config", str(inner)], "t")
    with pytest.raises(AquilaError, match="unknown command-line argument '--flagai_ignored'"):
        parse_config(["--flagai_ignored", "x"], "t")


def test_shipped_lora_yaml_with_fp16_trains_on_cpu_in_fp32(tmp_path, capsys):
    """Aquila-sft-lora.yaml as shipped (fp16: True, pytorchDDP) on a laptop: one warning, then fp32 training."""
    import yaml

    from aquila.checkpoint import build_model, save_model_dir
    from aquila.config import ModelArgs
    from aquila.train.sft import main as sft_main
    from tests.train_helpers import CONVOS, DEMO_TOKENIZER, EXAMPLES

    base = micro_model_dir(tmp_path / "pre" / "m", vocab=16008, dim=32, n_heads=2, n_layers=1, max_seq_len=64)
    save_model_dir(build_model(ModelArgs.load(base / "config.json"), seed=5), base)
    data = yaml.safe_load((EXAMPLES / "Aquila-sft-lora.yaml").read_text())
    assert data["fp16"] is True and data["lora"] is True
    data.update(
        pre_load_dir=str(tmp_path / "pre"), model_name="m", tokenizer_dir=str(DEMO_TOKENIZER), seq_length=64,
        enable_sft_dataset_dir=str(CONVOS.parent), max_steps=1, save_dir=str(tmp_path / "out"), peak_tflops=1.0,
    )  # fmt: skip
    assert sft_main(["--yaml_config", str(write_yaml(tmp_path / "lora.yaml", data))]) == 0
    out = capsys.readouterr().out
    assert " warning: fp16: True needs CUDA; on CPU this run trains in fp32" in out
    assert "loss scale 1.0" in out and (tmp_path / "out" / "1" / "adapter_model.safetensors").is_file()


def test_flagai_runtime_keys_in_config_json_work_or_warn(capsys):
    from aquila.config import ModelArgs

    shape = ModelArgs.from_name("aquila-micro").to_dict()
    runtime = {"flash_atten": True, "use_cache": True, "ignore_index": -100, "flash_atten_pdrop": 0.1}
    assert ModelArgs.from_dict({**shape, **runtime}, "c.json") == ModelArgs.from_dict(shape, "c.json")
    assert capsys.readouterr().err == (
        "warning: c.json: flash_atten_pdrop: 0.1 has no effect: attention dropout is not implemented\n"
    )


def test_int_checks_reject_bools():
    from aquila.typed_config import is_int, is_number

    assert is_int(3, 1) and is_int(0) and not is_int(0, 1) and not is_int(True) and not is_int(2.0)
    assert is_number(1.5) and is_number(2) and not is_number(False) and not is_number("1")
