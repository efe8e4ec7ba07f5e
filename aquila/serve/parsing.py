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
    except RecursionError:
        raise ApiError(400, "body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ApiError(400, f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    if b"\\u" in raw:  # only an escape can carry a lone surrogate
        check_unicode(data)
    return data


def check_unicode(data: Any) -> None:
    """Every string (and key) is encodable as UTF-8: a lone surrogate (`"\\ud800"`) is a 400 naming its field,
    not an error inside the tokenizer. Iterative: the nesting depth is whatever json.loads accepted."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                name = f"{path}.{k}" if path else str(k)
                if not _utf8(k):
                    raise ApiError(400, f"a key in {path or 'the body'} is not valid Unicode (a lone surrogate)")
                stack.append((name, v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, str) and not _utf8(value):
            raise ApiError(400, f"{path} is not valid Unicode (a lone surrogate)")


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def field(body: dict, name: str, kinds: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ApiError(400, f"{name} must be {_kind_names(allowed)}, got {value!r}")
    return value


def _kind_names(kinds: tuple) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        bool: "true or false",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def sampling_from(body: dict, top_k_key: str = "top_k", defaults: dict | None = None) -> SamplingParams:
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, **(defaults or {})}
    return SamplingParams(
        temperature=number(body, "temperature", d["temperature"]),
        top_k=field(body, top_k_key, int, d["top_k"]),
        top_p=number(body, "top_p", d["top_p"]),
        repetition_penalty=number(body, "repetition_penalty", d["repetition_penalty"]),
        presence_penalty=number(body, "presence_penalty", 0.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0),
    )


def number(body: dict, name: str, default: float) -> float:
    value = field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None


def seed_from(body: dict, default: int | None = None) -> int | None:
    """A seed torch takes: [-2**63, 2**64)."""
    seed = field(body, "seed", int, default)
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise ApiError(400, f"seed must be an integer in [-2**63, 2**64), got one of {len(str(seed))} digits")
    return seed


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
