"""Unit-level training pieces: schedule, decay groups, batch geometry, SFT loss masking, LoRA and merge."""

from __future__ import annotations

import math

import pytest
import torch

from aquila.checkpoint import build_model
from aquila.config import ModelArgs
from aquila.train.batches import GlobalBatches, SampleOrder, count_targets, pretrain_collate
from aquila.train.config import TrainConfig
from aquila.train.lora import apply_lora, lora_config, merge_lora
from aquila.train.optim import LossScaler, build_optimizer, lr_at, param_groups

MICRO = ModelArgs.from_name("aquila-micro")


def test_cosine10pp_and_linear_schedules():
    cfg = TrainConfig(lr=1.0, warm_up=0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warm-up ends at the peak
    assert lrs[-1] == pytest.approx(0.1)  # cosine down to 10% of the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    lin = TrainConfig(lr=1.0, warm_up_iters=10, bmt_lr_decay_style="linear")
    assert lr_at(99, lin, 100) == pytest.approx(0.0) and lr_at(54, lin, 100) == pytest.approx(0.5)
    assert lr_at(50, TrainConfig(lr=0.3, warm_up=0.0), 100) == 0.3  # FlagAI: no scheduler without warm-up


def test_no_decay_on_norms_and_biases():
    model = build_model(MICRO, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_loss_scaler_dynamics():
    s = LossScaler(1024.0, 2, enabled=True)
    s.update(True)
    assert s.scale == 512.0
    s.update(False)
    s.update(False)
    assert s.scale == 1024.0
    assert LossScaler(1024.0, 2, enabled=False).scale == 1.0


def test_global_order_independent_of_rank_count():
    data = [{"input_ids": torch.full((3,), i).numpy()} for i in range(64)]
    order = SampleOrder(len(data), shuffle=True, seed=3)

    def global_batch(world, accum, batch, step):
        seen = []
        for r in range(world):
            gb = GlobalBatches(data, order, pretrain_collate, batch, world, r, accum)
            seen += [int(x) for b in gb.micro_batches(step) for x in b["input_ids"][:, 0]]
        return sorted(seen)

    for step in range(3):
        assert global_batch(1, 1, 8, step) == global_batch(2, 2, 2, step) == global_batch(4, 1, 2, step)
    assert len(set(global_batch(1, 1, 64, 0))) == 64  # one epoch is a permutation


def _one_step(model, batches, world_total_targets):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for b in batches:
        n = count_targets(b["labels"])
        loss = model(b["input_ids"], labels=b["labels"])["loss"]
        (loss * n / world_total_targets).backward()
    opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulation_equals_big_batch_with_ragged_targets():
    """k micro-batches with different numbers of target tokens == one batch of all of them (token mean)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MICRO.vocab_size, (4, 16), generator=gen)
    labels = ids.clone()
    labels[0, :12] = -100  # few targets in the first sample
    labels[3, 5:9] = -100
    big = {"input_ids": ids, "labels": labels}
    total = count_targets(labels)
    ref = _one_step(build_model(MICRO, seed=1), [big], total)
    micro = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(4)]
    acc = _one_step(build_model(MICRO, seed=1), micro, total)
    for k in ref:
        torch.testing.assert_close(acc[k], ref[k], rtol=1e-5, atol=1e-6)


def test_lora_trains_only_adapters_and_merge_matches():
    torch.manual_seed(0)
    model = build_model(MICRO, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = lora_config(4, 8, 0.0, ["wq", "wv"])
    adapted = apply_lora(model, cfg)
    assert len(adapted) == 2 * MICRO.n_layers
    assert all(n.endswith(("wq", "wv")) for n in adapted)
    assert set(base) <= set(model.state_dict())  # base key names unchanged
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, tc)
    ids = torch.randint(0, MICRO.vocab_size, (2, 16))
    for _ in range(3):
        model(ids, labels=ids)["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k  # frozen base
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_B" in k)
    model.eval()
    with torch.no_grad():
        want = model(ids)["logits"]
        merged = merge_lora(model)
        assert not any("lora" in k for k in merged.state_dict())
        got = merged(ids)["logits"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_unknown_target_is_an_error():
    from aquila.errors import AquilaError

    with pytest.raises(AquilaError, match="no nn.Linear"):
        apply_lora(build_model(MICRO, seed=0), lora_config(4, 8, 0.0, ["q_proj"]))


def test_flops_per_token_matches_nanogpt_formula():
    from aquila.train.metrics import flops_per_token

    a = ModelArgs.from_name("aquila-7b")
    n = a.num_params() - a.vocab_size * a.dim
    assert flops_per_token(a, 2048) == 6 * n + 12 * a.n_layers * a.n_heads * a.head_dim * 2048
    assert math.isclose(n / 1e9, 6.89, rel_tol=0.01)  # 7.3B minus the 0.41B embedding table


def test_lora_on_the_output_projection_is_an_error():
    """The fused loss reads output.weight itself: an adapter there would get no gradient and train nothing."""
    from aquila.errors import AquilaError

    with pytest.raises(AquilaError, match="'output' is not supported"):
        apply_lora(build_model(MICRO, seed=0), lora_config(4, 8, 0.0, ["wq", "output"]))


def test_run_plan_is_built_once_and_hands_the_weights_over_once(tmp_path):
    """The composition root: one RunPlan from the config and the environment (model source, seq_length, resume
    point, weights, backend, global batch); the model builder takes the planned weights and the plan lets go."""
    from aquila.checkpoint import save_model_dir
    from aquila.train.config import parse_config
    from aquila.train.distributed import resolve_env
    from aquila.train.run import build_train_model, plan_model, plan_run
    from tests.train_helpers import micro_model_dir

    save_model_dir(
        build_model(ModelArgs.load(micro_model_dir(tmp_path / "cfg") / "config.json"), seed=0), tmp_path / "in" / "m"
    )
    argv = ["--model_name", "m", "--pre_load_dir", str(tmp_path / "in"), "--bmt_pre_load", "True", "--max_steps", "1"]
    argv += ["--load_dir", "null", "--batch_size", "2", "--gradient_accumulation_steps", "3", "--seq_length", "16"]
    cfg = parse_config(argv, "t")
    env = resolve_env(cfg)
    plan = plan_run(cfg, env, plan_model(cfg, warn=False))
    assert (plan.global_batch_size, plan.seq_length, plan.resume, plan.tokenizer) == (
        2 * env.world_size * 3,
        16,
        None,
        None,
    )
    assert plan.weights.source == str(tmp_path / "in" / "m" / plan.source.weights.name) and plan.weights.state
    model, lora_cfg = build_train_model(plan)
    assert plan.weights.state is None and lora_cfg is None and model.training
