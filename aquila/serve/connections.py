"""Connection limits for uvicorn: a bounded number of connections, a deadline for each request's head, and one log
line (not thousands) when accepting fails for want of file descriptors.

uvicorn has `limit_concurrency` (a 503 once that many connections or tasks exist) and `timeout_keep_alive` (idle
time between requests), but both act only on complete requests: a client that opens a connection and sends its
headers a byte at a time (slowloris) holds a socket for ever, and enough of them exhaust the file descriptors, at
which point every accept fails and asyncio logs each failure with a traceback. `bounded_h11` is uvicorn's h11
protocol with a head deadline and a cap on connections (the ones over it are closed at once, before they cost
anything but the accept); the cap is kept below the process' file limit (`connection_cap`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

FD_RESERVE = 64  # descriptors kept for everything but client sockets (model files, pipes, threads' eventfds)


def connection_cap(wanted: int) -> int:
    """Raise the soft open-file limit to the hard one, and return at most `wanted` connections that fit under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    return max(1, min(wanted, soft - FD_RESERVE))


def bounded_h11(head_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived `head_timeout_s` after it
    opened (or after its previous response), and closing at once a connection beyond `max_connections`."""

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()  # over the cap: the socket is freed now, not after a timeout
                return
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request head has arrived
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request's head, on a kept-alive connection

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.abort()

    return BoundedH11Protocol


class OncePerInterval(logging.Filter):
    """Lets through a message starting with `prefix` at most once per `interval_s` (asyncio logs every failed accept
    with a traceback: with no descriptors left, that is a line per connection attempt)."""

    def __init__(self, prefix: str, interval_s: float = 60.0) -> None:
        super().__init__()
        self.prefix, self.interval_s = prefix, interval_s
        self._last = float("-inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.dropped += 1
            return False
        self._last = now
        if self.dropped:
            record.msg = f"{record.msg} ({self.dropped} more since the last report)"
            self.dropped = 0
        record.exc_info = None  # the traceback says nothing the message does not
        return True


def quiet_accept_errors() -> None:
    """Install the filter on asyncio's logger (idempotent)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, OncePerInterval) for f in log.filters):
        log.addFilter(OncePerInterval("socket.accept() out of system resource"))
