"""The engine: one thread owns the model and decodes every admitted request together (continuous batching).

HTTP handlers (`frontend.Frontend`) only `submit` jobs and read their events. Each step the engine thread
1. hands newly submitted jobs to the decode batch's scheduler, and drops waiting jobs whose client has gone;
2. ends running jobs that were cancelled (client gone) or ran past their time limit, returning their blocks;
3. asks the decode scheduler for the step's plan (`DecodeBatch.schedule`): jobs that waited past the queue
   timeout expire (event "error", 503), waiting jobs get a row while rows and KV blocks allow (event "started");
4. runs the plan (`DecodeBatch.execute`): one forward for every running row's newest token and a chunk of the
   prompts being read, then a token for each row that forward made due (a request's first token comes out of
   the step that read the end of its prompt);
5. hands each job its new text (event "piece") and, when it has finished, its completion (event "done").

Jobs' `emit` runs on the engine thread; `flush` (if given) runs after the events of each admission and each
step, so an emitter may collect a step's events and hand them to another thread at once (`frontend.Handoff`:
one event-loop wake-up per step instead of one per piece).

Requests join and leave at step boundaries; a long prompt is read in chunks of `prefill_tokens`, so running
streams keep going; when the KV pool runs out a request waits for blocks instead of failing. A request's output
does not depend on its neighbours (`aquila.inference.generate`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from aquila.inference.generate import DecodeBatch, Request
from aquila.inference.sequence import SequenceState

# emit(kind, value): kind is "started", "piece" (text), "tokens" (with logprobs: how many generated so far), "done"
# (Completion) or "error" (an exception).
Emit = Callable[[str, Any], None]


@dataclass(eq=False)
class Job:
    request: Request
    emit: Emit
    max_time_s: float
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    last_token: float | None = None  # when its latest token was generated
    tokens: int = 0
    seq: SequenceState | None = None  # once handed to the decode batch

    def cancel(self) -> None:
        """Thread-safe: the engine frees the job's row (or drops it from the queue) at its next step."""
        self.cancelled.set()


class QueueTimeout(Exception):
    """A job waited longer than the queue timeout for a free row."""


class Engine:
    """The model's thread: jobs in, one `DecodeBatch` step at a time, events out. Admission, expiry and capacity
    are the decode batch's scheduler's (its `queue_timeout_s` and `max_waiting`)."""

    def __init__(
        self,
        batch: DecodeBatch,
        on_token: Callable[[Job, float], None] | None = None,
        flush: Callable[[], None] | None = None,
        on_end: Callable[[Job, str], None] | None = None,
    ) -> None:
        self.batch = batch
        self.on_end = on_end  # metrics hook: (job, how it ended: stop, length, cancelled, queue_timeout, error)
        self.on_token = on_token  # metrics hook, called with (job, now) before job.last_token moves to now
        self.flush = flush  # called on this thread after each batch of emits (see the module docstring)
        self.waiting: deque[Job] = deque()  # submitted, without a row yet (handed to the batch or not)
        self.running: dict[SequenceState, Job] = {}
        self._queued: dict[SequenceState, Job] = {}  # handed to the batch, waiting there for a row
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="aquila-engine", daemon=True)
        self._thread.start()

    # --- called from other threads ---------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._wake:
            self.waiting.append(job)
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the model's thread between two steps (scoring); returns its future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting); a waiting job whose client has gone no longer counts (it leaves at the next step)."""
        return len(self.running), sum(not j.cancelled.is_set() for j in list(self.waiting))

    def accepts(self) -> bool:
        """Room for one more request (the server's 429 otherwise): the decode scheduler's rows + max_waiting."""
        return self.batch.scheduler.accepts(*self.counts)

    @property
    def queue_timeout_s(self) -> float | None:
        return self.batch.scheduler.queue_timeout_s

    # --- the model thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.running or self._calls or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                self._run_call(fn, future)
            try:
                self._step()
            except Exception as e:  # a failed step fails its jobs, not the server
                failed = list(self.running.values()) or list(self._queued.values())  # never spin on one error
                for job in failed:
                    self._end(job, error=e)
            self._flush()
        for job in [*self.waiting, *self.running.values()]:
            job.emit("error", RuntimeError("server shutting down"))
        self._flush()

    def _flush(self) -> None:
        if self.flush is not None:
            self.flush()

    @staticmethod
    def _run_call(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as e:
            future.set_exception(e)

    def _unqueue(self, job: Job) -> None:
        with self._wake:
            if job in self.waiting:
                self.waiting.remove(job)
        if job.seq is not None:
            self._queued.pop(job.seq, None)

    def _step(self) -> None:
        now = time.monotonic()
        with self._wake:
            waiting = list(self.waiting)
        for job in waiting:
            if job.cancelled.is_set():  # gone before it had a row
                self._unqueue(job)
                if job.seq is not None:
                    self.batch.cancel(job.seq, "cancelled")
                self._ended(job, "cancelled")
            elif job.seq is None:
                try:
                    job.seq = self.batch.add(job.request, arrival=job.submitted)
                except Exception as e:
                    self._unqueue(job)
                    self._ended(job, "error")
                    job.emit("error", e)
                    continue
                self._queued[job.seq] = job
        for job in list(self.running.values()):
            if job.cancelled.is_set():
                self._end(job, self.batch.cancel(job.seq, "cancelled"))
            elif now - job.started > job.max_time_s:
                self._end(job, self.batch.cancel(job.seq, "length"))
        plan = self.batch.schedule(now)
        for seq in plan.expired:
            job = self._queued[seq]
            self._unqueue(job)
            self._ended(job, "queue_timeout")
            job.emit("error", QueueTimeout(f"waited {self.queue_timeout_s:g} s for a free slot"))
        for seq in plan.admitted:
            job = self._queued[seq]
            self._unqueue(job)
            job.started = now
            self.running[seq] = job
            job.emit("started", None)
        if plan.admitted or plan.expired:
            self._flush()  # new streams start (and expired ones fail) before this step's model call
        for seq, piece in self.batch.execute(plan):
            job = self.running[seq]
            if len(seq.completion.token_ids) > job.tokens:  # a generated token (not a stop id)
                t = time.monotonic()
                job.tokens += 1
                if self.on_token is not None:
                    self.on_token(job, t)
                job.last_token = t
                if job.request.logprobs:  # the stream's log-probabilities go with the text they belong to
                    job.emit("tokens", job.tokens)
            if piece:
                job.emit("piece", piece)
            if seq.finished:
                self._end(job)

    def _ended(self, job: Job, how: str) -> None:
        if self.on_end is not None:
            self.on_end(job, how)

    def _end(self, job: Job, tail: str = "", error: Exception | None = None) -> None:
        self.running.pop(job.seq, None)
        self._unqueue(job)
        self._ended(job, "error" if error is not None else job.seq.completion.finish_reason or "error")
        if error is not None:
            self.batch.cancel(job.seq, "error")  # returns its blocks, whether it was running or waiting
            job.emit("error", error)
            return
        if tail:
            job.emit("piece", tail)
        job.emit("done", job.seq.completion)
