"""`aquila serve`: log-probabilities on the OpenAI routes (completions `logprobs`/`echo`, chat `logprobs`/`top_logprobs`)
in vLLM's response shapes, and lm-eval's `local-completions` loglikelihood requests."""

import math

import pytest
import torch
from fastapi.testclient import TestClient

from aquila.inference.sampling import SamplingParams
from aquila.serve.app import ServerLimits, create_app, iter_sse
from tests.test_inference import load_predictor, single_thread, write_checkpoint

LIMITS = ServerLimits(max_prompt_tokens=60, max_new_tokens=30, max_batch=3, max_queue=2, max_time_s=30)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_predictor(write_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, LIMITS, model_name="aquila-test")) as c:
        yield c


def reference_logprobs(predictor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward."""
    with torch.no_grad():
        logits = predictor.model(torch.tensor([ids]))["logits"][0, :-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_echo_with_max_tokens_0_returns_the_prompts_logprobs_only(client, predictor):
    prompt = "北京是中国的首都"
    r = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = predictor.encode_prompt(prompt)
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert lp["tokens"] == [predictor.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing comes before the first
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), reference_logprobs(predictor, ids), atol=1e-5, rtol=0)  # fmt: skip
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[token] == value and 2 <= len(top) <= 3  # the two best and the prompt's own token
        assert max(top.values()) >= value
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_lm_eval_local_completions_loglikelihood_requests(client, predictor):
    """lm-eval's payload (token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0), read by lm-eval's own
    parser: the continuation's summed log-probability and whether it is the greedy one."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    context = predictor.encode_prompt("The capital of France is")
    greedy = predictor.complete(context, 3, SamplingParams(temperature=0)).token_ids
    other = [t for t in range(100, 103) if t != greedy[0]][:2]
    inputs = [context + greedy[:2], context + other]
    body = {"model": "aquila-test", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for c, ids in zip(out["choices"], inputs):
        assert len(c["logprobs"]["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
    parsed = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[len(context)] * 2)
    for (total, is_greedy), ids, want_greedy in zip(parsed, inputs, (True, False)):
        want = float(reference_logprobs(predictor, ids)[len(context) - 1 :].sum())
        assert math.isclose(total, want, abs_tol=1e-4 * len(ids)) and is_greedy == want_greedy
    string = client.post("/v1/completions", json={**body, "prompt": "The capital of France is", "max_tokens": 0})
    assert string.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(out["choices"][0]["logprobs"]["token_logprobs"][1 : len(context)], abs=1e-5)  # fmt: skip


def test_completion_logprobs_of_generated_tokens(client, predictor):
    body = {"prompt": "Hello", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    want = predictor.complete(predictor.encode_prompt("Hello"), 8, SamplingParams(temperature=0), logprobs=True)
    assert lp["tokens"] == [predictor.tokenizer.decode([t]) for t in want.token_ids]
    # The server's row decodes in a cache of --max-batch rows, the predictor's alone: attention sums in another order
    # (tests/test_packing.py), so each logit may differ by ~eps * sqrt(terms) * magnitude (~1e-6 here) and a log-prob
    # (logit - log-sum-exp) by twice that; 1e-6 was one ulp of a log-prob near -10.
    assert lp["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value == max(top.values()) and len(top) <= 3  # greedy: the chosen is the best
    assert r.json()["choices"][0]["text"] == want.text


def test_chat_logprobs_and_top_logprobs(client, predictor):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    data = r.json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"] > 0
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        tops = entry["top_logprobs"]
        assert len(tops) == 2 and tops[0]["logprob"] >= tops[1]["logprob"]
        assert tops[0]["token"] == entry["token"] and tops[0]["logprob"] == entry["logprob"] <= 0  # greedy
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["logprobs"] is None and plain["message"] == data["choices"][0]["message"]


def streamed(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return list(iter_sse(r.iter_lines()))


def test_streamed_logprobs_are_the_plain_answers_in_pieces(client):
    """Each chunk carries the log-probabilities of the tokens since the previous one: together they are the plain
    answer's, text offsets running on."""
    body = {"prompt": "北京是中国的首都", "max_tokens": 12, "temperature": 0.8, "seed": 5, "logprobs": 2}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = [c["choices"][0] for c in streamed(client, "/v1/completions", body)]
    assert "".join(c["text"] for c in chunks) == plain["text"]
    joined = {k: [x for c in chunks if c["logprobs"] for x in c["logprobs"][k]] for k in plain["logprobs"]}
    assert joined == plain["logprobs"] and sum(c["logprobs"] is not None for c in chunks) > 2  # spread over chunks

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 1}  # fmt: skip
    plain = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
    chunks = [c["choices"][0] for c in streamed(client, "/v1/chat/completions", chat)]
    assert [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]] == plain


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs must be an integer in [0, 20]"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs must be an integer"),
        ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo must be true or false"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, "echo: streaming"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "prompt: streaming"),
        ("/v1/completions", {"prompt": [[1, 2], "x", [3]] * 2}, "prompt: 6 prompts"),
        ("/v1/completions", {"prompt": [[1, "a"]]}, "prompt[0]"),
        ("/v1/completions", {"prompt": [5, 99999]}, "outside"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs"),
    ],
)
def test_bad_logprob_requests_get_400_naming_the_field(client, path, body, message):
    r = client.post(path, json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
