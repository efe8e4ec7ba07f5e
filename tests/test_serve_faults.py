"""`aquila serve` under hostile or careless clients (issue 21's server items, 20.11's request checks): slow and
idle connections, oversized bodies, clients that leave, bodies that used to give 500s, the CLI's bad port.

The resource tests use real sockets against a real uvicorn on 127.0.0.1 (a free port), with the settings
`aquila serve` uses (`server_options`), bounded in connection count and time."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from aquila.inference.sampling import SamplingParams
from aquila.serve.app import ServerLimits, create_app, iter_sse, server_options
from tests.test_inference import load_predictor, single_thread, write_checkpoint
from tests.test_serve import free_port, model_thread_blocked, wait_for

LIMITS = ServerLimits(
    max_prompt_tokens=80, max_new_tokens=40, max_batch=2, max_queue=1, queue_timeout_s=30, max_time_s=30,
    read_timeout_s=1.0, max_connections=24,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load_predictor(write_checkpoint(tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, LIMITS, model_name="aquila-test"), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def server(predictor):
    import uvicorn

    app = create_app(predictor, LIMITS, model_name="aquila-test")
    port = free_port()
    options = {**server_options(LIMITS, "127.0.0.1", port), "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30)
    yield app, port
    server.should_exit = True
    thread.join(timeout=10)


def finished(app, reason: str) -> float:
    registry = app.state.frontend.metrics.registry
    return registry.get_sample_value("aquila_finished_requests_total", {"reason": reason}) or 0


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- 21.8: connections and read times ------------------------------------------------------------------------------
def test_slow_headers_are_cut_at_the_read_timeout_and_connections_are_capped(server):
    """Slowloris: 40 connections that send half a request head and stall (the cap is 24 + 8): all are closed
    within the 1 s head deadline (the ones over the cap at once), and the server answers afterwards."""
    _, port = server
    socks = []
    t0 = time.monotonic()
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        socks.append(s)
    try:
        assert all(closed_by_server(s, timeout=5) for s in socks)
        assert time.monotonic() - t0 < 8
    finally:
        for s in socks:
            s.close()
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


def test_a_kept_alive_connection_gets_the_head_deadline_again(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request's head, a byte at a time
        for _ in range(3):
            time.sleep(0.4)
            try:
                s.sendall(b"s")
            except OSError:
                break
        assert closed_by_server(s, timeout=3)


@pytest.mark.slow
def test_more_connections_than_files_keep_health_answering_and_the_log_small(tmp_path):
    """300 stalled connections against `aquila serve` run under a 256-file limit: /health answers once the head
    deadline has passed, and the log stays small (no line per failed accept)."""
    import resource

    ckpt = write_checkpoint(tmp_path)
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(ckpt.parent), "--model-name", ckpt.name]
    cmd += ["--port", str(port), "--read-timeout", "2", "--max-batch", "2"]

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit_files)
    socks = []
    try:
        assert wait_for(lambda: _health(port, 1) or proc.poll() is not None, timeout=120) and proc.poll() is None
        for _ in range(300):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(b"GET /health HTTP/1.1\r\n")
                socks.append(s)
            except OSError:
                pass
        assert wait_for(lambda: _health(port, 1), timeout=15)
        time.sleep(3)
        assert log.stat().st_size < 50_000, log.read_text()[-2000:]
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_failed_accepts_are_logged_once_per_interval():
    import logging

    from aquila.serve.connections import OncePerInterval

    f = OncePerInterval("socket.accept() out of system resource", interval_s=60)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (OSError, OSError(24, "x"), None))

    passed = [r for r in (record("socket.accept() out of system resource\nsocket: ...") for _ in range(1000)) if f.filter(r)]  # fmt: skip
    assert len(passed) == 1 and passed[0].exc_info is None and f.dropped == 999
    assert f.filter(record("another error"))


def _health(port: int, timeout: float) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


# --- 21.9: the body limit stops the reading ----------------------------------------------------------------------
def test_an_oversized_chunked_body_is_refused_before_it_is_all_sent(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        chunk = b"x" * 65536
        for _ in range(18):  # 1.125 MiB of a body that would go on (no final chunk)
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()


def test_a_declared_length_over_the_limit_is_refused_at_once(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /func HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{")  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


def test_a_body_that_stalls_gets_408(server):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt": ')  # fmt: skip
        assert s.recv(4096).startswith(b"HTTP/1.1 408")


# --- 21.10: clients that leave free their capacity -----------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_queued_clients_that_leave_stop_counting_and_never_run(server, stream):
    """While the model's thread is busy, 3 clients queue (the server's whole capacity) and hang up: they stop
    counting as waiting at once, a live client is admitted rather than refused with 429, and the ones that left
    never generate a token."""
    app, port = server
    frontend = app.state.frontend
    body = json.dumps({"prompt": "Hello", "max_tokens": 30, "temperature": 0, "stream": stream}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)  # fmt: skip
    cancelled = finished(app, "cancelled")
    tokens = frontend.metrics.registry.get_sample_value("aquila_generated_tokens_total") or 0
    with model_thread_blocked(frontend):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        for s in socks:
            s.sendall(request)
        assert wait_for(lambda: frontend.engine.counts[1] == 3, timeout=10)
        for s in socks:
            s.close()
        assert wait_for(lambda: frontend.engine.counts[1] == 0, timeout=5)
        results: list = []
        live = threading.Thread(target=lambda: results.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0}, timeout=60)))  # fmt: skip
        live.start()
        assert wait_for(lambda: frontend.engine.counts[1] == 1, timeout=10)
    live.join(timeout=60)
    assert results[0].status_code == 200
    assert wait_for(lambda: finished(app, "cancelled") == cancelled + 3, timeout=10)
    generated = frontend.metrics.registry.get_sample_value("aquila_generated_tokens_total") - tokens
    assert generated == results[0].json()["usage"]["completion_tokens"]  # only the live client's


def test_a_running_plain_request_whose_client_left_frees_its_row(server, monkeypatch):
    """A non-streaming request ends (finish "cancelled") within a step of its client hanging up."""
    app, port = server
    frontend = app.state.frontend
    real_execute = frontend.engine.batch.execute

    def slow_execute(plan):
        time.sleep(0.05)  # 40 tokens take 2 s: long enough to hang up in the middle
        return real_execute(plan)

    monkeypatch.setattr(frontend.engine.batch, "execute", slow_execute)
    cancelled = finished(app, "cancelled")
    body = json.dumps({"prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "top_k": 0}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert wait_for(lambda: frontend.engine.counts[0] == 1, timeout=10)
    assert wait_for(lambda: frontend.engine.counts == (0, 0), timeout=1.5)
    assert finished(app, "cancelled") == cancelled + 1
    assert frontend.engine.batch.pool.used_blocks == 0  # its KV blocks went back with it


def test_metrics_count_cancelled_streams_apart_from_completed_ones(server):
    app, port = server
    url = f"http://127.0.0.1:{port}"
    before = {r: finished(app, r) for r in ("cancelled", "length", "stop")}
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0}).status_code == 200  # fmt: skip
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "top_k": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))
    assert wait_for(lambda: finished(app, "cancelled") == before["cancelled"] + 1, timeout=10)
    done = sum(finished(app, r) - before[r] for r in ("length", "stop"))
    assert done == 1
    text = httpx.get(f"{url}/metrics").text
    assert 'aquila_finished_requests_total{reason="cancelled"}' in text


# --- 21.11: bodies that used to give 500s; 5xx counted; the schema -----------------------------------------------
DEEP = b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
BIG_INT = b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize(
    "path, body, message",
    [
        (
            "/v1/completions",
            {"prompt": "hi", "stream": True, "stream_options": "yes"},
            "stream_options must be an object",
        ),  # fmt: skip
        (
            "/v1/completions",
            {"prompt": "hi", "stream_options": {"include_usage": "y"}},
            "stream_options.include_usage",
        ),  # fmt: skip
        ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed must be an integer in [-2**63, 2**64)"),
        ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ("/func", {"prompt": "hi", "seed": 2**70}, "seed"),
        ("/v1/completions", DEEP, "nested too deeply"),
        ("/v1/completions", BIG_INT, "not valid JSON"),
        ("/v1/completions", {"prompt": "hi", "temperature": 1e-300}, "temperature must be 0 (greedy) or"),
        ("/v1/completions", {"prompt": "hi", "temperature": 1e-300, "stream": True}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "temperature": 10**400}, "temperature must be a finite number"),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 5e-324}, "repetition_penalty must be in"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e7},
            "repetition_penalty",
        ),  # fmt: skip
        ("/func", b'{"prompt": "a\\ud800b", "max_new_tokens": 3}', "prompt is not valid Unicode"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages[0].content is not valid Unicode",
        ),  # fmt: skip
        ("/func", {"prompt": "hi", "max_new_tokens": False}, "max_new_tokens must be an integer"),
        ("/func", {"prompt": "hi", "max_new_tokens": 0.0}, "max_new_tokens must be an integer"),
    ],
)
def test_bodies_that_gave_500_get_400_naming_the_field(client, path, body, message):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == 400, r.text[:500]
    assert message in r.json()["error"]["message"]


def test_server_errors_are_counted_and_in_openai_shape(client, monkeypatch):
    frontend = client.app.state.frontend
    registry = frontend.metrics.registry

    def boom():
        raise RuntimeError("bug")

    before = registry.get_sample_value("aquila_requests_total", {"path": "/health", "status": "500"}) or 0
    monkeypatch.setattr(frontend, "health", boom)
    r = client.get("/health")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert registry.get_sample_value("aquila_requests_total", {"path": "/health", "status": "500"}) == before + 1


def test_openapi_describes_the_request_bodies_errors_and_metrics(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages"), ("/func", "prompt")):
        post = paths[path]["post"]
        schema = post["requestBody"]["content"]["application/json"]["schema"]
        assert field in schema["properties"] and field in schema["required"]
        assert {"400", "413", "429"} <= set(post["responses"])
    assert "logprobs" in paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]  # fmt: skip
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "ErrorResponse" in spec["components"]["schemas"]


# --- 20.11: unsupported options, penalties, the context ----------------------------------------------------------
@pytest.mark.parametrize(
    "path, extra, message",
    [
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools: not supported"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format: not supported"),
        ("/v1/completions", {"logit_bias": {"5": 100}}, "logit_bias: not supported"),
        ("/v1/completions", {"best_of": 3}, "best_of: not supported"),
        ("/v1/completions", {"n": 2}, "n must be 1"),
        ("/v1/completions", {"temprature": 0}, "temprature: unknown field"),
        ("/v1/chat/completions", {"echo": True}, "echo: unknown field"),
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty must be a number in [-2, 2]"),
    ],
)
def test_unsupported_and_unknown_fields_get_400_naming_them(client, path, extra, message):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(path, json={**base, "max_tokens": 2, **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    name = next(iter(extra))
    if "not supported" in message or "unknown" in message:
        assert r.json()["error"]["param"] == name


def test_options_that_ask_for_nothing_are_accepted(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [], "logit_bias": {}}
    body |= {"response_format": {"type": "text"}, "user": "someone", "n": 1, "tool_choice": None}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def greedy_with_penalties(predictor, ids: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """OpenAI's definition, step by step over a full forward: logit - frequency * count - presence * [count > 0]."""
    out: list[int] = []
    counts = torch.zeros(predictor.model.args.vocab_size)
    for _ in range(n):
        with torch.no_grad():
            logits = predictor.model(torch.tensor([ids + out]))["logits"][0, -1]
        token = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
        if token in predictor.stop_ids:
            break
        out.append(token)
        counts[token] += 1
    return out


def test_presence_and_frequency_penalties(client, predictor):
    """A negative presence penalty (repeat once) against a positive frequency penalty (not more): the server's
    greedy tokens are those of OpenAI's definition applied step by step."""
    ids = predictor.encode_prompt("the the the")
    plain = predictor.complete(ids, 20, SamplingParams(temperature=0)).token_ids
    body = {"prompt": ids, "max_tokens": 20, "temperature": 0, "presence_penalty": -0.5, "frequency_penalty": 0.3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    want = greedy_with_penalties(predictor, ids, 20, -0.5, 0.3)
    assert want != plain and len(set(want)) < len(want)
    assert r.json()["choices"][0]["text"] == predictor.tokenizer.decode(want)
    assert r.json()["usage"]["completion_tokens"] == len(want)


def test_prompt_plus_max_tokens_beyond_the_context_is_400(client, predictor):
    frontend = client.app.state.frontend  # max_len = min(max_seq_len 96, 80 + 40)
    ids = [5] * 60
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 40})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"is above this server's context of {frontend.max_len} tokens" in r.json()["error"]["message"]
    chat = {"messages": [{"role": "user", "content": "word " * 50}], "max_tokens": 40}
    assert client.post("/v1/chat/completions", json=chat).json()["error"]["code"] == "context_length_exceeded"
    limits = ServerLimits(max_prompt_tokens=200, max_new_tokens=40, max_batch=1)  # prompts may fill the context
    with TestClient(create_app(predictor, limits)) as long_prompts:
        ok = long_prompts.post("/v1/completions", json={"prompt": [5] * 93, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3  # the default 16, cut to fit


def test_streamed_answers_are_unchanged_by_the_checks(client, predictor):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = list(iter_sse(r.iter_lines()))
    expected = predictor.complete(predictor.encode_prompt("Hello"), 6, SamplingParams(temperature=0))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)


# --- 21.12: the CLI's port ---------------------------------------------------------------------------------------
def test_serve_rejects_a_port_out_of_range_in_one_line(tmp_path, capsys, monkeypatch):
    import uvicorn

    from aquila.cli import main as cli_main

    ckpt = write_checkpoint(tmp_path)
    runs: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append(kw) or app.state.frontend.close())
    assert cli_main(["serve", "--model-dir", str(ckpt.parent), "--model-name", ckpt.name, "--port", "99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --port must be in 0..65535, got 99999"] and not runs
