"""The OpenAPI description of the request bodies and error responses (`/openapi.json`, `/docs`).

The routes read their bodies themselves (`parsing`: one 400 naming the field, OpenAI's error shape, FlagAI's
JSON-string bodies), so these models only document: they are attached with `openapi_extra` and never validate.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class _Sampling(BaseModel):
    model: str | None = Field(None, description="the served model name (--served-model-name); others get 404")
    temperature: float | None = Field(None, description="0 = greedy, else >= 0.01 (default 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 = off (vLLM's extra)")
    repetition_penalty: float | None = Field(None, ge=1e-6, le=1e6, description="1 = off (vLLM's extra)")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, description="in [-2**63, 2**64)")
    stop: str | list[str] | None = Field(None, description="at most 4 strings")
    n: int | None = Field(None, description="only 1")
    stream: bool | None = None
    stream_options: dict[str, bool] | None = Field(None, description='{"include_usage": true}')
    user: str | None = Field(None, description="accepted and ignored")


class CompletionRequest(_Sampling):
    """Unknown fields and unsupported OpenAI options (suffix, best_of > 1, logit_bias) are a 400."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string (encoded with BOS), token ids (used as given), or a list of those (one choice each)"
    )
    max_tokens: int | None = Field(None, ge=0, description="default 16; 0 only with echo (the prompt's logprobs)")
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="the top k per token, in vLLM's shape")


class ChatCompletionRequest(_Sampling):
    """Unknown fields and unsupported OpenAI options (tools, response_format, logit_bias) are a 400."""

    messages: list[dict[str, Any]] = Field(description="roles system, user, assistant; the last is the user's")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, description="needs logprobs true")


class FlagAIRequest(BaseModel):
    """FlagAI's body: this object, or a JSON string holding it (FlagAI's client sends json=json.dumps(d))."""

    prompt: str
    max_new_tokens: int | None = Field(None, ge=0, description="0 = log-probabilities of the prompt (/func only)")
    temperature: float | None = None
    top_p: float | None = None
    top_k_per_token: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    sft: bool | None = Field(None, description="wrap the prompt (and history) in the chat template")
    history: list[list[str]] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` describing a JSON request body (flat models: the schema has no references)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERRORS = {
    400: {"model": ErrorResponse, "description": "a field is missing, wrong, unknown or unsupported (named)"},
    404: {"model": ErrorResponse, "description": "unknown model"},
    408: {"model": ErrorResponse, "description": "the body did not arrive within --read-timeout"},
    413: {"model": ErrorResponse, "description": "the body is over 1 MiB"},
    429: {"model": ErrorResponse, "description": "--max-batch running and --max-queue waiting (Retry-After)"},
    500: {"model": ErrorResponse, "description": "a server bug"},
    503: {"model": ErrorResponse, "description": "waited --queue-timeout for a row (Retry-After)"},
}
