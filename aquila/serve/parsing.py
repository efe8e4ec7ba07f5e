"""Request bodies -> checked values; anything wrong is an `ApiError` (400, 413) naming the field."""

from __future__ import annotations

import json
from typing import Any

from aquila.inference.sampling import SamplingParams
from aquila.serve.errors import ApiError


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
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ApiError(400, f"{name} must be {_kind_names(allowed)}, got {value!r}")
    return value


def _kind_names(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def sampling_from(body: dict, top_k_key: str = "top_k", defaults: dict | None = None) -> SamplingParams:
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **(defaults or {})}
    return SamplingParams(
        temperature=float(field(body, "temperature", (int, float), d["temperature"])),
        top_k=field(body, top_k_key, int, d["top_k"]),
        top_p=float(field(body, "top_p", (int, float), d["top_p"])),
        repetition_penalty=float(field(body, "repetition_penalty", (int, float), d["repetition_penalty"])),
    )


def stop_from(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise ApiError(400, "stop must be a string or a list of at most 4 strings")


def message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(t, str) for t in parts):
            return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts")
