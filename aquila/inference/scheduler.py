"""The decode scheduler: each step's plan, decided without running the model.

`Scheduler.schedule` decides, in this order:
1. expiry: waiting sequences older than the queue timeout leave (the server answers 503);
2. admission: the oldest waiting sequences get a row while rows are free and the pool can hold the context of
   every admitted sequence and the new prompt (a request the pool cannot hold yet waits instead of failing);
3. which sequences run: every decoding sequence feeds its newest token (one position);
4. which prompt chunks join, within `prefill_tokens` padded tokens (chunked prefill; all waiting prompt tokens
   when no sequence is decoding, since nobody waits on the step);
5. blocks: each running sequence gets the blocks it writes this step, older first; when the pool cannot grow
   one, the newest sequence holding blocks is preempted (its blocks return; it re-reads its context later, as
   vLLM's recompute), or the sequence itself when no newer one holds any.
It returns a `StepPlan`; `runner.ModelRunner` executes it with one forward. `accepts` is the capacity check
behind the server's 429 (rows + `max_waiting`).

Admission counts a prompt's whole length against the free blocks, ignoring blocks it may share with cached
prefixes: conservative when the pool is nearly full, and it never admits what the pool cannot hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aquila.inference.kv_cache import BlockPool, PoolExhausted
from aquila.inference.sequence import SequenceState


@dataclass(frozen=True)
class PromptChunk:
    """Context ids [start, start + len(ids)) of a sequence reading its context."""

    seq: SequenceState
    start: int
    ids: list[int]

    @property
    def last(self) -> bool:
        """This chunk reaches the end of the context: the sequence samples right after the forward."""
        return self.start + len(self.ids) == len(self.seq.context)


@dataclass
class StepPlan:
    decode: list[SequenceState] = field(default_factory=list)  # each feeds context[cached] at position cached
    chunks: list[PromptChunk] = field(default_factory=list)
    admitted: list[SequenceState] = field(default_factory=list)  # got a row this step
    preempted: list[SequenceState] = field(default_factory=list)  # blocks returned; they re-read later
    expired: list[SequenceState] = field(default_factory=list)  # waited past the queue timeout; finished

    @property
    def empty(self) -> bool:
        """Nothing to run: no forward this step."""
        return not (self.decode or self.chunks)


class Scheduler:
    """Waiting and running sequences of one decode batch and the policy of each step (no model calls)."""

    def __init__(
        self,
        pool: BlockPool,
        rows: int,
        prefill_tokens: int | None = None,
        queue_timeout_s: float | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.pool, self.rows = pool, rows
        self.prefill_tokens = prefill_tokens  # None: every prompt chunk whole
        self.queue_timeout_s = queue_timeout_s  # None: wait as long as it takes
        self.max_waiting = max_waiting  # None: no limit on the queue
        self.waiting: list[SequenceState] = []  # in arrival order
        self.running: list[SequenceState] = []  # admitted, in arrival order: the older, the sooner it gets blocks
        self.preemptions = 0

    # --- membership --------------------------------------------------------------------------------------------
    def add(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def adopt(self, seq: SequenceState) -> None:
        """A sequence whose context is already in its table (evaluation): running at once, no admission."""
        self.running.append(seq)

    def remove(self, seq: SequenceState) -> None:
        """A sequence leaves (finished, cancelled): out of its queue, its blocks back to the pool at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.table is not None:
            seq.table.release()

    @property
    def free_rows(self) -> int:
        return self.rows - len(self.running)

    def accepts(self, running: int | None = None, waiting: int | None = None) -> bool:
        """Whether one more request fits (rows + max_waiting); the server passes its own counts, which include
        requests its model thread has not taken yet."""
        running = len(self.running) if running is None else running
        waiting = len(self.waiting) if waiting is None else waiting
        return self.max_waiting is None or running + waiting < self.rows + self.max_waiting

    # --- one step ------------------------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> StepPlan:
        plan = StepPlan()
        self._expire(time.monotonic() if now is None else now, plan)
        self._admit(plan)
        for s in self.running:  # starting to read: take what the pool already holds of its leading ids
            if s.reading and not s.cached and not s.table.blocks:
                s.cached = s.table.match_prefix(s.context)
        decode = [s for s in self.running if not s.reading]
        chunks = self._prompt_chunks(bool(decode))
        want = {s: s.cached + 1 for s in decode} | {c.seq: c.start + len(c.ids) for c in chunks}
        ready: set[SequenceState] = set()
        for seq in [s for s in self.running if s in want]:
            if seq in plan.preempted:
                continue
            if self._reserve(seq, want[seq], plan):
                ready.add(seq)
            elif not seq.reading:
                self._preempt(seq, plan)  # no newer sequence to take blocks from: it waits and re-reads later
        plan.decode = [s for s in decode if s in ready]
        plan.chunks = [c for c in chunks if c.seq in ready]
        return plan

    def _expire(self, now: float, plan: StepPlan) -> None:
        if self.queue_timeout_s is None:
            return
        for seq in [s for s in self.waiting if now - s.arrival > self.queue_timeout_s]:
            self.waiting.remove(seq)
            seq.finish("queue_timeout")
            plan.expired.append(seq)

    def _admit(self, plan: StepPlan) -> None:
        """Oldest first, while rows are free and the pool holds every admitted context plus the new prompt."""
        free = self.pool.free_blocks - sum(s.table.missing(len(s.context)) for s in self.running)
        while self.waiting and self.free_rows:
            seq = self.waiting[0]
            need = self.pool.blocks_for(len(seq.context))
            if need > free:
                if not self.running:  # nothing running will ever return a block: fail instead of waiting forever
                    raise PoolExhausted(
                        f"the KV pool has {self.pool.free_blocks} free blocks; a waiting prompt needs {need} and"
                        " no running sequence holds any"
                    )
                return
            free -= need
            self.waiting.pop(0)
            self.running.append(seq)
            plan.admitted.append(seq)

    def _prompt_chunks(self, decoding: bool) -> list[PromptChunk]:
        """The reading sequences to feed this step and their context chunks, within the token budget."""
        reading = [s for s in self.running if s.reading]
        if not reading:
            return []
        remaining = [len(s.context) - s.cached for s in reading]
        if self.prefill_tokens is None:
            width, take = max(remaining), len(reading)
        else:  # padded tokens of this step's forward stay within the budget (all prompt tokens when none decodes)
            budget = self.prefill_tokens if decoding else max(self.prefill_tokens, sum(remaining))
            width = min(max(remaining), budget)
            take = max(1, min(len(reading), budget // width))
        return [PromptChunk(s, s.cached, s.context[s.cached : s.cached + width]) for s in reading[:take]]

    def _reserve(self, seq: SequenceState, positions: int, plan: StepPlan) -> bool:
        """Blocks for seq's positions [0, positions), preempting newer sequences while the pool is short."""
        while not seq.table.reserve(positions):
            victims = [s for s in self.running[self.running.index(seq) + 1 :] if s.table.blocks]
            if not victims:
                return False
            self._preempt(victims[-1], plan)
        return True

    def _preempt(self, seq: SequenceState, plan: StepPlan) -> None:
        """Return seq's blocks; it re-reads its context later (its sampler and history stay as they are)."""
        seq.table.release()
        seq.cached, seq.reading = 0, True
        plan.preempted.append(seq)
        self.preemptions += 1
