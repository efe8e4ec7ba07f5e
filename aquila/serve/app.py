"""`aquila serve`: one model behind an HTTP API (FastAPI + uvicorn, 127.0.0.1 by default).

Endpoints: OpenAI-compatible `/v1/completions`, `/v1/chat/completions`, `/v1/models` (`openai_routes`); FlagAI's
`/func` and `/stream_func` (`flagai_routes`); the chat page at `/` (`page`); `/health` (running and waiting
requests) and `/metrics` (Prometheus text).

Requests are checked and queued by the front (`frontend.Frontend`) and decoded together by one engine thread that
owns the model (continuous batching, `engine.Engine`, each step planned by the decode scheduler and run as one
forward): up to `--max-batch` run at once and `--max-queue` wait; beyond that 429 with Retry-After, and a request
that waits longer than `--queue-timeout` gets 503. Every error body has OpenAI's shape, and the server keeps serving.
The KV block pool is sized by `--kv-cache-gb` or `kv_budget`'s default; `--no-prefix-cache` turns sharing off.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aquila.cli_help import HelpFormatter
from aquila.errors import AquilaError
from aquila.inference.predictor import Predictor
from aquila.serve.errors import install_error_handlers
from aquila.serve.flagai_routes import add_flagai_routes
from aquila.serve.frontend import Frontend, ServerLimits
from aquila.serve.metrics import ServeMetrics
from aquila.serve.openai_routes import add_openai_routes
from aquila.serve.page import add_chat_page


class CountRequests:
    """Counts HTTP requests by route and status when the response starts. A plain ASGI middleware: Starlette's
    `@app.middleware("http")` would re-stream every SSE chunk through an extra task and memory stream."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        started = False

        def count(status: int) -> None:
            route = scope.get("route")  # a route's path, so that unknown paths add no label values
            self.metrics.requests.labels(route.path if route else "unmatched", str(status)).inc()

        async def send_counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not started:  # Starlette's outermost middleware answers 500 after this one has let go
                count(500)
            raise


def create_app(predictor: Predictor, limits: ServerLimits | None = None, model_name: str = "aquila") -> FastAPI:
    frontend = Frontend(predictor, limits or ServerLimits(), model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        frontend.close()

    app = FastAPI(title="aquila", version="1", lifespan=lifespan)
    app.state.frontend = frontend
    install_error_handlers(app)

    app.add_middleware(CountRequests, metrics=frontend.metrics)

    @app.get("/health")
    async def health():
        return frontend.health()

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def metrics():
        body = frontend.metrics.render(*frontend.engine.counts)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    add_openai_routes(app, frontend)
    add_flagai_routes(app, frontend)
    add_chat_page(app)
    return app


def iter_sse(lines: Iterator[str]) -> Iterator[dict]:
    """Parse `data:` lines of a server-sent event stream into objects (test and client helper)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def main(argv: list[str]) -> int:
    from aquila.inference.options import add_model_args, load_predictor

    parser = argparse.ArgumentParser(
        prog="aquila serve", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--served-model-name", default=None, help="the model id clients use (default --model-name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    d = ServerLimits()
    parser.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="requests decoded together")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting; more get 429")
    parser.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s, help="seconds; then 503")
    parser.add_argument("--max-time", type=float, default=d.max_time_s, help="seconds per generation")
    parser.add_argument("--prefill-tokens", type=int, default=d.prefill_tokens, help="prompt tokens read per step")
    parser.add_argument(
        "--read-timeout", type=float, default=d.read_timeout_s, help="seconds for a request's headers, and for its body"
    )
    parser.add_argument(
        "--max-connections", type=int, default=d.max_connections, help="open connections (kept below the file limit)"
    )
    parser.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="GiB of KV cache blocks (default: --max-batch full-length rows, at most half of the memory available"
        " after loading the model)",
    )
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="never share KV blocks between prompts with the same prefix"
    )
    args = parser.parse_args(argv)
    positive = ("max_prompt_tokens", "max_new_tokens", "max_batch", "queue_timeout", "max_time", "prefill_tokens")
    for name in (*positive, "read_timeout", "max_connections"):
        if getattr(args, name) <= 0:
            raise AquilaError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise AquilaError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb:g}")
    if args.max_queue < 0:
        raise AquilaError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise AquilaError(f"--port must be in 0..65535, got {args.port}")
    limits = ServerLimits(
        args.max_prompt_tokens,
        args.max_new_tokens,
        args.max_batch,
        args.max_queue,
        args.queue_timeout,
        args.max_time,
        prefill_tokens=args.prefill_tokens,
        read_timeout_s=args.read_timeout,
        max_connections=args.max_connections,
        kv_cache_gb=args.kv_cache_gb,
        prefix_cache=not args.no_prefix_cache,
    )
    import uvicorn

    app = create_app(
        load_predictor(args, rows=args.max_batch), limits, model_name=args.served_model_name or args.model_name
    )
    frontend = app.state.frontend
    print(frontend.kv_budget.describe() + ("" if limits.prefix_cache else "; prefix cache off"), flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: reachable from other machines, without authentication")
    # Everything loaded so far (torch, the model, FastAPI: ~200k objects) lives until exit. Left to the cyclic
    # collector, each full collection walks all of it (~140 ms here, holding the GIL, so every running stream
    # stalls for a step); frozen, a collection only walks what requests allocate.
    gc.collect()
    gc.freeze()
    options = server_options(limits, args.host, args.port)
    print(
        f"connections: at most {options['limit_concurrency']} (--max-connections, under the open-file limit);"
        f" {limits.read_timeout_s:g} s for a request's headers and for its body (--read-timeout)"
    )
    uvicorn.run(app, **options)
    return 0


def server_options(limits: ServerLimits, host: str, port: int) -> dict:
    """uvicorn's settings for `aquila serve`: its h11 protocol with a deadline for each request's head and a cap on
    connections (`connections.bounded_h11`), `limit_concurrency` (503 beyond the cap), `timeout_keep_alive` 5 s,
    h11's 16 KiB limit on a request head (`h11_max_incomplete_event_size`), and a rate-limited log of failed
    accepts."""
    from aquila.serve.connections import bounded_h11, connection_cap, quiet_accept_errors

    cap = connection_cap(limits.max_connections)
    quiet_accept_errors()
    return {
        "host": host,
        "port": port,
        "log_level": "info",
        "http": bounded_h11(limits.read_timeout_s, cap + 8),  # the 8 over limit_concurrency get uvicorn's 503
        "limit_concurrency": cap,
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": 16 * 1024,
        "backlog": 128,
    }
