"""The HTTP front of the server: limits, request checks, capacity (429), and the hand-off of events between the
engine thread (`engine.Engine`, which owns the model) and the requests' event loops.

A request is checked here, queued with the engine (`start`: 429 when the decode scheduler's rows and queue are
full, 503 when it waits past the queue timeout), and its events (text pieces, then its completion) are read from
an asyncio queue the engine fills (`events`)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest

from aquila.inference.generate import Completion, DecodeBatch, Request
from aquila.inference.kv_budget import kv_budget
from aquila.inference.predictor import Predictor
from aquila.serve.engine import Emit, Engine, Job, QueueTimeout
from aquila.serve.errors import ApiError
from aquila.serve.metrics import ServeMetrics
from aquila.typed_config import is_int


@dataclass(frozen=True)
class ServerLimits:
    max_prompt_tokens: int = 2048  # also capped by the model's max_seq_len - 1
    max_new_tokens: int = 1024
    max_batch: int = 16  # requests decoding together (cache rows)
    max_queue: int = 16  # requests waiting for a row; more get 429
    queue_timeout_s: float = 60.0  # waiting longer for a row gets 503
    max_time_s: float = 120.0  # a generation stops (finish_reason "length") after this long
    max_body_bytes: int = 1 << 20  # reading stops there: 413
    prefill_tokens: int = 256  # prompt tokens read per step: a long prompt is read in chunks between decode steps
    read_timeout_s: float = 15.0  # for a request's head (from connect or the previous response), and for its body
    max_connections: int = 512  # open connections; also kept below the open-file limit (connections.connection_cap)
    kv_cache_gb: float | None = None  # the KV block pool's GiB; None: kv_budget's default (full rows or half RAM)
    prefix_cache: bool = True  # prompts share the pool's blocks of an identical prefix


Event = tuple[str, Any]


class Handoff:
    """Engine-thread events to the requests' asyncio queues, handed over once per engine step.

    `emit` only appends (engine thread); the engine calls `flush` after each admission and each step, which
    hands each event loop all of its events with one `call_soon_threadsafe`: one wake-up of the loop per step for
    all rows, not one per text piece. Both run on the engine thread only, so the pending list needs no lock.

    `flush` then waits (at most `wait_s`) until each loop has run the tasks those events woke, i.e. written the
    step's chunks to the sockets, so that the loop's work runs between two model steps instead of preempting one of
    the model's OpenMP threads in the middle of the next (a stalled thread stalls the whole matmul). Paired runs on
    2 cores: about 10% less server CPU per token with 16 streaming clients and 20% with one.
    """

    def __init__(self, wait_s: float = 0.02) -> None:
        self.wait_s = wait_s  # a busy event loop delays the next step by at most this
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}

    def emitter(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Emit:
        def emit(kind: str, value: Any) -> None:
            self._pending.setdefault(loop, []).append((queue, (kind, value)))

        return emit

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        delivered = []
        for loop, events in pending.items():
            done = threading.Event()
            with contextlib.suppress(RuntimeError):  # the event loop has closed (server shutting down)
                loop.call_soon_threadsafe(deliver, events, done)
                delivered.append(done)
        deadline = time.monotonic() + self.wait_s
        for done in delivered:
            done.wait(max(0.0, deadline - time.monotonic()))


def deliver(events: list[tuple[asyncio.Queue, Event]], done: threading.Event) -> None:
    """On the event loop: each event into its request's queue, in the order the engine emitted them; `done` is
    set once the tasks these woke have run (their callbacks were scheduled first)."""
    for queue, event in events:
        queue.put_nowait(event)
    asyncio.get_running_loop().call_soon(done.set)


async def until_disconnected(request: HttpRequest) -> None:
    """Returns when the client has gone (the body must have been read: later messages are only the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Frontend:
    def __init__(self, predictor: Predictor, limits: ServerLimits, model_name: str) -> None:
        self.predictor, self.limits, self.model_name = predictor, limits, model_name
        args = predictor.model.args
        self.max_len = min(args.max_seq_len, limits.max_prompt_tokens + limits.max_new_tokens)
        # sized after the weights are loaded: the default reads MemAvailable now
        self.kv_budget = kv_budget(predictor.model, limits.max_batch, self.max_len, limits.kv_cache_gb)
        batch = DecodeBatch(
            predictor.model,
            limits.max_batch,
            self.max_len,
            predictor.tokenizer,
            limits.prefill_tokens,
            predictor.compile,
            queue_timeout_s=limits.queue_timeout_s,
            max_waiting=limits.max_queue,
            pool=self.kv_budget.pool(predictor.model, limits.prefix_cache),
        )
        self.metrics = ServeMetrics()
        self.metrics.pool = batch.pool
        self.handoff = Handoff()
        self.engine = Engine(
            batch,
            on_token=self.metrics.token,
            flush=self.handoff.flush,
            on_end=self.metrics.ended,
        )

    def cache_bytes(self) -> int:
        """Memory of the KV block pool (`kv_budget`: --kv-cache-gb, or --max-batch full rows or half of RAM)."""
        return self.engine.batch.pool.nbytes()

    def close(self) -> None:
        self.engine.stop()

    # --- checks ----------------------------------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_name:
            message = f"the model {name!r} does not exist; this server serves {self.model_name!r}"
            raise ApiError(404, message, code="model_not_found")

    def check_prompt(self, ids: list[int]) -> list[int]:
        limit = min(self.limits.max_prompt_tokens, self.max_len - 1)
        if len(ids) > limit:
            raise ApiError(400, f"prompt has {len(ids)} tokens; the limit is {limit}", code="context_length_exceeded")
        return ids

    def check_max_tokens(self, value: Any, default: int, minimum: int = 1) -> int:
        if value is None:
            return default
        if not is_int(value, minimum):
            raise ApiError(400, f"max_tokens must be an integer >= {minimum}, got {value!r}")
        if value > self.limits.max_new_tokens:
            raise ApiError(400, f"max_tokens {value} is above this server's limit of {self.limits.max_new_tokens}")
        return value

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        """A prompt plus max_tokens beyond the context is a 400, as OpenAI's (not a silently shorter answer)."""
        if prompt_tokens + max_tokens > self.max_len:
            message = (
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {prompt_tokens + max_tokens} is above"
                f" this server's context of {self.max_len} tokens"
            )
            raise ApiError(400, message, code="context_length_exceeded")

    async def read_body(self, request: HttpRequest) -> bytes:
        """The body, read until `max_body_bytes` and no further (413: a 1 GiB upload costs 1 MiB, not 1 GiB) and
        within `read_timeout_s` (408)."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {int(length)} bytes is above the limit of {limit}")
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body of over {limit} bytes is above the limit of {limit}")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.limits.read_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.limits.read_timeout_s:g} s") from None
        return b"".join(chunks)

    @staticmethod
    async def while_connected(request: HttpRequest, awaitable: Any) -> Any:
        """Await `awaitable` (a request's generation, its wait for a row) unless the client leaves first: then it is
        cancelled, which frees its row or queue place at the engine's next step, and ClientDisconnect is raised.
        A handler is not cancelled when its client goes (Starlette only notices at the next write), so without this
        a non-streaming request decodes to its end for nobody and a queued one keeps its place."""
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone
        if work.cancelled():
            raise ClientDisconnect()
        return work.result()

    # --- running requests ------------------------------------------------------------------------------------
    def admit(self) -> None:
        if not self.engine.accepts():
            running, waiting = self.engine.counts
            capacity = self.limits.max_batch + self.limits.max_queue
            message = f"too many requests: {running} running and {waiting} waiting (limit {capacity})"
            raise ApiError(429, message, "rate_limit_error")

    async def start(self, request: Request) -> tuple[Job, asyncio.Queue]:
        """Queue a request and wait until it has a row (429 when full, 503 after the queue timeout)."""
        self.admit()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(request, self.handoff.emitter(asyncio.get_running_loop(), queue), self.limits.max_time_s)
        self.engine.submit(job)
        try:
            kind, value = await queue.get()
        except asyncio.CancelledError:
            job.cancel()
            raise
        if kind == "error":
            if isinstance(value, QueueTimeout):
                raise ApiError(503, f"server busy: {value}", "server_error")
            raise value
        return job, queue

    async def events(self, job: Job, queue: asyncio.Queue) -> AsyncIterator[tuple[str, Any]]:
        """("piece", text) and, with logprobs, ("tokens", count so far)... then ("done", Completion) or ("error",
        exception); leaving early cancels the job."""
        try:
            while True:
                kind, value = await queue.get()
                yield kind, value
                if kind in ("done", "error"):
                    return
        finally:
            job.cancel()  # client gone or stream over: the engine frees the row within one step

    async def complete(self, request: Request) -> Completion:
        job, queue = await self.start(request)
        async for kind, value in self.events(job, queue):
            if kind == "done":
                return value
            if kind == "error":
                raise value
        raise RuntimeError("generation ended without a result")

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the model's thread between steps (scoring)."""
        self.admit()
        return await asyncio.wrap_future(self.engine.call(fn))

    def health(self) -> dict:
        running, waiting = self.engine.counts
        args = self.predictor.model.args
        return {
            "status": "ok",
            "model": self.model_name,
            "max_seq_len": args.max_seq_len,
            "running": running,
            "waiting": waiting,
            "max_batch": self.limits.max_batch,
            "max_queue": self.limits.max_queue,
            "kv_cache": self.kv_budget.health(),
        }
