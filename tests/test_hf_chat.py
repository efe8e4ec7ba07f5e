"""The HF export's chat template: `apply_chat_template` gives aquila's chat prompt ids, and a greedy chat answer from
`AutoModelForCausalLM` is aquila's (same ids, same text once the answer's framing " ...\\n" is stripped, as aquila's
chat does)."""

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

import aquila
from aquila.chat_template import render_for_training
from aquila.cli import main
from aquila.inference.sampling import SamplingParams
from tests.test_hf_export import aquila_source
from tests.test_inference import single_thread

CONVERSATIONS = {
    "single": [{"role": "user", "content": "北京在哪儿?"}],
    "single, system": [{"role": "system", "content": "  Answer briefly. "}, {"role": "user", "content": "Hi there\n"}],
    "multi": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4. "},
        {"role": "user", "content": "天气怎么样"},
    ],
    "multi, system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfchat")
    aquila_source(root / "src")
    assert main(["convert", str(root / "src"), str(root / "hf"), "--to", "hf"]) == 0
    loader = aquila.AutoLoader("lm", model_dir=root, model_name="src")
    predictor = aquila.Predictor(loader.get_model(), loader.get_tokenizer())
    return predictor, AutoTokenizer.from_pretrained(root / "hf"), root / "hf"


def hf_prompt(hf_tok, messages) -> list[int]:
    return hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_apply_chat_template_gives_aquilas_chat_prompt_ids(exported, name):
    predictor, hf_tok, _ = exported
    messages = CONVERSATIONS[name]
    assert hf_prompt(hf_tok, messages) == predictor.encode_chat(messages)
    # Without the generation prompt, a finished conversation renders as SFT trains on it (after the BOS).
    finished = [*messages, {"role": "assistant", "content": "Done."}]
    text = hf_tok.apply_chat_template(finished, tokenize=False)
    assert text == hf_tok.bos_token + render_for_training(finished)[0]


def test_special_token_text_in_a_message_is_a_special_id_as_with_split_special_tokens(exported):
    """HF turns "</s>" typed in a message into the EOS id: aquila's ids with split_special_tokens=True (FlagAI after
    Aug 2023); aquila's default encodes it as text."""
    predictor, hf_tok, _ = exported
    messages = [{"role": "user", "content": "what does </s> or [CLS] mean?"}]
    default = predictor.encode_chat(messages)
    predictor.tokenizer.split_special_tokens = True
    try:
        assert hf_prompt(hf_tok, messages) == predictor.encode_chat(messages) != default
    finally:
        predictor.tokenizer.split_special_tokens = False


def test_template_rejects_what_aquila_rejects(exported):
    _, hf_tok, _ = exported
    bad = {
        "is an empty turn": [{"role": "user", "content": "  "}],
        "a system message may only come first": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
        "unknown role bot": [{"role": "bot", "content": "a"}],
        "the last message must be the user's": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
        ],
    }
    for message, messages in bad.items():
        with pytest.raises(TemplateError, match=message):
            hf_prompt(hf_tok, messages)


@pytest.mark.parametrize("name", ["single", "multi, system"])
def test_greedy_chat_answer_is_aquilas(exported, name):
    predictor, hf_tok, hf_dir = exported
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    messages = CONVERSATIONS[name]
    ids = hf_prompt(hf_tok, messages)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    ours = predictor.complete(ids, 24, SamplingParams(temperature=0))
    stopped = out[-1:] if ours.finish_reason == "stop" else []  # HF keeps the stop id that ends generation
    assert out == [*ours.token_ids, *stopped]
    theirs = hf_tok.decode(out, skip_special_tokens=True)
    assert theirs == ours.text  # the same decode, leading space and all
    # aquila's chat strips the answer part " text\n" (chat_template.render_answer); so does an HF user
    assert theirs.strip() == predictor.predict_chat(messages, out_max_length=24, temperature=0) != ""
