"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aquila_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.tokens = Counter("aquila_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "aquila_finished_requests",
            "generations ended, by how: stop, length, cancelled (the client left), queue_timeout, error",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("aquila_queue_depth", "requests waiting for a free row", registry=r)
        self.running = Gauge("aquila_running_requests", "requests decoding", registry=r)
        self.ttft = Histogram(
            "aquila_time_to_first_token_seconds", "submission to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.kv_used = Gauge("aquila_kv_blocks_used", "KV cache blocks referenced by a sequence", registry=r)
        self.kv_free = Gauge(
            "aquila_kv_blocks_free", "KV cache blocks free to hand out (cached prefixes included)", registry=r
        )
        self.kv_cached = Gauge("aquila_kv_blocks_cached", "KV cache blocks holding a shareable prefix", registry=r)
        self.prefix_hits = Counter(
            "aquila_prefix_cache_hit_blocks", "KV blocks a prompt took from the pool instead of reading", registry=r
        )
        self.pool = None  # the engine's BlockPool, read at each render
        self._hits_seen = 0
        self.itl = Histogram(
            "aquila_inter_token_latency_seconds", "between a request's tokens", buckets=LATENCY_BUCKETS, registry=r
        )

    def token(self, job, now: float) -> None:
        """Engine hook: a job generated a token at `now`."""
        self.tokens.inc()
        if job.last_token is None:
            self.ttft.observe(now - job.submitted)
        else:
            self.itl.observe(now - job.last_token)

    def ended(self, job, how: str) -> None:
        """Engine hook: a job ended (finished, cancelled, expired in the queue or failed)."""
        self.finished.labels(how).inc()

    def render(self, running: int, waiting: int) -> bytes:
        self.running.set(running)
        self.queue_depth.set(waiting)
        if self.pool is not None:
            self.kv_used.set(self.pool.used_blocks)
            self.kv_free.set(self.pool.free_blocks)
            self.kv_cached.set(self.pool.cached_blocks)
            hits = self.pool.prefix_hits
            self.prefix_hits.inc(hits - self._hits_seen)
            self._hits_seen = hits
        return generate_latest(self.registry)
