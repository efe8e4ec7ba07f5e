"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (plain or server-sent events), `/v1/models`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from aquila.chat_template import STOP_STRINGS
from aquila.inference.generate import Completion
from aquila.serve.engine import Engine
from aquila.serve.errors import ApiError, error_body
from aquila.serve.parsing import field, message_text, parse_body, sampling_from, stop_from

ROLES = ("system", "user", "assistant")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class PieceEvents:
    """`sse({**base, "choices": [choice(text, None)]})` for a text piece, byte for byte, without building and
    serialising the whole object per token: the constant parts around the text are serialised once."""

    MARK = "\x00piece\x00"

    def __init__(self, base: dict, choice: Callable[[str, str | None], dict]) -> None:
        self.base, self.choice = base, choice
        parts = sse({**base, "choices": [choice(self.MARK, None)]}).split(json.dumps(self.MARK))
        self.parts = parts if len(parts) == 2 else None  # the mark elsewhere too (never in practice): no shortcut

    def __call__(self, text: str) -> str:
        if self.parts is None or not text:  # chat's delta is {} for empty text: another shape
            return sse({**self.base, "choices": [self.choice(text, None)]})
        return self.parts[0] + json.dumps(text, ensure_ascii=False) + self.parts[1]


def usage(c: Completion) -> dict:
    n = len(c.token_ids)
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": n, "total_tokens": c.prompt_tokens + n}


def chat_messages_from(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object")
        out.append({"role": m.get("role"), "content": message_text(m.get("content"), i)})
    last = out[-1]["role"]
    if last != "user" and last in ROLES:
        raise ApiError(400, f"the last message must be the user's (the model answers it), not the {last}'s")
    return out


async def stream_events(
    engine: Engine, request, choice: Callable[[str, str | None], dict], base: dict, include_usage: bool, first=None
) -> StreamingResponse:
    """One SSE generator for completions and chat: a chunk per text piece, a final chunk with the finish reason.
    The events one scheduler step handed over go out in one write (the last piece, the finish, usage, [DONE])."""
    job, queue = await engine.start(request)
    piece = PieceEvents(base, choice)

    async def events() -> AsyncIterator[str]:
        if first is not None:
            yield sse({**base, "choices": [first]})
        out: list[str] = []
        async for kind, value in engine.events(job, queue):
            if kind == "piece":
                out.append(piece(value))
                if queue.empty():
                    yield "".join(out)
                    out.clear()
            elif kind == "done":
                out.append(sse({**base, "choices": [choice("", value.finish_reason)]}))
                if include_usage:
                    out.append(sse({**base, "choices": [], "usage": usage(value)}))
            else:
                out.append(sse(error_body(str(value), "server_error")))
        yield "".join(out) + "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def add_openai_routes(app: FastAPI, engine: Engine) -> None:
    predictor = engine.predictor

    def common(body: dict) -> tuple:
        engine.check_model(body)
        if field(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return sampling_from(body), stop_from(body), field(body, "seed", int), field(body, "stream", bool, False), include_usage  # fmt: skip

    async def read(request: Request) -> dict:
        return parse_body(await request.body(), engine.limits.max_body_bytes)

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "aquila"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (or a list of one string)")
        params, stop, seed, stream, include_usage = common(body)
        ids = engine.check_prompt(predictor.encode_prompt(prompt))
        max_tokens = engine.check_max_tokens(body.get("max_tokens"), 16)
        req = predictor.request(ids, max_tokens, params, seed, stop)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": engine.model_name}  # fmt: skip

        def choice(text: str, reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        if stream:
            return await stream_events(engine, req, choice, base, include_usage)
        c = await engine.complete(req)
        return {**base, "choices": [choice(c.text, c.finish_reason)], "usage": usage(c)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request)
        messages = chat_messages_from(body)
        params, stop, seed, stream, include_usage = common(body)
        ids = engine.check_prompt(predictor.encode_chat(messages))
        room = engine.max_len - len(ids)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = engine.check_max_tokens(limit, min(engine.limits.max_new_tokens, room))
        req = predictor.request(ids, max_tokens, params, seed, STOP_STRINGS + stop, strip=True)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": engine.model_name}  # fmt: skip

        def delta(text: str, reason: str | None) -> dict:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}

        if stream:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            chunk = {**base, "object": "chat.completion.chunk"}
            return await stream_events(engine, req, delta, chunk, include_usage, first)
        c = await engine.complete(req)
        message = {"role": "assistant", "content": c.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": c.finish_reason}
        return {**base, "choices": [choice], "usage": usage(c)}
