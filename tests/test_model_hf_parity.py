"""Our model against transformers.LlamaForCausalLM on the same converted weights."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from aquila.checkpoint import build_model, load_model_dir, save_model_dir
from tests.conftest import tiny_args

SHAPES = [
    dict(),
    dict(n_kv_heads=2),  # grouped-query attention
    dict(dim=96, n_heads=3, n_layers=3, multiple_of=32),
    dict(dim=128, n_heads=8, n_kv_heads=1, vocab_size=513),
]


@pytest.mark.parametrize("overrides", SHAPES)
@pytest.mark.parametrize("seq_len", [1, 17])
def test_logits_match_transformers(tmp_path, overrides, seq_len):
    args = tiny_args(**overrides)
    model = build_model(args, seed=1).eval()
    save_model_dir(model, tmp_path / "hf", fmt="hf")
    hf = LlamaForCausalLM.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, args.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids)["logits"]
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape == (2, seq_len, args.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_hf_round_trip_is_exact(tmp_path):
    args = tiny_args(n_kv_heads=2)
    model = build_model(args, seed=3)
    save_model_dir(model, tmp_path / "a", fmt="hf")
    back = load_model_dir(tmp_path / "a")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    save_model_dir(back, tmp_path / "b", fmt="hf")
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_hf_config_has_real_vocab_and_aquila_ids(tmp_path):
    import json

    args = tiny_args()
    save_model_dir(build_model(args, seed=0), tmp_path / "hf", fmt="hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == args.vocab_size
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        args.vocab_size - 2,
        args.vocab_size - 1,
        0,
    )
