"""FlagAI's Aquila server routes: `POST /func` (text, tokens, log-probabilities; scoring with max_new_tokens 0) and
`POST /stream_func` (plain text stream). The body is a JSON *string* holding the JSON object (FlagAI's client sends
`json=json.dumps(d)`); a plain object is accepted too."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from aquila.chat_template import DEFAULT_SYSTEM, STOP_STRINGS
from aquila.inference.generate import Request as GenerationRequest
from aquila.serve.errors import ApiError
from aquila.serve.frontend import Frontend
from aquila.serve.parsing import field, parse_body, sampling_from, seed_from
from aquila.serve.schema import ERRORS, FlagAIRequest, request_body
from aquila.typed_config import is_int

FLAGAI_STOPS = ("###", "[UNK]", "</s>")


def add_flagai_routes(app: FastAPI, frontend: Frontend) -> None:
    predictor, tokenizer = frontend.predictor, frontend.predictor.tokenizer

    async def read(request: Request) -> dict:
        return parse_body(await frontend.read_body(request), frontend.limits.max_body_bytes, json_string_ok=True)

    def prompt_of(body: dict) -> str:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string")
        return prompt

    def generation_request(body: dict, stream: bool, logprobs: bool = False) -> GenerationRequest:
        prompt = prompt_of(body)
        defaults = {"temperature": 0.9, "top_p": 0.9 if stream else 0.95, "top_k": 20 if stream else 1000}
        params = sampling_from(body, "top_k_per_token", defaults)
        max_new = frontend.check_max_tokens(body.get("max_new_tokens"), min(256, frontend.limits.max_new_tokens))
        seed = seed_from(body, 1234)
        if field(body, "sft", bool, False):
            history = field(body, "history", list, [])
            ids = predictor.encode_chat(prompt, history=history, system=DEFAULT_SYSTEM)
            stops = FLAGAI_STOPS + STOP_STRINGS
        else:
            ids = predictor.encode_prompt(prompt)  # FlagAI: encode_plus without the final EOS
            stops = FLAGAI_STOPS
        return predictor.request(frontend.check_prompt(ids), max_new, params, seed, stops, logprobs=logprobs)

    def answer(prompt: str, ids: list[int], text: str, token_ids: list[int], logprobs: list[float]) -> dict:
        tokens = [tokenizer.decode([t]) for t in token_ids]
        lps = [round(x, 6) for x in logprobs]
        completion = {
            "text": text,
            "tokens": tokens,
            "logprobs": lps,
            "top_logprobs_dicts": [{t: lp} for t, lp in zip(tokens, lps)],
            "model_in": prompt,
        }
        return {"completions": [completion], "input_length": len(ids), "model_info": frontend.model_name}

    @app.post("/func", openapi_extra=request_body(FlagAIRequest), responses=ERRORS)
    async def func(request: Request):
        body = await read(request)
        value = body.get("max_new_tokens")
        if value is not None and not is_int(value):  # false == 0 would switch to scoring
            raise ApiError(400, f"max_new_tokens must be an integer (0 = score the prompt), got {value!r}")
        if value == 0:  # FlagAI's scoring mode: log-probabilities of the prompt's own tokens
            prompt = prompt_of(body)
            ids = frontend.check_prompt(predictor.encode_prompt(prompt))
            lps = await frontend.while_connected(request, frontend.call(lambda: predictor.score(ids)))
            return answer(prompt, ids, "", ids[1:], lps)
        req = generation_request(body, stream=False, logprobs=True)
        c = await frontend.while_connected(request, frontend.complete(req))
        text = c.text[1:] if c.text.startswith(" ") else c.text
        return answer(body["prompt"], list(req.prompt), text, c.token_ids, c.logprobs or [])

    @app.post(
        "/stream_func", openapi_extra=request_body(FlagAIRequest), responses=ERRORS, response_class=PlainTextResponse
    )
    async def stream_func(request: Request):
        body = await read(request)
        job, queue = await frontend.while_connected(request, frontend.start(generation_request(body, stream=True)))

        async def chunks() -> AsyncIterator[str]:
            first = True
            async for kind, value in frontend.events(job, queue):
                if kind == "piece":
                    if first and value.startswith(" "):
                        value = value[1:]
                    first = first and not value
                    if value:
                        yield value

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")
