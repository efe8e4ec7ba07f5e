"""OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions` (plain or server-sent events), `/v1/models`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from aquila.chat_template import STOP_STRINGS
from aquila.inference.generate import Completion
from aquila.serve.errors import ApiError, error_body
from aquila.serve.frontend import Frontend
from aquila.serve.logprobs import MAX_TOP_LOGPROBS, LogprobFormatter, prompt_logprobs
from aquila.serve.parsing import field, message_text, parse_body, sampling_from, seed_from, stop_from
from aquila.serve.schema import ERRORS, ChatCompletionRequest, CompletionRequest, request_body
from aquila.typed_config import is_int

ROLES = ("system", "user", "assistant")

# The fields each route reads; `user` is accepted and ignored (an end-user id for abuse tracking).
COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "logprobs",
    "presence_penalty", "frequency_penalty", "user", "top_k", "repetition_penalty",
}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
# OpenAI fields this server does not implement, with the values that ask for nothing (accepted).
UNSUPPORTED = {
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "parallel_tool_calls": None,
    "response_format": {"type": "text"}, "logit_bias": {}, "best_of": 1, "suffix": "", "modalities": ["text"],
    "audio": None, "prediction": None, "store": False, "metadata": None, "service_tier": None, "reasoning_effort": None,
}  # fmt: skip


def check_fields(body: dict, known: set[str]) -> None:
    """Unknown fields and unsupported options are a 400 naming the field, never silently ignored."""
    for name, value in body.items():
        if name in known or value is None:
            continue
        if name in UNSUPPORTED:
            neutral = UNSUPPORTED[name]
            if neutral is not None and type(value) is type(neutral) and value == neutral:
                continue
            raise ApiError(400, f"{name}: not supported by this server (got {json.dumps(value)[:80]})", code="unsupported_parameter", param=name)  # fmt: skip
        raise ApiError(400, f"{name}: unknown field", code="unknown_parameter", param=name)


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
    frontend: Frontend,
    http: Request,
    generation,
    choice: Callable[[str, str | None], dict],
    base: dict,
    include_usage: bool,
    first=None,
    logprobs: Callable[[list[int], list[float], list], dict] | None = None,
) -> StreamingResponse:
    """One SSE generator for completions and chat: a chunk per text piece, a final chunk with the finish reason.
    The events one engine step handed over go out in one write (the last piece, the finish, usage, [DONE]).

    With `logprobs` (the request has `logprobs`), each chunk carries the log-probabilities of the tokens generated
    since the previous chunk (the engine's "tokens" events say how many there are; a token whose text is held
    back goes with the chunk that brings its text, the rest with the finish)."""
    job, queue = await frontend.while_connected(http, frontend.start(generation))
    piece = PieceEvents(base, choice)
    sent = upto = 0

    def with_logprobs(text: str, reason: str | None) -> str:
        nonlocal sent
        c = job.seq.completion  # its lists only grow; [sent, upto) were filled before their event was handed over
        tops = c.top_logprobs[sent:upto] if c.top_logprobs is not None else [None] * (upto - sent)
        lp = logprobs(c.token_ids[sent:upto], c.logprobs[sent:upto], tops)
        sent = upto
        return sse({**base, "choices": [choice(text, reason, lp=lp)]})

    async def events() -> AsyncIterator[str]:
        nonlocal upto
        if first is not None:
            yield sse({**base, "choices": [first]})
        out: list[str] = []
        async for kind, value in frontend.events(job, queue):
            if kind == "tokens":
                upto = value
            elif kind == "piece":
                out.append(piece(value) if logprobs is None else with_logprobs(value, None))
            elif kind == "done":
                if logprobs is None:
                    out.append(sse({**base, "choices": [choice("", value.finish_reason)]}))
                else:
                    upto = len(value.token_ids)
                    out.append(with_logprobs("", value.finish_reason))
                if include_usage:
                    out.append(sse({**base, "choices": [], "usage": usage(value)}))
            else:
                out.append(sse(error_body(str(value), "server_error")))
            if out and kind in ("piece", "tokens") and queue.empty():
                yield "".join(out)
                out.clear()
        yield "".join(out) + "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def prompts_from(body: dict, encode: Callable[[str], list[int]], limit: int) -> list[tuple[list[int], str | None]]:
    """`prompt` as OpenAI and vLLM take it: a string, a list of strings, a list of token ids or a list of such
    lists. (ids, text) per prompt; a string is encoded with BOS (as `/func`), ids are used as given (text None)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those")
    if len(prompt) > limit:
        raise ApiError(400, f"prompt: {len(prompt)} prompts in one request; the limit is {limit} (--max-batch)")
    out: list[tuple[list[int], str | None]] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((encode(p), p))
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
            out.append((list(p), None))
        else:
            raise ApiError(400, f"prompt[{i}] must be a string or a non-empty list of token ids")
    return out


async def gather_all(coros: list) -> list:
    """Run coroutines together; if one fails (or the caller is cancelled), the others are cancelled too."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def add_openai_routes(app: FastAPI, frontend: Frontend) -> None:
    predictor = frontend.predictor
    formatter = LogprobFormatter(predictor.tokenizer)

    def common(body: dict, known: set[str]) -> tuple:
        check_fields(body, known)
        frontend.check_model(body)
        if field(body, "n", int, 1) != 1:
            raise ApiError(400, "n must be 1 (one choice per prompt)", code="unsupported_parameter")
        options = field(body, "stream_options", dict, {})
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(400, f"stream_options.include_usage must be true or false, got {include_usage!r}")
        params = sampling_from(body, "top_k", {"temperature": 1.0, "top_p": 1.0, "top_k": 0})
        stop = stop_from(body)
        return params, stop, seed_from(body), field(body, "stream", bool, False), include_usage

    async def read(request: Request) -> dict:
        return parse_body(await frontend.read_body(request), frontend.limits.max_body_bytes)

    def top_count(body: dict, name: str) -> int:
        value = field(body, name, int, 0)
        if not 0 <= value <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}")
        return value

    @app.get("/v1/models")
    async def models():
        card = {"id": frontend.model_name, "object": "model", "created": 0, "owned_by": "aquila"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest), responses=ERRORS)
    async def completions(request: Request):
        body = await read(request)
        params, stop, seed, stream, include_usage = common(body, COMPLETION_FIELDS)
        prompts = [(frontend.check_prompt(ids), text) for ids, text in prompts_from(body, predictor.encode_prompt, frontend.limits.max_batch)]  # fmt: skip
        echo = field(body, "echo", bool, False)
        logprobs = None if body.get("logprobs") is None else top_count(body, "logprobs")
        # max_tokens 0 with echo: the prompt's log-probabilities only (lm-eval's loglikelihood requests)
        given = body.get("max_tokens")
        max_tokens = frontend.check_max_tokens(given, 16, minimum=0 if echo else 1)
        for ids, _ in prompts:
            if given is None:  # OpenAI's default of 16, within the context
                max_tokens = min(max_tokens, frontend.max_len - len(ids))
            frontend.check_context(len(ids), max_tokens)
        if stream and (echo or len(prompts) > 1):
            name = "echo" if echo else "prompt"
            raise ApiError(400, f"{name}: streaming serves one prompt without echo; use stream false", param=name)
        reqs = [
            replace(
                predictor.request(ids, max(max_tokens, 1), params, seed, stop, logprobs=logprobs is not None),
                top_logprobs=logprobs or 0,
            )  # fmt: skip
            for ids, _ in prompts
        ]
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": frontend.model_name}  # fmt: skip

        def choice(text: str, reason: str | None, index: int = 0, lp: dict | None = None) -> dict:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        if stream:
            lp_chunk = None
            if logprobs is not None:
                at = 0  # text_offset runs on across chunks

                def lp_chunk(ids: list[int], lps: list[float], tops: list) -> dict:
                    nonlocal at
                    out = formatter.completion(ids, lps, tops, offset=at)
                    at += sum(len(t) for t in out["tokens"])
                    return out

            return await stream_events(frontend, request, reqs[0], choice, base, include_usage, logprobs=lp_chunk)
        scored: list = [None] * len(prompts)
        if echo and logprobs is not None:  # the prompts' own log-probabilities, on the model's thread between steps

            def score() -> list:
                return [prompt_logprobs(predictor.model, ids, logprobs) for ids, _ in prompts]

            scored = await frontend.while_connected(request, frontend.call(score))
        if max_tokens == 0:
            completions = [Completion(finish_reason="length", prompt_tokens=len(ids), logprobs=[], top_logprobs=[]) for ids, _ in prompts]  # fmt: skip
        else:
            completions = await frontend.while_connected(request, gather_all([frontend.complete(r) for r in reqs]))
        choices = []
        for i, ((ids, text), c, prompt_lps) in enumerate(zip(prompts, completions, scored)):
            out_text = c.text
            if echo:
                out_text = (text if text is not None else predictor.tokenizer.decode(ids)) + c.text
            lp = None
            if logprobs is not None:
                tokens, lps, tops = list(c.token_ids), list(c.logprobs or []), list(c.top_logprobs or [None] * len(c.token_ids))  # fmt: skip
                if echo:
                    tokens, lps, tops = ids + tokens, [None, *prompt_lps[0], *lps], [None, *prompt_lps[1], *tops]
                lp = formatter.completion(tokens, lps, tops)
            choices.append(choice(out_text, c.finish_reason, i, lp))
        n_prompt, n_new = sum(c.prompt_tokens for c in completions), sum(len(c.token_ids) for c in completions)
        return {**base, "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}  # fmt: skip

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest), responses=ERRORS)
    async def chat_completions(request: Request):
        body = await read(request)
        messages = chat_messages_from(body)
        params, stop, seed, stream, include_usage = common(body, CHAT_FIELDS)
        logprobs = field(body, "logprobs", bool, False)
        top = top_count(body, "top_logprobs")
        if top and not logprobs:
            raise ApiError(400, "top_logprobs needs logprobs true")
        ids = frontend.check_prompt(predictor.encode_chat(messages))
        room = frontend.max_len - len(ids)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = frontend.check_max_tokens(limit, min(frontend.limits.max_new_tokens, room))
        frontend.check_context(len(ids), max_tokens)
        req = predictor.request(ids, max_tokens, params, seed, STOP_STRINGS + stop, strip=True, logprobs=logprobs)
        req = replace(req, top_logprobs=top)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": frontend.model_name}  # fmt: skip

        def delta(text: str, reason: str | None, lp: dict | None = None) -> dict:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}

        if stream:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            chunk = {**base, "object": "chat.completion.chunk"}
            lp_chunk = formatter.chat if logprobs else None
            return await stream_events(frontend, request, req, delta, chunk, include_usage, first, lp_chunk)
        c = await frontend.while_connected(request, frontend.complete(req))
        message = {"role": "assistant", "content": c.text}
        lp = None
        if logprobs:
            lp = formatter.chat(c.token_ids, c.logprobs or [], c.top_logprobs or [None] * len(c.token_ids))
        choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
        return {**base, "choices": [choice], "usage": usage(c)}
