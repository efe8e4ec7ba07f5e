"""`aquila convert --to hf`: AutoTokenizer + AutoModelForCausalLM + greedy generate give aquila's greedy text."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main
from tests.test_inference import ARGS, BOS, DEMO_TOKENIZER, single_thread

PROMPTS = ("北京在哪儿?", "The capital of France is")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def flagai_source(path):
    """FlagAI's files only: config.json, pytorch_model.bin, vocab.json, merges.txt."""
    save_model_dir(build_model(ARGS, seed=4), path, formats=("bin",))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DEMO_TOKENIZER / name, path)
    return path


def aquila_source(path):
    """Ours: model.safetensors and the full tokenizer set, tokenizer.json included."""
    save_model_dir(build_model(ARGS, seed=5), path, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("make_source", [flagai_source, aquila_source])
def test_hf_export_generates_aquilas_greedy_text(tmp_path, make_source):
    src = make_source(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    loader = aquila.AutoLoader("lm", model_dir=tmp_path, model_name="src")
    predictor = aquila.Predictor(loader.get_model(), loader.get_tokenizer())

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf_tok.model_max_length == ARGS.max_seq_len
    for text in PROMPTS:
        ids = hf_tok(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == [BOS, *loader.get_tokenizer().encode(text)]  # BOS [CLS], as aquila prompts
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=24, do_sample=False)
            ours = predictor.predict_generate_randomsample(text, out_max_length=24, temperature=0)
        theirs = hf_tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert len(ours) > 5 and theirs == ours


def test_hf_tokenizer_config_names_the_specials(tmp_path):
    src = flagai_source(tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 0
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("[CLS]", "</s>", "<|endoftext|>")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ARGS.vocab_size - 1, 0]  # aquila stops at EOS and at id 0
