"""`aquila serve`: OpenAI-compatible and FlagAI endpoints, limits, errors (TestClient and a real uvicorn)."""

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from aquila.inference.sampling import SamplingParams
from aquila.serve.app import ServerLimits, create_app, iter_sse
from tests.test_inference import load_predictor, single_thread, write_checkpoint

LIMITS = ServerLimits(max_prompt_tokens=80, max_new_tokens=40, max_pending=2, queue_timeout_s=0.5, max_time_s=30)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_predictor(write_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def app(predictor):
    return create_app(predictor, LIMITS, model_name="aquila-test")


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "aquila-test"


def test_completions_plain_and_streamed(client, predictor):
    body = {"model": "aquila-test", "prompt": "Hello", "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = predictor.complete(predictor.encode_prompt("Hello"), 12, SamplingParams(temperature=0))
    assert data["choices"][0]["text"] == expected.text
    assert data["choices"][0]["finish_reason"] == expected.finish_reason
    assert data["usage"]["completion_tokens"] == len(expected.token_ids)
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = list(iter_sse(lines))
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason


def test_chat_completions_plain_and_streamed(client, predictor):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages.append({"role": "user", "content": [{"type": "text", "text": "how are you?"}]})
    body = {"messages": messages, "max_tokens": 15, "temperature": 0.7, "seed": 3}
    first = client.post("/v1/chat/completions", json=body).json()
    assert first == {**first, "object": "chat.completion"}
    assert client.post("/v1/chat/completions", json=body).json()["choices"] == first["choices"]  # seeded
    answer = first["choices"][0]["message"]["content"]
    history = messages[:2]
    assert answer == predictor.predict_chat("how are you?", history=history, out_max_length=15, temperature=0.7, top_k=0, top_p=1.0, seed=3)  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = list(iter_sse(r.iter_lines()))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings(client):
    body = {"prompt": "Hello", "max_tokens": 30, "temperature": 1.0, "seed": 1}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) > 3
    stop = full[2:4]
    cut = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_flagai_func_and_stream_func(client):
    payload = {"prompt": "北京是", "max_new_tokens": 10, "top_k_per_token": 20, "top_p": 0.9, "seed": 7}
    r = client.post("/func", json=json.dumps(payload))  # FlagAI's client: a JSON string holding the JSON
    assert r.status_code == 200, r.text
    out = r.json()
    c = out["completions"][0]
    assert c["model_in"] == "北京是" and len(c["tokens"]) == len(c["logprobs"]) == len(c["top_logprobs_dicts"])
    assert all(lp <= 0 for lp in c["logprobs"]) and out["input_length"] >= 2
    assert client.post("/func", json=payload).json()["completions"][0]["text"] == c["text"]  # plain object too
    chat = client.post("/func", json=json.dumps({**payload, "sft": True, "history": [["HUMAN", "hi"], ["ASSISTANT", "hello"]]}))  # fmt: skip
    assert chat.status_code == 200
    scored = client.post("/func", json=json.dumps({"prompt": "北京是中国", "max_new_tokens": 0})).json()
    ids = client.app.state.engine.predictor.encode_prompt("北京是中国")
    assert scored["completions"][0]["text"] == "" and len(scored["completions"][0]["logprobs"]) == len(ids) - 1
    with torch.no_grad():
        logits = client.app.state.engine.predictor.model(torch.tensor([ids]))["logits"][0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(scored["completions"][0]["logprobs"]), expected, atol=1e-5, rtol=0)
    r = client.post("/stream_func", json=json.dumps(payload))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == c["text"]  # same sampling, same seed


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt must be"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 41}, 400, "limit"),
        ("/v1/completions", {"prompt": "word " * 200}, 400, "the limit is 80"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
        ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
        ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "above the limit"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": True, "top_p": 0},
            400,
            "top_p",
        ),  # fmt: skip
        ("/func", b'"{broken"', 400, "not valid JSON"),
        ("/func", json.dumps(json.dumps({"max_new_tokens": 5})).encode(), 400, "prompt"),
        ("/stream_func", json.dumps(json.dumps({"prompt": "hi", "top_p": 2})).encode(), 400, "top_p"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, path, body, status, message):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


def test_busy_server_answers_429_and_503(client, app):
    engine = app.state.engine
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    engine.pending = LIMITS.max_pending
    try:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}).status_code == 429  # fmt: skip
    finally:
        engine.pending = 0
    with engine.lock:  # the model is busy for longer than queue_timeout_s
        assert client.post("/v1/completions", json=body).status_code == 503
        assert client.post("/v1/completions", json={**body, "stream": True}).status_code == 503
    assert engine.pending == 0
    assert client.post("/v1/completions", json=body).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(predictor):
    import uvicorn

    limits = ServerLimits(max_prompt_tokens=80, max_new_tokens=40, max_pending=2, queue_timeout_s=20, max_time_s=30)
    app = create_app(predictor, limits, model_name="aquila-test")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_real_server_with_concurrent_requests(live_server):
    app, url = live_server
    engine = app.state.engine
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
    results: list[int] = []
    engine.lock.acquire()  # hold the model so that requests pile up
    try:
        threads = [
            threading.Thread(
                target=lambda: results.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code)
            )  # fmt: skip
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while (engine.pending < 2 or 429 not in results) and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.lock.release()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [200, 200, 429]
    assert httpx.get(f"{url}/health").json()["pending"] == 0


def test_official_openai_client(live_server, predictor):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    _, url = live_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    c = client.completions.create(model="aquila-test", prompt="Hello", max_tokens=8, temperature=0)
    assert c.choices[0].text == predictor.predict_generate_randomsample("Hello", out_max_length=8, temperature=0)
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="aquila-test", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="aquila-test", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="aquila-test", prompt="Hello", max_tokens=8, top_p=0)


def test_serve_verb_rejects_bad_limits(tmp_path, capsys):
    from aquila.cli import main as cli_main

    assert cli_main(["serve", "--model-dir", str(tmp_path), "--max-pending", "0"]) == 2
    assert "--max-pending must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_verb_starts_uvicorn_on_loopback(predictor, tmp_path):
    import os
    import subprocess
    import sys

    ckpt = write_checkpoint(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(ckpt.parent), "--model-name", ckpt.name]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health == {**health, "status": "ok", "model": ckpt.name}, proc.poll()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
