"""The decode scheduler's policy, unit-tested without a model, then the decoding core's promises on a tiny model.

The first tests drive a `DecodeBatch` over a stand-in model whose forward is a fake (`FakeForward`: random logits,
no weights), so each `StepPlan` is checked against the policy documented in `aquila/inference/scheduler.py`:
expiry, admission by rows and by free blocks, prompt chunks in the token budget, the preemption victim, the 429
capacity, and that no plan names a finished sequence. The others use a seeded tiny model: tokens that do not
depend on neighbours, preemption or shared prefixes; every block returned however a request ends; a pool that
runs out queues; a compiled batch runs every step shape within dynamo's recompile limit.
"""

import random
from types import SimpleNamespace

import pytest
import torch

from aquila.checkpoint import build_model
from aquila.inference.generate import DecodeBatch, Request, run
from aquila.inference.kv_cache import BlockPool
from tests.conftest import tiny_args

VOCAB = 50


class FakeModel:
    """What SequenceState and DecodeBatch read of a model: its args and the device of a parameter."""

    args = SimpleNamespace(max_seq_len=256, vocab_size=VOCAB)

    def parameters(self):
        return iter([torch.zeros(1)])


class FakeForward:
    """Stands in for `runner.forward_rows`: random logits for each requested row; records the groups fed."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.fed: list[list[tuple[list[int], list[list[int]]]]] = []  # per forward: (starts, chunks) per group
        self.fail_next = False

    def __call__(self, model, pool, groups, ends):
        for tables, starts, chunks in groups:
            assert all(t.capacity >= s + len(c) for t, s, c in zip(tables, starts, chunks))  # blocks reserved
        self.fed.append([(starts, chunks) for _, starts, chunks in groups])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return torch.randn(sum(len(e) for e in ends), VOCAB, generator=self.gen)


def fake_batch(rows: int, blocks: int, block_size: int = 4, seed: int = 0, **kw) -> DecodeBatch:
    pool = BlockPool(1, 1, 1, blocks=blocks, block_size=block_size)
    batch = DecodeBatch(FakeModel(), rows, 256, pool=pool, **kw)
    batch.runner.forward = FakeForward(seed)
    return batch


def req(prompt_len: int, new: int, first: int = 1, **kw) -> Request:
    return Request(tuple(range(first, first + prompt_len)), new, **kw)


def check_blocks(batch: DecodeBatch) -> None:
    """Every block a sequence holds is referenced once per holder and is neither free nor evictable (eviction never
    takes a block in use); the pool's count of used blocks is the blocks held."""
    pool = batch.pool
    holders: dict[int, int] = {}
    for s in batch.seqs:
        for b in s.table.blocks:
            holders[b] = holders.get(b, 0) + 1
    for b, n in holders.items():
        assert pool.refs[b] == n
        assert b not in pool._free and b not in pool._evictable
    assert pool.used_blocks == len(holders)


# --- the policy, no model -----------------------------------------------------------------------------------------
def test_a_waiting_request_past_its_queue_timeout_expires_and_never_runs():
    batch = fake_batch(rows=1, blocks=16, queue_timeout_s=5.0)
    running = batch.add(req(3, 20), arrival=0.0)
    queued = batch.add(req(3, 20), arrival=0.0)
    plan = batch.schedule(now=1.0)
    assert plan.admitted == [running] and plan.expired == []
    batch.execute(plan)
    plan = batch.schedule(now=10.0)  # both are past 5 s; only the one still waiting for a row expires
    assert plan.expired == [queued] and queued.completion.finish_reason == "queue_timeout"
    assert plan.decode == [running] and not plan.chunks
    assert batch.seqs == [running] and queued.table.blocks == []
    batch.execute(plan)
    assert batch.schedule(now=100.0).expired == []  # an expired request is reported once


def test_admission_is_limited_by_free_rows():
    batch = fake_batch(rows=2, blocks=32)
    seqs = [batch.add(req(3, 1, first=1 + i)) for i in range(3)]  # one token each: done in their first step
    plan = batch.schedule()
    assert plan.admitted == seqs[:2] and batch.scheduler.waiting == seqs[2:]
    assert [c.seq for c in plan.chunks] == seqs[:2]
    batch.execute(plan)
    assert all(s.finished for s in seqs[:2]) and batch.scheduler.free_rows == 2
    assert batch.schedule().admitted == seqs[2:]


def test_admission_is_limited_by_free_blocks_and_waits_instead_of_failing():
    batch = fake_batch(rows=4, blocks=4)  # 4 blocks of 4 positions; each prompt of 7 needs 2
    seqs = [batch.add(req(7, 2, first=1 + i)) for i in range(3)]  # 8 positions written at most: 2 blocks
    plan = batch.schedule()
    assert plan.admitted == seqs[:2] and batch.scheduler.waiting == seqs[2:]
    assert batch.scheduler.free_rows == 2  # rows are free: the blocks are what it waits for
    batch.execute(plan)
    plan = batch.schedule()  # the two running ones still hold every block
    assert plan.admitted == [] and plan.preempted == [] and plan.decode == seqs[:2]
    while batch.seqs:
        batch.step()
        check_blocks(batch)
    assert all(s.finished for s in seqs)
    assert batch.pool.used_blocks == 0 and batch.preemptions == 0


def test_prompt_chunks_stay_within_the_token_budget_while_rows_decode():
    rng = random.Random(0)
    for budget in (4, 8, 16):
        batch = fake_batch(rows=6, blocks=200, prefill_tokens=budget, seed=budget)
        batch.add(req(2, 60))
        batch.step()  # it decodes from now on
        for i in range(5):
            batch.add(req(rng.randint(1, 40), 3, first=5 + i))
        while len(batch.seqs) > 1:
            decoding = bool(batch.decoding)
            plan = batch.schedule()
            for c in plan.chunks:
                assert c.start == c.seq.cached and c.ids == c.seq.context[c.start : c.start + len(c.ids)]
            if decoding and plan.chunks:  # the chunks' padded tokens: rows x the widest chunk
                assert len(plan.chunks) * max(len(c.ids) for c in plan.chunks) <= budget
            batch.execute(plan)


def test_with_no_row_decoding_the_budget_grows_to_every_waiting_prompt_token():
    batch = fake_batch(rows=4, blocks=64, prefill_tokens=4)
    seqs = [batch.add(req(n, 2, first=1 + n)) for n in (9, 3, 12)]  # 24 ids, 6x the budget
    plan = batch.schedule()
    # prompts are read whole (nobody waits on this step); the padded tokens (rows x widest) stay within all 24
    assert [(c.seq, c.start, len(c.ids)) for c in plan.chunks] == [(s, 0, len(s.request.prompt)) for s in seqs[:2]]
    assert len(plan.chunks) * 12 <= 24 and all(c.last for c in plan.chunks)


def test_preemption_takes_the_newest_sequence_holding_blocks_and_it_rereads_its_context_later():
    batch = fake_batch(rows=3, blocks=6)  # 6 blocks of 4 positions
    a, b, c = (batch.add(req(4, 12, first=1 + 10 * i)) for i in range(3))  # 1 block each, up to 4
    preempted_at = None
    while preempted_at is None:
        plan = batch.schedule()
        if plan.preempted:
            # position 8 needs a third block each; the pool has none left: the oldest (a) takes the newest's
            assert plan.preempted == [c] and plan.decode == [a, b]
            assert c.table.blocks == [] and c.cached == 0 and c.reading and not c.finished
            preempted_at = list(c.context)
        batch.execute(plan)
        check_blocks(batch)
    reread = []
    while batch.seqs:
        plan = batch.schedule()
        reread += [(ch.start, ch.ids) for ch in plan.chunks if ch.seq is c]
        batch.execute(plan)
        check_blocks(batch)
    assert reread and reread[0][0] == 0 and reread[0][1] == preempted_at[: len(reread[0][1])]
    assert [x for _, ids in reread for x in ids] == preempted_at  # its prompt and every token it had, once
    assert c.completion.finish_reason is not None and batch.pool.used_blocks == 0


def test_a_sequence_that_needs_a_block_with_no_newer_holder_preempts_itself():
    batch = fake_batch(rows=2, blocks=3)  # 3 blocks of 4
    a = batch.add(req(5, 6))
    b = batch.add(req(4, 6, first=20))
    batch.step()  # both read their prompt (a two blocks, b one: the pool is full) and sample: a at 6 positions, b at 5
    plan = batch.schedule()  # b writes position 4, a new block; no newer sequence holds one: b waits
    assert plan.preempted == [b] and plan.decode == [a] and b.table.blocks == []
    while batch.seqs:
        batch.step()
    assert a.finished and b.finished and batch.pool.used_blocks == 0


def test_accepts_is_false_once_rows_and_the_waiting_queue_are_full():
    batch = fake_batch(rows=2, blocks=64, max_waiting=1)
    assert batch.scheduler.accepts()
    for i in range(3):
        batch.add(req(3, 10, first=1 + i))
    batch.step()  # 2 running, 1 waiting
    assert not batch.scheduler.accepts()  # the server answers 429
    assert batch.scheduler.accepts(running=1, waiting=1) and not batch.scheduler.accepts(running=2, waiting=1)
    assert fake_batch(rows=1, blocks=8).scheduler.accepts(running=5, waiting=50)  # max_waiting None: no limit


def test_no_plan_names_a_finished_sequence_and_every_block_comes_back():
    """Random arrivals, lengths, stop ids, cancellations, queue timeouts and failed forwards in a small pool."""
    for seed in range(4):
        rng = random.Random(seed)
        batch = fake_batch(rows=4, blocks=10, seed=seed, prefill_tokens=8, queue_timeout_s=6.0)
        fake = batch.runner.forward
        ended = set()
        for now in range(200):
            if now < 150 and rng.random() < 0.4:
                batch.add(req(rng.randint(1, 12), rng.randint(1, 10), first=rng.randint(1, 30), stop_ids=(0,)), now)
            if batch.seqs and rng.random() < 0.05:
                seq = rng.choice(batch.seqs)
                batch.cancel(seq, "cancelled")
                ended.add(seq)
            plan = batch.schedule(now=float(now))
            named = [*plan.decode, *(c.seq for c in plan.chunks), *plan.admitted, *plan.preempted]
            assert not any(s.finished or s in ended for s in named)
            assert all(s in batch.scheduler.running for s in named)
            assert all(s.finished for s in plan.expired)
            ended.update(plan.expired)
            fake.fail_next = rng.random() < 0.03
            try:
                out = batch.execute(plan)
            except RuntimeError:  # as the server's engine: the step's sequences fail and return their blocks
                out = []
                for s in {*plan.decode, *(c.seq for c in plan.chunks)}:
                    batch.cancel(s, "error")
                    ended.add(s)
            ended.update(s for s, _ in out if s.finished)
            check_blocks(batch)
        batch.close()
        assert batch.pool.used_blocks == 0 and batch.pool.free_blocks == batch.pool.blocks


# --- the decoding core on a tiny model ---------------------------------------------------------------------------
def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_args(max_seq_len=64), seed=0).eval()


def test_tokens_are_the_same_alone_and_joining_a_preempting_batch_that_shares_prefixes():
    """Joining mid-decode, shared leading blocks, preemption and re-read all at once: each sequence's greedy tokens
    are its tokens alone, and no block in use is ever evicted."""
    model = tiny_model()
    common = tuple(range(3, 19))  # 16 ids: 2 full blocks of 8, shared
    requests = [Request((*common, *range(30 + i, 32 + 2 * i)), 20) for i in range(4)]
    pool = BlockPool.for_model(model, 64, block_size=8)  # 8 blocks: fewer than they hold when they all run long
    batch = DecodeBatch(model, 4, 64, pool=pool, prefill_tokens=8)
    seqs = [batch.add(r) for r in requests[:2]]
    for _ in range(3):
        batch.step()
        check_blocks(batch)
    seqs += [batch.add(r) for r in requests[2:]]  # join while the first two decode
    while batch.seqs:
        batch.step()
        check_blocks(batch)
    assert batch.preemptions > 0 and pool.prefix_hits > 0
    assert pool.used_blocks == 0
    alone = [run(DecodeBatch(model, 1, 64, pool=BlockPool.for_model(model, 64, prefix_cache=False)), [r])[0] for r in requests]  # fmt: skip
    assert [s.completion.token_ids for s in seqs] == [c.token_ids for c in alone]


def test_every_block_comes_back_after_cancel_error_and_timeout():
    model = tiny_model()
    batch = DecodeBatch(model, 2, 64, prefill_tokens=4, queue_timeout_s=5.0)
    pool = batch.pool
    running = batch.add(Request((7, 8, 9), 30), arrival=0.0)
    batch.execute(batch.schedule(now=0.0))
    reading = batch.add(Request(tuple(range(1, 21)), 5), arrival=0.0)  # 20 prompt ids: read 4 per step
    queued = batch.add(Request((4, 5, 6), 5), arrival=0.0)  # no row for it
    batch.execute(batch.schedule(now=0.0))
    assert reading.reading and reading.table.blocks and running.table.blocks
    batch.cancel(reading, "cancelled")  # mid-prompt: its partly read prompt's blocks return
    assert reading.table.blocks == [] and pool.used_blocks == len(running.table.blocks)
    plan = batch.schedule(now=9.0)  # the waiting one timed out; the running one keeps its row
    assert plan.expired == [queued] and queued.table.blocks == []
    real = batch.runner.forward
    batch.runner.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("device lost"))
    try:
        batch.execute(plan)
    except RuntimeError:
        batch.cancel(running, "error")  # what the engine does with a failed step's sequences
    batch.runner.forward = real
    assert pool.used_blocks == 0 and not batch.seqs
    late = batch.add(Request((7, 8, 9), 6))  # the batch still serves, with the tokens a fresh one gives
    while batch.seqs:
        batch.step()
    assert late.completion.token_ids == run(DecodeBatch(model, 1, 64), [late.request])[0].token_ids
    assert pool.used_blocks == 0


def test_a_pool_that_holds_one_request_at_a_time_queues_the_others():
    model = tiny_model()
    pool = BlockPool.for_model(model, 16, block_size=8)  # 2 blocks: one prompt of 9 and its 6 new tokens
    batch = DecodeBatch(model, 3, 64, pool=pool)
    requests = [Request(tuple(range(1 + i, 10 + i)), 6) for i in range(3)]
    seqs = [batch.add(r) for r in requests]
    batch.step()
    assert batch.scheduler.running == seqs[:1] and batch.scheduler.waiting == seqs[1:]
    while batch.seqs:
        assert len([s for s in batch.scheduler.running if s.table.blocks]) <= 1
        batch.step()
    assert batch.preemptions == 0 and pool.used_blocks == 0
    assert [s.completion.token_ids for s in seqs] == [
        run(DecodeBatch(model, 1, 64), [r])[0].token_ids for r in requests
    ]


@pytest.mark.slow
def test_a_compiled_batch_runs_every_step_shape_within_the_recompile_limit(caplog):
    """Decode rows only (1 to 3 rows, one block or more), prompts only, prompt chunks joining running rows (8 wide,
    narrower, one token), two chunks, preempted sequences re-reading: decode-only steps run the compiled cached
    forward, which fails here instead of falling back to eager if a shape recompiles past dynamo's limit; steps
    with chunks run eager, and the runner says so in one log line. Backend: dynamo's guards and recompiles are
    inductor's, without its C++ compile time."""
    import logging

    import torch._dynamo

    from aquila.inference.runner import compiled_forward_rows

    model = tiny_model()
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    arrivals = {  # step -> requests added before it
        0: [Request((1, 2, 3), 28), Request((4, 5), 3)],  # two prompts, nothing decoding yet
        2: [Request((9,), 20)],  # a one-token prompt: a chunk of width 1 beside two decoding rows
        4: [Request(tuple(range(10, 30)), 10)],  # 20 ids: chunks of 8, 8, 4 beside the running rows
        6: [Request(tuple(range(30, 41)), 4), Request(tuple(range(50, 56)), 4)],
    }
    shapes, seqs = set(), []
    with (
        caplog.at_level(logging.INFO, logger="aquila.inference.runner"),
        torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
    ):
        import aquila.inference.runner as runner

        runner._SAID.clear()
        pool = BlockPool.for_model(model, 48, block_size=8)  # 6 blocks: too few for all, so some preempt
        batch = DecodeBatch(model, 3, 64, prefill_tokens=8, pool=pool, compile=True)
        batch.runner.decode_forward = compiled_forward_rows(counting)
        for step in range(80):
            seqs += [batch.add(r) for r in arrivals.get(step, [])]
            plan = batch.schedule()
            shapes.add((len(plan.decode), tuple(len(c.ids) for c in plan.chunks)))
            batch.execute(plan)
            if step > 6 and not batch.seqs:
                break
    assert not batch.seqs and batch.preemptions > 0, shapes
    assert {(0, (3, 2)), (1, ()), (2, ()), (3, ()), (2, (1,)), (2, (8,))} <= shapes, shapes
    assert 1 <= len(graphs) <= 4  # decode-only steps: one row or more, one block or more
    said = [r.message for r in caplog.records if r.name == "aquila.inference.runner"]
    assert said == ["--compile: decode-only steps run compiled; steps that read prompt chunks run eager"]
    requests = [r for step in sorted(arrivals) for r in arrivals[step]]
    alone = [run(DecodeBatch(model, 1, 64), [r])[0].token_ids for r in requests]
    assert [s.completion.token_ids for s in seqs] == alone
