"""llama.cpp itself (through llama-cpp-python) runs `aquila convert --to gguf` files: same tokens as aquila's tokenizer,
the same greedy tokens for f32, the same chat prompt through the file's chat template, and, for q8_0 / q4_0, the
logits of aquila's arithmetic on the quantized weights.

Tolerance for the quantized files, from the arithmetic. ggml multiplies a q8_0 or q4_0 matrix by activations it
first rounds to q8_0 itself (blocks of 32 along each row, one fp16 scale, as the weights) and sums each block's
integer products exactly. So the reference is aquila's fp32 model holding the file's dequantized weights, with each
linear's input rounded to q8_0 the same way (gguf.quants, ggml's reference rounding): its distance to the fp32 model,
EFFECT, is the quantization's own effect on the logits. llama.cpp differs from the reference by fp32 rounding
(~1e-7 relative) and by activations that sit within that rounding of a q8_0 rounding boundary and land on the other
level: with ~1e-7 relative noise and 127 levels that is ~3e-5 of all activations, so a forward over 40 positions can
hold one or two. One such flip in the output layer's input moves a logit row by step x w_out[:, i], about 20% of
EFFECT's norm for this model (step ~ max|x| / 127 ~ 0.02, |w_out| ~ 0.02 over 16008 rows, against EFFECT's
~3e-4 rms per logit). Hence: llama.cpp's logits are within 2 x max EFFECT of the fp32 model's (EFFECT plus a
worst-case flip, ~0.9 x max EFFECT), and nearer the reference than the fp32 model is, by half at least in norm
(what a wrong layout, type or scale cannot be: those move logits by EFFECT or more, away from the reference).
"""

import numpy as np
import pytest
import torch

from aquila.checkpoint import build_model, save_model_dir
from aquila.cli import main
from aquila.config import ModelArgs
from aquila.inference.sampling import SamplingParams
from aquila.tokenizer import load_tokenizer
from tests.test_inference import DEMO_TOKENIZER, single_thread

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (test extra; it compiles llama.cpp on first install)"
)
gguf = pytest.importorskip("gguf", reason="the gguf package (extra 'gguf') is not installed")

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=32, max_seq_len=128)
PROMPTS = ("北京在哪儿?", "The capital of France is", "  two  spaces,\ttabs\n\nand 12345 digits! 🎉 ok  ")
GGML_F32 = 0  # ggml_type for an f32 KV cache: llama.cpp's default f16 cache would round keys and values


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A seeded tiny model whose q and k are scaled up 8x: at FlagAI's init, attention is nearly uniform and the
    greedy tokens do not depend on the rotary (HF's rotate-half rows gave the same 32 tokens); here they do."""
    path = tmp_path_factory.mktemp("llamacpp") / "src"
    model = build_model(ARGS, seed=11)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    save_model_dir(model, path, formats=("safetensors",), tokenizer_from=DEMO_TOKENIZER)
    return path


@pytest.fixture(scope="module")
def ours(source):
    import aquila

    loader = aquila.AutoLoader("lm", model_dir=source.parent, model_name=source.name)
    return aquila.Predictor(loader.get_model(), loader.get_tokenizer())


def export(source, outtype):
    dst = source.parent / f"m-{outtype}.gguf"
    if not dst.exists():
        assert main(["convert", str(source), str(dst), "--to", "gguf", "--outtype", outtype]) == 0
    return dst


DEFAULT_MODEL_PARAMS = llama_cpp.llama_cpp.llama_model_default_params


def plain_buffers():
    """llama.cpp's model parameters without its extra buffer types (weights repacked for AMX or AVX-512 tiles).
    On a Xeon with AMX, llama.cpp 0.3.36 repacks q8_0/q4_0 weights for AMX and its first forward of this tiny shape
    (dim 64) crashes the process; the test checks the file's layout and ggml's reference arithmetic, which the plain
    buffers run on every CPU."""
    params = DEFAULT_MODEL_PARAMS()
    params.use_extra_bufts = False
    return params


def load(path, **kwargs):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=ARGS.max_seq_len,
            n_threads=1,
            n_batch=ARGS.max_seq_len,
            logits_all=True,
            type_k=GGML_F32,
            type_v=GGML_F32,
            verbose=False,
            **kwargs,
        )


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def f32(source):
    llm = load(export(source, "f32"))
    yield llm
    llm.close()


def test_llama_cpp_tokenizes_and_detokenizes_as_aquila(f32):
    tok = load_tokenizer(DEMO_TOKENIZER)
    for text in PROMPTS:
        ids = f32.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == [tok.token_start_id, *tok.encode(text)], text
        assert f32.detokenize(ids[1:]).decode() == text
    assert f32.token_bos() == tok.token_start_id and f32.token_eos() == tok.token_end_id


def test_f32_greedy_tokens_and_logits_are_aquilas(f32, ours):
    # fp32 against fp32: each logit is a chain of dot products of at most max(dim, ffn_dim) terms, so the summation
    # order alone may move it by that many roundings of the logits' size (measured: 40x below this).
    tol = max(ARGS.dim, ARGS.ffn_dim) * np.finfo(np.float32).eps
    for text in PROMPTS:
        prompt = ours.encode_prompt(text)
        completion = ours.complete(prompt, 32, SamplingParams(temperature=0))
        theirs = llama_greedy(f32, prompt, len(completion.token_ids))
        assert len(theirs) >= 16 and theirs == completion.token_ids, text
        ids = [*prompt, *completion.token_ids]
        fp32 = reference_logits(ours.model, ids, quantized_inputs=False)
        assert np.abs(llama_logits(f32, ids) - fp32).max() <= tol * np.abs(fp32).max(), text


def test_chat_template_in_the_file_gives_aquilas_chat_prompt(f32, ours):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = f32.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="[CLS]")
    for messages in (
        [{"role": "user", "content": "北京在哪儿?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    ):
        prompt = formatter(messages=messages).prompt
        assert f32.tokenize(prompt.encode(), add_bos=False, special=True) == ours.encode_chat(messages)


def test_chat_completion_through_the_files_template_is_aquilas_answer(f32, ours):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京在哪儿?"}]
    reply = f32.create_chat_completion(messages, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)
    answer = reply["choices"][0]["message"]["content"]
    assert answer.strip() == ours.predict_chat(messages, out_max_length=24, temperature=0) != ""


def reference_logits(model, ids: list[int], quantized_inputs: bool) -> np.ndarray:
    """aquila's fp32 forward; with quantized_inputs, each linear's input rounded to q8_0 first (ggml's vec_dot)."""
    q8 = gguf.GGMLQuantizationType.Q8_0

    def round_q8(_module, args):
        x = args[0].detach().numpy()
        rows = x.reshape(-1, x.shape[-1])
        return (torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, q8), q8)).reshape(x.shape),)

    hooks = []
    if quantized_inputs:
        hooks = [m.register_forward_pre_hook(round_q8) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]))["logits"][0].float().numpy()
    finally:
        for h in hooks:
            h.remove()


def dequantized_model(path):
    """aquila's model holding exactly the weights llama.cpp reads from the file."""
    from aquila.hf import hf_name

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, ARGS.n_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    model = build_model(ARGS, seed=0)
    state = {}
    for key, w in model.state_dict().items():
        t = tensors[names.get_name(hf_name(key), try_suffixes=(".weight",))]
        state[key] = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(w.shape))
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_logits_are_aquilas_arithmetic_on_the_quantized_weights(source, ours, outtype):
    path = export(source, outtype)
    llm = load(path)
    sim = dequantized_model(path)
    for text in PROMPTS:
        prompt = ours.encode_prompt(text)
        ids = [*prompt, *ours.complete(prompt, 32, SamplingParams(temperature=0)).token_ids]
        theirs = llama_logits(llm, ids)
        reference = reference_logits(sim, ids, quantized_inputs=True)
        fp32 = reference_logits(ours.model, ids, quantized_inputs=False)
        effect = reference - fp32
        assert np.abs(theirs - fp32).max() <= 2 * np.abs(effect).max(), text
        assert np.linalg.norm(theirs - reference) <= 0.5 * np.linalg.norm(effect), text
    llm.close()
