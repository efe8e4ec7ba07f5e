"""AutoLoader + Predictor on tiny random checkpoints with the demo tokenizer."""

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.config import ModelArgs
from aquila.errors import AquilaError
from aquila.inference.generate import beam_search
from aquila.inference.predictor import Predictor, TextAssembler
from aquila.inference.sampling import SamplingParams

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "aquila" / "demo_tokenizer"
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=16, max_seq_len=96)
EOS, BOS = 16007, 16006


@contextlib.contextmanager
def single_thread():
    # Tiny matmuls on a shared machine: one thread avoids OpenMP spin-waiting against other processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


def write_checkpoint(root: Path, name: str = "aquila-7b", seed: int = 0, formats=("bin",)) -> Path:
    model = build_model(ARGS, seed=seed)
    save_model_dir(model, root / name, formats=formats)
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, root / name)
    return root / name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def load_predictor(ckpt: Path) -> aquila.Predictor:
    loader = aquila.AutoLoader("lm", model_dir=ckpt.parent, model_name=ckpt.name)
    return aquila.Predictor(loader.get_model(), loader.get_tokenizer())


@pytest.fixture(scope="module")
def predictor(ckpt):
    return load_predictor(ckpt)


def test_model_card_snippet_runs(ckpt):
    from aquila import AutoLoader, Predictor

    loader = AutoLoader("lm", model_dir=str(ckpt.parent), model_name="aquila-7b", use_cache=True)
    model = loader.get_model()
    tokenizer = loader.get_tokenizer()
    model.eval()
    model.half()
    predictor = Predictor(model, tokenizer)
    text = "汽车EDR是什么"
    out = predictor.predict_generate_randomsample(text, out_max_length=20, temperature=0)
    assert isinstance(out, str) and out
    assert next(model.parameters()).dtype == torch.float16


def test_prompt_starts_with_bos_and_truncates_from_the_left(predictor):
    ids = predictor.encode_prompt("hello world")
    assert ids[0] == BOS and ids[1:] == predictor.tokenizer.encode("hello world")
    long = predictor.encode_prompt("word " * 50, input_max_length=8)
    assert len(long) == 8 and long[0] == BOS and long[1:] == predictor.encode_prompt("word " * 50)[-7:]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate(tmp_path, predictor, penalty):
    save_model_dir(predictor.model, tmp_path / "hf", fmt="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    for text in ("The capital of France", "北京是中国的首都", "the the the the"):
        ids = predictor.encode_prompt(text)
        ours = predictor.complete(ids, 30, SamplingParams(temperature=0, repetition_penalty=penalty))
        with torch.no_grad():
            theirs = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=30,
                do_sample=False,
                repetition_penalty=penalty,
                eos_token_id=[EOS, 0],
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        if theirs and theirs[-1] in (EOS, 0):
            theirs = theirs[:-1]
        assert ours.token_ids == theirs
        assert ours.text == predictor.tokenizer.decode(theirs)


def test_batch_equals_one_by_one(predictor):
    texts = ["Hello there", "北京是中国的首都，", "a", "The quick brown fox jumps"]
    batch = predictor.predict_generate_batch(texts, out_max_length=15, temperature=0)
    alone = [predictor.predict_generate_randomsample(t, out_max_length=15, temperature=0) for t in texts]
    assert batch == alone
    prompts = [predictor.encode_prompt(t) for t in texts]
    rep = SamplingParams(temperature=0, repetition_penalty=1.5)
    together = generated_ids(predictor, prompts, 10, rep)
    assert together == [generated_ids(predictor, [p], 10, rep)[0] for p in prompts]


def generated_ids(predictor: Predictor, prompts, max_new: int, params: SamplingParams) -> list[list[int]]:
    return [c.token_ids for c in predictor.generate([predictor.request(p, max_new, params) for p in prompts])]


def test_streaming_pieces_join_to_the_text(predictor):
    for kwargs in (dict(temperature=0), dict(seed=3, temperature=1.0), dict(seed=5, stop=["e", "的"])):
        whole = predictor.predict_generate_randomsample("Once upon a time", out_max_length=25, **kwargs)
        pieces = list(predictor.predict_generate_stream("Once upon a time", out_max_length=25, **kwargs))
        assert "".join(pieces) == whole
        assert all(p and not p.endswith("\ufffd") for p in pieces)
        if "stop" in kwargs:
            assert "e" not in whole and "的" not in whole


def test_stream_never_splits_a_character(predictor):
    tok = predictor.tokenizer
    text = "naïve 中文 😀🎉 end"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    asm = TextAssembler(tok)
    pieces = [asm.push([i]) for i in ids] + [asm.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_prefix_is_held_back():
    class CharTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(i) for i in ids)

    asm = TextAssembler(CharTokenizer(), stop=["###"])
    out = [asm.push([ord(c)]) for c in "ab##c#"] + [asm.finish()]
    assert out == ["a", "b", "", "", "##c", "", "#"]
    asm = TextAssembler(CharTokenizer(), stop=["###"], strip=True)
    out = [asm.push([ord(c)]) for c in "  hi ##"] + [asm.push([ord("#")]), asm.push([ord("x")])]
    assert "".join(out) == "hi" and asm.stopped


def test_seed_makes_sampling_reproducible(predictor):
    a = predictor.predict_generate_randomsample("Hi", out_max_length=20, seed=11, top_k=0)
    b = predictor.predict_generate_randomsample("Hi", out_max_length=20, seed=11, top_k=0)
    c = predictor.predict_generate_randomsample("Hi", out_max_length=20, seed=12, top_k=0)
    assert a == b and a != c


def test_strong_repetition_penalty_never_repeats(predictor):
    ids = predictor.encode_prompt("the the the the")
    strong = generated_ids(predictor, [ids], 30, SamplingParams(temperature=0, repetition_penalty=1e4))[0]
    assert len(set(strong)) == len(strong) and not set(strong) & set(ids)


def test_beam_search(predictor):
    for text in ("Hello", "北京"):
        greedy = predictor.predict_generate_randomsample(text, out_max_length=12, temperature=0)
        assert predictor.predict_generate_beamsearch(text, out_max_length=12, beam_size=1) == greedy
    ids = predictor.encode_prompt("Hello")
    model = predictor.model

    def total_logprob(out):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))["logits"][0, len(ids) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None]).sum().item()

    greedy_ids = generated_ids(predictor, [ids], 8, SamplingParams(temperature=0))[0]
    beam_ids = beam_search(model, ids, 8, 4, predictor.stop_ids)
    assert beam_ids == beam_search(model, ids, 8, 4, predictor.stop_ids)
    assert len(beam_ids) == len(greedy_ids) == 8
    assert total_logprob(beam_ids) >= total_logprob(greedy_ids) - 1e-4


def test_chat_uses_the_sft_template(predictor):
    from aquila.chat_template import render_prompt

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = predictor.encode_chat("how are you?", history=history)
    expected = render_prompt(history + [{"role": "user", "content": "how are you?"}])
    assert ids == [BOS, *predictor.tokenizer.encode(expected)]
    assert predictor.encode_chat("x", history=[["HUMAN", "hi"], ["ASSISTANT", "hello"]]) == predictor.encode_chat(
        "x", history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    answer = predictor.predict_chat("how are you?", history=history, seed=0, out_max_length=20)
    assert answer == answer.strip() and "### Human:" not in answer
    assert "".join(predictor.predict_chat_stream("how are you?", history=history, seed=0, out_max_length=20)) == answer


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=""), "prompt is empty"),
        (dict(text="hi", top_p=0.0), "top_p"),
        (dict(text="hi", top_p=1.01), "top_p"),
        (dict(text="hi", temperature=-1.0), "temperature"),
        (dict(text="hi", out_max_length=0), "out_max_length"),
        (dict(text=None, prompts_tokens=[5] * 200), "max_seq_len"),
        (dict(text=None, prompts_tokens=[5, 99999]), "outside"),
        (dict(text="hi", input_max_length=1), "input_max_length"),
    ],
)
def test_bad_generation_inputs_are_clear_errors(predictor, kwargs, message):
    before = predictor.predict_generate_randomsample("still works", out_max_length=3, temperature=0)
    with pytest.raises(AquilaError, match=message):
        predictor.predict_generate_randomsample(**kwargs)
    # A rejected request leaves the predictor (model, KV cache) as it was: the same prompt, the same text.
    assert before and predictor.predict_generate_randomsample("still works", out_max_length=3, temperature=0) == before


def test_generation_stops_at_the_model_length(predictor):
    ids = [BOS] + [5] * 90
    out = predictor.complete(ids, 50, SamplingParams(temperature=0))
    assert len(out.token_ids) <= ARGS.max_seq_len - len(ids)
    assert out.finish_reason in ("stop", "length")


def test_autoloader_reads_safetensors_and_hf_dirs(tmp_path, predictor):
    ref = predictor.model.float()
    ids = torch.tensor([[BOS, 5, 6, 7]])
    with torch.no_grad():
        expected = ref(ids)["logits"]
    save_model_dir(ref, tmp_path / "ours", formats=("safetensors",))
    save_model_dir(ref, tmp_path / "hf", fmt="hf")
    for name in ("ours", "hf"):
        model = aquila.AutoLoader("lm", model_dir=tmp_path, model_name=name).get_model()
        with torch.no_grad():
            torch.testing.assert_close(model(ids)["logits"], expected, atol=1e-5, rtol=1e-5)
    model = aquila.AutoLoader("lm", model_dir=tmp_path, model_name="ours", torch_dtype="bfloat16").get_model()
    assert next(model.parameters()).dtype == torch.bfloat16


def test_autoloader_ignored_arguments_warn_and_are_not_kept(ckpt, capsys):
    """FlagAI's use_cache / max_batch_size are accepted; a value that would behave otherwise says so; neither is
    stored (nothing reads them: the KV cache is static and sized at generation time)."""
    loader = aquila.AutoLoader(
        model_dir=ckpt.parent, model_name=ckpt.name, use_cache=False, max_batch_size=4, low_cpu_mem_usage=True
    )
    err = capsys.readouterr().err
    assert err == "warning: AutoLoader: use_cache=False has no effect: generation always uses the static KV cache\n"
    assert not hasattr(loader, "use_cache") and not hasattr(loader, "max_batch_size")
    aquila.AutoLoader(model_dir=ckpt.parent, model_name=ckpt.name, use_cache=True, max_batch_size=4)
    assert capsys.readouterr().err == ""


def test_autoloader_errors(tmp_path, ckpt):
    root, name = ckpt.parent, ckpt.name
    cases = [
        (dict(task_name="seq2seq", model_dir=root, model_name=name), "task_name"),
        (dict(model_dir=root, model_name="nope"), rf"model directory not found .*models in {root}: {name}\)"),
        (dict(model_dir=tmp_path / "missing", model_name=name), "not found"),
        (dict(model_dir=root, model_name=name, flash_atten=True), "unknown argument"),
        (dict(model_dir=root, model_name=name, torch_dtype="int4"), "torch_dtype"),
        (dict(model_dir=root, model_name=name, quantize="int3"), "quantize"),
        (dict(model_dir=root, model_name=name, fp16=True, torch_dtype="bfloat16"), "conflicts"),
        (dict(model_dir=root, model_name=name, only_download_config=True), "never downloads"),
    ]
    for kwargs, message in cases:
        with pytest.raises(AquilaError, match=message):
            aquila.AutoLoader(**kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AquilaError, match="config.json"):
        aquila.AutoLoader(model_dir=tmp_path, model_name="empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ckpt / "config.json", broken)
    with pytest.raises(AquilaError, match="no weights"):
        aquila.AutoLoader(model_dir=tmp_path, model_name="broken")
    with pytest.raises(AquilaError, match="tokenizer"):
        shutil.copy(ckpt / "pytorch_model.bin", broken)
        aquila.AutoLoader(model_dir=tmp_path, model_name="broken").get_tokenizer()


def test_lora_adapter_is_merged_strictly(tmp_path, ckpt):
    from aquila.checkpoint import load_model_dir
    from aquila.train.lora import adapter_state, apply_lora, lora_config, merge_lora, write_adapter

    config = lora_config(r=4, alpha=8, dropout=0.0, targets=["wq", "wv"])
    model = load_model_dir(ckpt)
    apply_lora(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    (tmp_path / "adapter").mkdir()
    write_adapter(adapter_state(model.state_dict()), config, tmp_path / "adapter")
    ids = torch.tensor([[BOS, 10, 11, 12]])
    with torch.no_grad():
        expected = merge_lora(model)(ids)["logits"]
        base = load_model_dir(ckpt)(ids)["logits"]
    loaded = aquila.AutoLoader(model_dir=ckpt.parent, model_name=ckpt.name, adapter_dir=tmp_path / "adapter")
    with torch.no_grad():
        got = loaded.get_model()(ids)["logits"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, base)

    other = build_model(ModelArgs(**{**ARGS.to_dict(), "dim": 32, "n_heads": 2}), seed=0)
    apply_lora(other, config)
    (tmp_path / "wrong").mkdir()
    write_adapter(adapter_state(other.state_dict()), config, tmp_path / "wrong")
    with pytest.raises(AquilaError, match="adapter"):
        aquila.AutoLoader(model_dir=ckpt.parent, model_name=ckpt.name, adapter_dir=tmp_path / "wrong")
    with pytest.raises(AquilaError, match="adapter directory not found"):
        aquila.AutoLoader(model_dir=ckpt.parent, model_name=ckpt.name, adapter_dir=tmp_path / "none")


@pytest.mark.slow
def test_compiled_decode_matches_eager(predictor):
    ids = predictor.encode_prompt("compile me")
    eager = generated_ids(predictor, [ids], 12, SamplingParams(temperature=0))
    compiled = generated_ids(
        Predictor(predictor.model, predictor.tokenizer, compile=True), [ids], 12, SamplingParams(temperature=0)
    )
    assert compiled == eager


def test_import_aquila_is_light_and_exports_are_lazy():
    import subprocess
    import sys

    code = (
        "import sys, aquila; assert 'torch' not in sys.modules, 'torch imported'; "
        "from aquila import AutoLoader, Predictor, Tokenizer; assert 'torch' in sys.modules; "
        "print(AutoLoader.__module__, Predictor.__module__, Tokenizer.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["aquila.inference.loader", "aquila.inference.predictor", "aquila.tokenizer.bpe"]
    with pytest.raises(ImportError):
        from aquila import NoSuchThing  # noqa: F401
