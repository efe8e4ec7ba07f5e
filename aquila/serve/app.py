"""`aquila serve`: one model behind an HTTP API (FastAPI + uvicorn, 127.0.0.1 by default).

Endpoints:
- `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI-compatible (`max_tokens`, `temperature`, `top_p`,
  `stop`, `seed`, `stream` as server-sent events; extensions `top_k`, `repetition_penalty`); `GET /v1/models`.
- `POST /func`, `POST /stream_func`: FlagAI's Aquila server. The body is a JSON *string* holding the JSON object
  (FlagAI's client sends `json=json.dumps(d)`); a plain object is accepted too. `/func` with `max_new_tokens` 0
  scores the prompt (log-probabilities of its tokens), as FlagAI's did.
- `GET /health`.

One generation runs at a time (a lock); up to `max_pending` requests may be admitted (running or waiting), more
get 429; one that waits longer than `queue_timeout_s` gets 503. Bad input gets 400 (413 for a huge body) with
`{"error": {"message": ...}}`, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from aquila.chat_template import DEFAULT_SYSTEM, STOP_STRINGS
from aquila.errors import AquilaError
from aquila.inference.predictor import Completion, Predictor, TextStream
from aquila.inference.sampling import SamplingParams
from aquila.serve.page import add_chat_page

FLAGAI_STOPS = ("###", "[UNK]", "</s>")


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_tokens: int = 2048  # also capped by the model's max_seq_len - 1
    max_new_tokens: int = 1024
    max_pending: int = 4  # requests running or waiting; more get 429
    queue_timeout_s: float = 60.0  # waiting longer for the model gets 503
    max_time_s: float = 120.0  # a generation stops (finish_reason "length") after this long
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Engine:
    """The model, its lock, and admission control."""

    def __init__(self, predictor: Predictor, limits: ServerLimits, model_name: str) -> None:
        self.predictor, self.limits, self.model_name = predictor, limits, model_name
        self.lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.pending = 0

    def admit(self) -> None:
        with self._count_lock:
            if self.pending >= self.limits.max_pending:
                raise ApiError(429, f"too many requests: {self.pending} already admitted (limit {self.limits.max_pending})", "rate_limit_error")  # fmt: skip
            self.pending += 1

    def leave(self) -> None:
        with self._count_lock:
            self.pending -= 1

    def acquire(self) -> None:
        if not self.lock.acquire(timeout=self.limits.queue_timeout_s):
            raise ApiError(503, f"server busy: waited {self.limits.queue_timeout_s:g} s for the model", "server_error")

    def produce(self, stream: TextStream, emit: Callable[[str], None], cancelled: threading.Event) -> Completion:
        """Run a stream to its end (or cancellation, or the time limit), handing each piece to `emit`."""
        deadline = time.monotonic() + self.limits.max_time_s
        try:
            for piece in stream.steps():
                if piece:
                    emit(piece)
                if cancelled.is_set() or time.monotonic() > deadline:
                    break
        finally:
            stream.close()
        return stream.completion

    def run(self, make_stream: Callable[[], TextStream]) -> Completion:
        """Blocking: wait for the model, generate, release."""
        return self.call(lambda: self.produce(make_stream(), lambda piece: None, threading.Event()))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Blocking: wait for the model, run fn, release."""
        self.acquire()
        try:
            return fn()
        finally:
            self.lock.release()

    # --- request checks ---------------------------------------------------------------------------------------
    def check_prompt(self, ids: list[int]) -> list[int]:
        limit = min(self.limits.max_prompt_tokens, self.predictor.model.args.max_seq_len - 1)
        if len(ids) > limit:
            raise ApiError(400, f"prompt has {len(ids)} tokens; the limit is {limit}", "context_length_exceeded")
        return ids

    def check_max_tokens(self, value: Any, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"max_tokens must be an integer >= 1, got {value!r}")
        if value > self.limits.max_new_tokens:
            raise ApiError(400, f"max_tokens {value} is above this server's limit of {self.limits.max_new_tokens}")
        return value


# --- body parsing -----------------------------------------------------------------------------------------------
def parse_body(raw: bytes, limit: int, json_string_ok: bool = False) -> dict:
    if len(raw) > limit:
        raise ApiError(413, f"request body of {len(raw)} bytes is above the limit of {limit}")
    try:
        data = json.loads(raw)
        if json_string_ok and isinstance(data, str):
            data = json.loads(data)  # FlagAI: a JSON string containing the JSON object
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def field(body: dict, name: str, kinds: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"{name} must be {_kind_names(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise ApiError(400, f"{name} must be {_kind_names(kinds)}, got {value!r}")
    return value


def _kind_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list"}.get(k, k.__name__) for k in kinds)  # fmt: skip


def sampling_from(body: dict, top_k_key: str = "top_k", defaults: dict | None = None) -> SamplingParams:
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **(defaults or {})}
    params = dict(
        temperature=float(field(body, "temperature", (int, float), d["temperature"])),
        top_k=field(body, top_k_key, int, d["top_k"]),
        top_p=float(field(body, "top_p", (int, float), d["top_p"])),
        repetition_penalty=float(field(body, "repetition_penalty", (int, float), d["repetition_penalty"])),
    )
    return SamplingParams(**params)


def stop_from(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise ApiError(400, "stop must be a string or a list of at most 4 strings")


def seed_from(body: dict, default: int | None = None) -> int | None:
    return field(body, "seed", int, default)


def message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts")


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(predictor: Predictor, limits: ServerLimits | None = None, model_name: str = "aquila") -> FastAPI:
    engine = Engine(predictor, limits or ServerLimits(), model_name)
    app = FastAPI(title="aquila", version="1")
    app.state.engine = engine
    add_chat_page(app)
    tokenizer = predictor.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        body = {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(AquilaError)
    async def _aquila_error(request: Request, exc: AquilaError):
        return await _api_error(request, ApiError(400, str(exc)))

    async def read(request: Request, json_string_ok: bool = False) -> dict:
        return parse_body(await request.body(), engine.limits.max_body_bytes, json_string_ok)

    async def complete(make_stream: Callable[[], TextStream]) -> Completion:
        engine.admit()
        try:
            return await run_in_threadpool(engine.run, make_stream)
        finally:
            engine.leave()

    async def start_stream(make_stream: Callable[[], TextStream]) -> tuple[asyncio.Queue, threading.Event]:
        """Start generating in a worker thread; returns once the model is ours (or raises 429/503)."""
        engine.admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def worker() -> None:
            try:
                engine.acquire()
            except ApiError as e:
                engine.leave()
                put("error", e)
                return
            try:
                put("started", None)
                put("done", engine.produce(make_stream(), lambda piece: put("piece", piece), cancelled))
            except Exception as e:  # reported in-stream; the server keeps serving
                put("error", e)
            finally:
                engine.lock.release()
                engine.leave()

        threading.Thread(target=worker, daemon=True).start()
        kind, value = await queue.get()
        if kind == "error":
            raise value
        return queue, cancelled

    async def drain(queue: asyncio.Queue, cancelled: threading.Event) -> AsyncIterator[tuple[str, Any]]:
        try:
            while True:
                kind, value = await queue.get()
                yield kind, value
                if kind != "piece":
                    return
        finally:
            cancelled.set()  # client gone or stream over: let the worker stop and release the model

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def usage(c: Completion) -> dict:
        n = len(c.token_ids)
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}

    def error_event(value: Exception) -> dict:
        return {"error": {"message": str(value), "type": "server_error", "param": None, "code": None}}

    @app.get("/health")
    async def health():
        args = predictor.model.args
        return {"status": "ok", "model": model_name, "max_seq_len": args.max_seq_len, "pending": engine.pending}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "aquila"}]}

    def openai_common(body: dict) -> tuple[SamplingParams, tuple[str, ...], int | None, bool]:
        if field(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1")
        return sampling_from(body), stop_from(body), seed_from(body), bool(field(body, "stream", bool, False))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (or a list of one string)")
        params, stop, seed, stream = openai_common(body)
        ids = engine.check_prompt(predictor.encode_prompt(prompt))
        max_tokens = engine.check_max_tokens(body.get("max_tokens"), 16)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def make() -> TextStream:
            return predictor.stream(ids, max_tokens, params, seed, stop)

        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if not stream:
            c = await complete(make)
            return {**base, "choices": [choice(c.text, c.finish_reason)], "usage": usage(c)}
        queue, cancelled = await start_stream(make)

        async def events() -> AsyncIterator[str]:
            async for kind, value in drain(queue, cancelled):
                if kind == "piece":
                    yield sse({**base, "choices": [choice(value, None)]})
                elif kind == "done":
                    yield sse({**base, "choices": [choice("", value.finish_reason)]})
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage(value)})
                else:
                    yield sse(error_event(value))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list")
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object")
            msgs.append({"role": m.get("role"), "content": message_text(m.get("content"), i)})
        params, stop, seed, stream = openai_common(body)
        ids = engine.check_prompt(predictor.encode_chat(msgs))
        room = predictor.model.args.max_seq_len - len(ids)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = engine.check_max_tokens(limit, min(engine.limits.max_new_tokens, room))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stops = STOP_STRINGS + stop

        def make() -> TextStream:
            return predictor.stream(ids, max_tokens, params, seed, stops, strip=True)

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": model_name}
        chunk = {**base, "object": "chat.completion.chunk"}

        def delta(d: dict, reason: str | None) -> dict:
            return {**chunk, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}]}

        if not stream:
            c = await complete(make)
            message = {"role": "assistant", "content": c.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
            return {**base, "choices": [choice], "usage": usage(c)}
        queue, cancelled = await start_stream(make)

        async def events() -> AsyncIterator[str]:
            yield sse(delta({"role": "assistant", "content": ""}, None))
            async for kind, value in drain(queue, cancelled):
                if kind == "piece":
                    yield sse(delta({"content": value}, None))
                elif kind == "done":
                    yield sse(delta({}, value.finish_reason))
                    if include_usage:
                        yield sse({**chunk, "choices": [], "usage": usage(value)})
                else:
                    yield sse(error_event(value))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # --- FlagAI's /func and /stream_func ------------------------------------------------------------------------
    def flagai_request(body: dict, stream: bool) -> tuple[list[int], SamplingParams, int, int, tuple[str, ...], str]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string")
        defaults = {"temperature": 0.9, "top_p": 0.9 if stream else 0.95, "top_k": 20 if stream else 1000}
        params = sampling_from(body, "top_k_per_token", defaults)
        max_new = engine.check_max_tokens(body.get("max_new_tokens"), min(256, engine.limits.max_new_tokens))
        seed = seed_from(body, 1234)
        if field(body, "sft", bool, False):
            history = field(body, "history", list, [])
            ids = predictor.encode_chat(prompt, history=history, system=DEFAULT_SYSTEM)
            stops = FLAGAI_STOPS + STOP_STRINGS
        else:
            ids = predictor.encode_prompt(prompt)  # FlagAI: encode_plus without the final EOS
            stops = FLAGAI_STOPS
        return engine.check_prompt(ids), params, max_new, seed, stops, prompt

    @app.post("/func")
    async def func(request: Request):
        body = await read(request, json_string_ok=True)
        if body.get("max_new_tokens") == 0:
            return await score(body)
        ids, params, max_new, seed, stops, prompt = flagai_request(body, stream=False)

        def make() -> TextStream:
            return predictor.stream(ids, max_new, params, seed, stops, logprobs=True)

        c = await complete(make)
        text = c.text[1:] if c.text.startswith(" ") else c.text
        tokens = [tokenizer.decode([t]) for t in c.token_ids]
        lps = [round(x, 6) for x in (c.logprobs or [])]
        completion = {
            "text": text,
            "tokens": tokens,
            "logprobs": lps,
            "top_logprobs_dicts": [{t: lp} for t, lp in zip(tokens, lps)],
            "model_in": prompt,
        }
        return {"completions": [completion], "input_length": len(ids), "model_info": model_name}

    async def score(body: dict) -> dict:
        """FlagAI's scoring mode (max_new_tokens 0): log-probabilities of the prompt's own tokens."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string")
        ids = engine.check_prompt(predictor.encode_prompt(prompt))
        engine.admit()
        try:
            lps = await run_in_threadpool(engine.call, lambda: predictor.score(ids))
        finally:
            engine.leave()
        tokens = [tokenizer.decode([t]) for t in ids[1:]]
        lps = [round(x, 6) for x in lps]
        completion = {
            "text": "",
            "tokens": tokens,
            "logprobs": lps,
            "top_logprobs_dicts": [{t: lp} for t, lp in zip(tokens, lps)],
            "model_in": prompt,
        }
        return {"completions": [completion], "input_length": len(ids), "model_info": model_name}

    @app.post("/stream_func")
    async def stream_func(request: Request):
        body = await read(request, json_string_ok=True)
        ids, params, max_new, seed, stops, _ = flagai_request(body, stream=True)
        queue, cancelled = await start_stream(lambda: predictor.stream(ids, max_new, params, seed, stops))

        async def chunks() -> AsyncIterator[str]:
            first = True
            async for kind, value in drain(queue, cancelled):
                if kind == "piece":
                    if first and value.startswith(" "):
                        value = value[1:]
                    first = first and not value
                    if value:
                        yield value

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")

    return app


def iter_sse(lines: Iterator[str]) -> Iterator[dict]:
    """Parse `data:` lines of a server-sent event stream into objects (test and client helper)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def main(argv: list[str]) -> int:
    from aquila.inference.cli import add_model_args, load_predictor

    parser = argparse.ArgumentParser(prog="aquila serve", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    d = ServerLimits()
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--max-pending", type=int, default=d.max_pending, help="admitted requests; more get 429")
    parser.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s, help="seconds; then 503")
    parser.add_argument("--max-time", type=float, default=d.max_time_s, help="seconds per generation")
    args = parser.parse_args(argv)
    for name in ("max_prompt_tokens", "max_new_tokens", "max_pending", "queue_timeout", "max_time"):
        if getattr(args, name) <= 0:
            raise AquilaError(f"--{name.replace('_', '-')} must be positive")
    limits = ServerLimits(args.max_prompt_tokens, args.max_new_tokens, args.max_pending, args.queue_timeout, args.max_time)  # fmt: skip
    import uvicorn

    app = create_app(load_predictor(args), limits, model_name=args.model_name)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: reachable from other machines, without authentication")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
