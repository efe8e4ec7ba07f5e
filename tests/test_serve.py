"""`aquila serve`: OpenAI-compatible and FlagAI endpoints, limits, errors (TestClient and a real uvicorn)."""

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from aquila.inference.generate import DecodeBatch
from aquila.inference.sampling import SamplingParams
from aquila.serve.app import ServerLimits, create_app, iter_sse
from aquila.serve.engine import Engine, Job
from aquila.serve.frontend import Handoff
from aquila.serve.openai_routes import PieceEvents, sse
from tests.test_inference import load_predictor, single_thread, write_checkpoint

LIMITS = ServerLimits(
    max_prompt_tokens=80, max_new_tokens=40, max_batch=2, max_queue=1, queue_timeout_s=0.5, max_time_s=30
)


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
    ids = client.app.state.frontend.predictor.encode_prompt("北京是中国")
    assert scored["completions"][0]["text"] == "" and len(scored["completions"][0]["logprobs"]) == len(ids) - 1
    with torch.no_grad():
        logits = client.app.state.frontend.predictor.model(torch.tensor([ids]))["logits"][0]
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


@contextlib.contextmanager
def model_thread_blocked(frontend):
    """Hold the engine's thread (a call that waits), so that requests pile up in its queue."""
    release = threading.Event()
    frontend.engine.call(release.wait)
    try:
        yield
    finally:
        release.set()


def post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    t = threading.Thread(target=lambda: results.append(httpx.post(url, json=body, timeout=60)))
    t.start()
    return t


def wait_for(condition, timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_concurrent_requests_each_give_their_solo_output(predictor):
    """8 requests of mixed prompt lengths and budgets through 3 rows, long prompts read 4 tokens a step: each one's
    tokens and text are those it gives alone through Predictor."""
    texts = ["Hello", "北京是中国的首都，也是", "a", "The quick brown fox jumps over the lazy dog", "x y z", "天气", "Once upon a time there was", "1 2 3 4 5 6 7 8 9"]  # fmt: skip
    requests = [
        predictor.request(predictor.encode_prompt(t), 4 + 3 * i, SamplingParams(temperature=0))
        for i, t in enumerate(texts)
    ]
    requests[5] = predictor.request(requests[5].prompt, 20, SamplingParams(temperature=1.0, top_k=0), seed=9)
    expected = [predictor.generate([r])[0] for r in requests]
    events: list[list] = [[] for _ in requests]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(kind, value):
            events[i].append((kind, value))
            if kind in ("done", "error"):
                done.release()

        return emit

    engine = Engine(DecodeBatch(predictor.model, 3, 96, predictor.tokenizer, prefill_tokens=4, queue_timeout_s=60.0))
    try:
        for i, r in enumerate(requests):
            engine.submit(Job(r, emitter(i), 60.0))
            time.sleep(0.01 * (i % 3))  # some join while others run
        for _ in requests:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    for got, want in zip(events, expected):
        assert got[0] == ("started", None) and got[-1][0] == "done"
        completion = got[-1][1]
        assert completion.token_ids == want.token_ids and completion.finish_reason == want.finish_reason
        assert "".join(v for k, v in got if k == "piece") == completion.text == want.text


def test_handoff_delivers_a_steps_pieces_of_all_rows_with_one_wakeup_in_order(predictor):
    """The front's hand-off: every row's events of a step reach their asyncio queues with one
    `call_soon_threadsafe` per step; each request's events stay in order and give its solo output."""
    texts = ["Hello", "北京是中国的首都，也是", "The quick brown fox", "x y z"]
    requests = [predictor.request(predictor.encode_prompt(t), 10, SamplingParams(temperature=0)) for t in texts]
    expected = [predictor.generate([r])[0] for r in requests]

    async def run() -> tuple[list[list], list[int]]:
        loop, handoff, wakeups = asyncio.get_running_loop(), Handoff(), []
        real = loop.call_soon_threadsafe

        def counted(callback, events, *args):
            wakeups.append(len(events))
            return real(callback, events, *args)

        loop.call_soon_threadsafe = counted
        queues = [asyncio.Queue() for _ in requests]
        batch = DecodeBatch(predictor.model, len(requests), 96, predictor.tokenizer)
        engine = Engine(batch, flush=handoff.flush)
        try:
            with engine._wake:  # all admitted in the same step, so that they decode side by side
                for r, q in zip(requests, queues):
                    engine.waiting.append(Job(r, handoff.emitter(loop, q), 60.0))
                engine._wake.notify()
            events: list[list] = [[] for _ in requests]
            for got, q in zip(events, queues):
                while not got or got[-1][0] in ("started", "piece"):
                    got.append(await asyncio.wait_for(q.get(), 60))
        finally:
            engine.stop()
        return events, wakeups

    events, wakeups = asyncio.run(run())
    for got, want in zip(events, expected):
        assert got[0] == ("started", None) and got[-1][0] == "done"
        assert "".join(v for k, v in got if k == "piece") == got[-1][1].text == want.text
    assert sum(wakeups) == sum(len(got) for got in events)
    assert len(wakeups) <= 1 + max(len(w.token_ids) for w in expected)  # admission, then one per step
    assert max(wakeups) >= len(requests)  # a step's pieces of all rows in one hand-off


def test_handoff_flush_returns_once_the_loop_ran_the_woken_tasks_or_after_wait_s():
    """flush() (engine thread) returns after the event loop has put the events and run the task they woke; a
    blocked loop delays it by at most wait_s."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        handoff, queue, seen = Handoff(wait_s=5.0), asyncio.Queue(), []

        async def reader():
            seen.append(await queue.get())

        task = asyncio.run_coroutine_threadsafe(reader(), loop)
        time.sleep(0.05)  # the reader waits on the queue
        handoff.emitter(loop, queue)("piece", "a")
        t = time.monotonic()
        handoff.flush()
        assert seen == [("piece", "a")] and time.monotonic() - t < 2.0
        task.result(timeout=5)

        handoff.wait_s = 0.1
        blocked = threading.Event()
        loop.call_soon_threadsafe(lambda: blocked.wait(5))  # the loop is busy for a while
        handoff.emitter(loop, queue)("piece", "b")
        t = time.monotonic()
        handoff.flush()
        assert 0.09 < time.monotonic() - t < 2.0
        blocked.set()
        assert asyncio.run_coroutine_threadsafe(queue.get(), loop).result(timeout=5) == ("piece", "b")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_sse_stream_writes_a_steps_events_together(app, predictor):
    """At the ASGI level: the last step's events (piece, finish, usage, [DONE]) go out in one write; the events
    are the same as ever."""
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
    raw = json.dumps({**body, "stream_options": {"include_usage": True}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def run() -> list[str]:
        requests, writes = [{"type": "http.request", "body": raw, "more_body": False}], []

        async def receive():
            if requests:
                return requests.pop()
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                writes.append(message["body"].decode())

        await app(scope, receive, send)
        return writes

    writes = asyncio.run(run())
    expected = predictor.complete(predictor.encode_prompt("Hello"), 6, SamplingParams(temperature=0))
    assert writes[-1].count("data: ") >= 3 and len(writes) > 1  # pieces queued behind each other go out together
    n, p = len(expected.token_ids), expected.prompt_tokens
    assert writes[-1].endswith(f'"choices": [], "usage": {{"prompt_tokens": {p}, "completion_tokens": {n}, "total_tokens": {p + n}}}}}\n\ndata: [DONE]\n\n')  # fmt: skip
    chunks = list(iter_sse("".join(writes).split("\n")))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == expected.text


def test_piece_events_are_byte_for_byte_the_full_serialisation():
    base = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": 'my "model" é'}

    def text(t, reason):
        return {"index": 0, "text": t, "logprobs": None, "finish_reason": reason}

    def delta(t, reason):
        return {"index": 0, "delta": {"content": t} if t else {}, "logprobs": None, "finish_reason": reason}

    for choice in (text, delta):
        piece = PieceEvents(base, choice)
        assert piece.parts is not None
        for t in ("a", ' b\n"q"\\', "中文", "\x00", "\u2028", "", PieceEvents.MARK):
            assert piece(t) == sse({**base, "choices": [choice(t, None)]})


def test_time_limit_and_cancellation_end_a_running_request(predictor):
    events: dict[str, list] = {"slow": [], "gone": []}
    engine = Engine(DecodeBatch(predictor.model, 2, 96, predictor.tokenizer, queue_timeout_s=60.0))
    try:
        request = predictor.request(predictor.encode_prompt("Hello"), 80, SamplingParams(temperature=0))
        slow = Job(request, lambda kind, value: events["slow"].append((kind, value)), max_time_s=0.0)
        gone = Job(request, lambda kind, value: events["gone"].append((kind, value)), max_time_s=60.0)
        engine.submit(slow)
        engine.submit(gone)
        assert wait_for(lambda: ("started", None) in events["gone"])
        gone.cancel()
        assert wait_for(lambda: engine.counts == (0, 0))
    finally:
        engine.stop()
    for name, reason in (("slow", "length"), ("gone", "cancelled")):
        kind, completion = events[name][-1]
        assert kind == "done" and completion.finish_reason == reason and len(completion.token_ids) < 80
    assert engine.batch.pool.used_blocks == 0  # both returned their KV blocks


def test_a_failing_step_fails_its_requests_and_returns_their_blocks(predictor):
    events: list = []
    batch = DecodeBatch(predictor.model, 2, 96, predictor.tokenizer)
    calls = []
    real = batch.runner.forward

    def failing(*a, **k):  # the prompt is read, then the first decode step fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("device lost")
        return real(*a, **k)

    batch.runner.forward = failing
    engine = Engine(batch)
    try:
        request = predictor.request(predictor.encode_prompt("Hello"), 20, SamplingParams(temperature=0))
        engine.submit(Job(request, lambda kind, value: events.append((kind, value)), max_time_s=60.0))
        assert wait_for(lambda: events and events[-1][0] == "error")
        assert wait_for(lambda: engine.counts == (0, 0))
    finally:
        engine.stop()
    assert str(events[-1][1]) == "device lost"
    assert batch.pool.used_blocks == 0


def test_busy_server_answers_429_and_503(live_server):
    app, url = live_server  # max_batch 2 + max_queue 1; queue timeout 1 s
    frontend = app.state.frontend
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    results: list = []
    with model_thread_blocked(frontend):
        threads = [post_in_thread(f"{url}/v1/completions", body, results) for _ in range(3)]
        assert wait_for(lambda: frontend.engine.counts[1] == 3)
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(f"{url}/health").json() == {**httpx.get(f"{url}/health").json(), "running": 0, "waiting": 3}
        time.sleep(1.2)  # longer than the queue timeout
    for t in threads:
        t.join(timeout=60)
    assert sorted(r.status_code for r in results) == [503, 503, 503]
    assert all(r.headers["retry-after"] == "1" for r in results)
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.get(f"{url}/health").json()["waiting"] == 0


def test_client_disconnect_frees_the_row_within_a_step(live_server):
    app, url = live_server
    frontend = app.state.frontend
    body = {"prompt": "Hello", "max_tokens": 40, "temperature": 1.0, "top_k": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                break
        assert frontend.engine.counts[0] == 1
    assert wait_for(lambda: frontend.engine.counts == (0, 0), timeout=10)


def test_metrics_are_prometheus_text(live_server):
    _, url = live_server
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0}).status_code == 200  # fmt: skip
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["path"], s.labels["status"]): s.value for s in families["aquila_requests"].samples if s.name.endswith("_total")}  # fmt: skip
    assert requests[("/v1/completions", "200")] >= 1
    assert next(s.value for s in families["aquila_generated_tokens"].samples if s.name.endswith("_total")) >= 1
    ttft_count = next(s.value for s in families["aquila_time_to_first_token_seconds"].samples if s.name.endswith("_count"))  # fmt: skip
    assert ttft_count >= 1
    assert "aquila_inter_token_latency_seconds" in families and "aquila_queue_depth" in families


def test_metrics_report_kv_blocks_and_a_repeated_prompt_hits_the_prefix_cache(live_server):
    from prometheus_client.parser import text_string_to_metric_families

    app, url = live_server
    pool = app.state.frontend.engine.batch.pool

    def metrics() -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        return {s.name: s.value for f in families for s in f.samples}

    before = metrics()
    prompt = "the same long prompt, " * 4  # well over one block of 16 ids
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
    answers = [httpx.post(f"{url}/v1/completions", json=body, timeout=60).json() for _ in range(2)]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
    after = metrics()
    assert after["aquila_prefix_cache_hit_blocks_total"] - before.get("aquila_prefix_cache_hit_blocks_total", 0) >= 1
    assert after["aquila_kv_blocks_used"] == 0  # every block came back
    assert after["aquila_kv_blocks_free"] == pool.blocks and after["aquila_kv_blocks_cached"] >= 1


def test_requests_are_counted_by_route_and_status_streamed_or_not(app, client):
    registry = app.state.frontend.metrics.registry

    def count(path, status):
        return registry.get_sample_value("aquila_requests_total", {"path": path, "status": status}) or 0

    before = {k: count(*k) for k in (("/v1/completions", "200"), ("unmatched", "404"), ("/v1/completions", "400"))}
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    assert client.post("/v1/completions", json={**body, "stream": False}).status_code == 200
    assert client.get("/no/such/path").status_code == 404
    assert client.post("/v1/completions", json={"prompt": 3}).status_code == 400
    after = {k: count(*k) for k in before}
    assert [after[k] - before[k] for k in before] == [2, 1, 1]


def test_openai_error_shapes_for_unknown_model_path_method_and_history(client):
    r = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert r.json()["error"] == {**r.json()["error"], "code": "model_not_found", "type": "invalid_request_error"}
    assert "gpt-4" in r.json()["error"]["message"]
    assert (
        client.post("/v1/completions", json={"model": "aquila-test", "prompt": "x", "max_tokens": 1}).status_code == 200
    )
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error"} and path in r.json()["error"]["message"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    r = client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400
    assert (
        r.json()["error"]["message"]
        == "the last message must be the user's (the model answers it), not the assistant's"
    )


def test_client_leaving_mid_body_logs_no_traceback(live_server, caplog):
    _, url = live_server
    port = int(url.rsplit(":", 1)[1])
    with caplog.at_level("DEBUG"):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '
            )
            time.sleep(0.3)
        time.sleep(0.5)
        assert httpx.get(f"{url}/health").status_code == 200
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(predictor):
    import uvicorn

    limits = ServerLimits(max_prompt_tokens=80, max_new_tokens=40, max_batch=2, max_queue=1, queue_timeout_s=1.0, max_time_s=30)  # fmt: skip
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


def test_engine_reports_its_kv_cache_memory(app):
    frontend = app.state.frontend
    args = frontend.predictor.model.args
    per_position = args.n_layers * 2 * args.kv_heads * args.head_dim * 4  # fp32 k and v
    assert frontend.max_len == min(args.max_seq_len, LIMITS.max_prompt_tokens + LIMITS.max_new_tokens)
    pool = frontend.engine.batch.pool  # --max-batch whole contexts in blocks, and the scratch block
    assert pool.blocks == -(-LIMITS.max_batch * frontend.max_len // pool.block_size)
    assert frontend.cache_bytes() == (pool.blocks + 1) * pool.block_size * per_position


def test_serve_verb_rejects_bad_limits(tmp_path, capsys):
    from aquila.cli import main as cli_main

    assert cli_main(["serve", "--model-dir", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_verb_starts_uvicorn_on_loopback(predictor, tmp_path):
    import os
    import subprocess
    import sys

    ckpt = write_checkpoint(tmp_path)
    port = free_port()
    cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(ckpt.parent), "--model-name", ckpt.name]
    cmd += ["--served-model-name", "my-aquila"]
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
        assert health == {**health, "status": "ok", "model": "my-aquila", "max_batch": 16}, proc.poll()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "my-aquila"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"prompt": "hi", "max_tokens": 3, "model": "my-aquila"},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_main_packs_for_batches_and_freezes_the_loaded_objects(tmp_path, monkeypatch):
    """Before uvicorn starts: the batching server's linears are packed and everything loaded is frozen, so that
    the cyclic collector never walks it (a full collection stalled every stream for ~140 ms)."""
    import gc

    import uvicorn

    from aquila.inference.packing import PackedLinear, packing_available
    from aquila.serve.app import main

    ckpt = write_checkpoint(tmp_path)
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, frozen=gc.get_freeze_count()))
    try:
        assert main(["--model-dir", str(ckpt.parent), "--model-name", ckpt.name]) == 0
    finally:
        gc.unfreeze()
    frontend = started["app"].state.frontend
    try:
        assert started["frozen"] > 10_000
        packed = any(isinstance(m, PackedLinear) for m in frontend.predictor.model.modules())
        assert packed == packing_available()
    finally:
        frontend.close()
