"""Mixed precision on the CPU: the rotary with half-precision tables, and the fsdp backend's FSDP2
MixedPrecisionPolicy (bf16 parameters in forward/backward, fp32 sharded master weights and gradient reduction)."""

from __future__ import annotations

import pytest
import torch

from aquila.model.aquila_model import apply_rotary, rotary_tables


@pytest.mark.parametrize("compiled_route", [False, True], ids=["eager-complex", "compiled-real"])
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_rotary_with_half_precision_tables(monkeypatch, compiled_route, table_dtype, x_dtype):
    """Half-precision cos/sin (what FSDP2's cast_forward_inputs makes of them) rotate in fp32: the result equals
    the fp32 computation on the same table values, cast to x's dtype."""
    if compiled_route:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the route torch.compile traces
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 16, generator=gen).to(x_dtype).requires_grad_()
    cos, sin = rotary_tables(torch.arange(6).expand(2, 6) * 300, 16, 10000.0)  # positions up to 1500
    hcos, hsin = cos.to(table_dtype), sin.to(table_dtype)
    out = apply_rotary(x, hcos, hsin)
    assert out.dtype == x_dtype
    ref = apply_rotary(x.detach().float(), hcos.float(), hsin.float()).to(x_dtype)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # Against the unrounded fp32 tables: each output element is x0*cos -/+ x1*sin, so rounding the tables (2^-9
    # relative for bf16, 2^-11 for fp16) and the output (x's dtype) moves it by at most this much.
    eps = torch.finfo(table_dtype).eps / 2 * 2 * float(x.detach().abs().max())
    out_eps = 0.0 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps * float(x.detach().abs().max())
    full = apply_rotary(x.detach().float(), cos, sin)
    torch.testing.assert_close(out.float(), full, atol=eps + out_eps + 1e-6, rtol=0)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == x_dtype and torch.isfinite(grad).all()


@pytest.fixture
def one_process_group():
    """FSDP2 needs a process group: the backend starts a one-process gloo group; destroyed after the test."""
    from aquila.train.distributed import shutdown

    shutdown()
    yield
    shutdown()


def _fsdp_model(dtype_flags: dict, **cfg_overrides):
    from aquila.checkpoint import build_model
    from aquila.config import ModelArgs
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import FSDPBackend, resolve_env

    cfg = TrainConfig(env_type="fsdp", **dtype_flags, **cfg_overrides)
    backend = FSDPBackend(resolve_env(cfg), cfg)
    backend.start()
    model = build_model(ModelArgs.from_name("aquila-micro"), torch.device("cpu"), torch.float32, seed=0)
    model.train()
    return backend, backend.parallelize(model)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fsdp_backend_applies_mixed_precision_policy(one_process_group, half):
    """Every block and the root carry MixedPrecisionPolicy(param_dtype=half, reduce_dtype=fp32); in forward the
    block computes with half weights on fp32 rotary tables, outside autocast; the stored shards and their
    gradients stay fp32."""
    flags = {"bf16": True} if half == torch.bfloat16 else {"fp16": True}
    backend, model = _fsdp_model(flags)
    assert backend.mixed_precision.startswith("FSDP2 MixedPrecisionPolicy(param ")
    for module in (*model.layers, model):
        policy = module._get_fsdp_state()._mp_policy  # private, torch 2.13: the policy fully_shard was given
        assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (half, torch.float32, False)
    seen = {}

    def block_inputs(module, args, kwargs):
        seen["x"], seen["cos"] = args[0].dtype, args[1].dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")

    model.layers[1].register_forward_pre_hook(block_inputs, with_kwargs=True)
    model.layers[1].attention.wq.register_forward_hook(lambda m, i, o: seen.update(w=m.weight.dtype, out=o.dtype))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with backend.autocast():
        loss = model(ids, labels=ids)["loss"]
    loss.backward()
    assert seen == {"x": half, "cos": torch.float32, "autocast": False, "w": half, "out": half}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert type(p).__name__ == "DTensor" and p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad.full_tensor()).all()


def test_other_backends_keep_autocast():
    from aquila.train.config import TrainConfig
    from aquila.train.distributed import Backend, DDPBackend, FSDPBackend, resolve_env

    cfg = TrainConfig(env_type="pytorch", bf16=True)
    env = resolve_env(cfg)
    for cls in (Backend, DDPBackend):
        backend = cls(env, cfg)
        assert backend.mixed_precision == "bf16 torch.autocast"
        with backend.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fsdp = FSDPBackend(env, cfg)
    with fsdp.autocast():
        assert not torch.is_autocast_enabled("cpu")
    fp32 = TrainConfig(env_type="fsdp")  # bf16 None: fp32 on CPU, no policy
    assert FSDPBackend(env, fp32).mp_policy() is None and FSDPBackend(env, fp32).mixed_precision == "fp32"


def _trainer(backend, model, cfg, scale: float):
    from aquila.train.batches import GlobalBatches, SampleOrder, pretrain_collate
    from aquila.train.loop import Trainer, TrainState
    from aquila.train.optim import LossScaler, build_optimizer

    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (int(torch.randint(0, 512, (), generator=gen)) + torch.arange(17)) % 512} for _ in range(8)]
    batches = GlobalBatches(data, SampleOrder(len(data), False, 0), pretrain_collate, 2, 1, 0, 2)
    return Trainer(
        cfg=cfg,
        backend=backend,
        model=model,
        optimizer=build_optimizer(model, cfg),
        scaler=LossScaler(scale, 1000, enabled=cfg.fp16),
        train_batches=batches,
        valid_batches=None,
        valid_steps=0,
        total_steps=2,
        saver=None,
        logger=None,
        state=TrainState(),
    )


def test_fp16_loss_scaler_with_fsdp2_params(one_process_group):
    """fp16 parameters under FSDP2 (run.py turns fp16 off on CPU, so the Trainer is built here directly): the
    scaled loss backpropagates through fp16 weights, fp32 gradients arrive on the fp32 shards and are unscaled;
    a scale that overflows fp16 skips the step and halves, a sane one steps like scale 1 does."""
    from aquila.train.config import TrainConfig

    cfg = TrainConfig(env_type="fsdp", fp16=True, lr=1e-3, clip_grad=1e9, warm_up=0.0)
    norms = {}
    for scale in (1.0, 1024.0):
        backend, model = _fsdp_model({"fp16": True})
        trainer = _trainer(backend, model, cfg, scale)
        loss, norms[scale], status = trainer.train_step(0)
        assert status == "ok" and torch.isfinite(torch.tensor(loss)), (scale, loss, status)
        assert trainer.scaler.good_steps == 1 and trainer.scaler.scale == scale
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    # The gradient norm after unscaling: the same gradient up to fp16 rounding of the scaled backward.
    assert norms[1024.0] == pytest.approx(norms[1.0], rel=2e-2)
    backend, model = _fsdp_model({"fp16": True})
    trainer = _trainer(backend, model, cfg, 2.0**40)  # fp16 overflows beyond 65504
    before = [p.full_tensor().clone() for p in model.parameters()]
    _, norm, status = trainer.train_step(0)
    assert status == "overflow" and not torch.isfinite(torch.tensor(norm)) and trainer.scaler.scale == 2.0**39
    assert all(torch.equal(b, p.full_tensor()) for b, p in zip(before, model.parameters()))


BF16_FSDP = "precision FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32)"


@pytest.mark.slow
def test_trainer_fsdp_bf16_trains_and_resumes_exactly(tmp_path, capsys):
    """`aquila pretrain` with env_type fsdp and bf16 on 1 process (gloo): FSDP2 mixed precision (no autocast)
    gives the losses of bf16 autocast on the bare model, the loss falls, a checkpoint resumed gives the same
    losses bitwise, and 2 processes with the same global batch follow the same losses."""
    from aquila.train.pretrain import main
    from tests.train_helpers import REPO, losses, pretrain_config, torchrun, write_yaml

    def run(name: str, **overrides) -> dict[int, float]:
        cfg = pretrain_config(
            tmp_path, bf16=True, max_steps=4, save_interval=2, batch_size=4, save_dir=str(tmp_path / name)
        )
        cfg.update(overrides)
        assert main(["--yaml_config", str(write_yaml(tmp_path / f"{name}.yaml", cfg))]) == 0
        return losses(tmp_path / name)

    a = run("a", env_type="fsdp")
    assert BF16_FSDP in capsys.readouterr().out
    assert sorted(a) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in a.values())
    assert max(a[3], a[4]) < a[1], a  # each step sees other samples: the loss falls, not at every step
    autocast = run("autocast", env_type="pytorch")
    assert "precision bf16 torch.autocast" in capsys.readouterr().out
    for s in a:  # measured: within 5e-5 relative of each other
        assert a[s] == pytest.approx(autocast[s], rel=1e-3), (s, a, autocast)
    b = run("b", env_type="fsdp", load_dir=str(tmp_path / "a" / "2"))
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]  # bitwise
    cfg = pretrain_config(
        tmp_path, env_type="fsdp", bf16=True, max_steps=4, batch_size=2, save_dir=str(tmp_path / "two")
    )
    res = torchrun(["--yaml_config", str(write_yaml(tmp_path / "two.yaml", cfg))], nproc=2, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert BF16_FSDP in res.stdout
    two = losses(tmp_path / "two")
    for s in a:  # bf16 matmuls over 2 rows instead of 4 may round differently; gradients are reduced in fp32
        assert two[s] == pytest.approx(a[s], rel=1e-3), (s, two, a)
