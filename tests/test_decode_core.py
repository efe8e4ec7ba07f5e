"""The decoding core's batch of rows: chunked prompts beside running rows, rows freed and reused."""

import torch

from aquila.checkpoint import build_model
from aquila.inference.generate import DecodeBatch, Request, run
from aquila.inference.sampling import SamplingParams
from tests.conftest import tiny_args


def test_a_long_prompt_is_read_in_chunks_while_running_rows_keep_decoding():
    torch.manual_seed(0)
    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    running = Request((1, 2, 3), 30)
    long = Request(tuple(range(5, 35)), 5)  # 30 prompt tokens, read 8 per step
    batch = DecodeBatch(model, 2, 64, prefill_tokens=8)
    first = batch.add(running)
    batch.step()
    second = batch.add(long)
    steps_until_second_speaks = 0
    while not second.completion.token_ids:
        out = batch.step()
        steps_until_second_speaks += 1
        assert any(seq is first for seq, _ in out)  # the running row got its token this step too
    # ceil(30 / 8) = 4 chunks, each read in the same forward as the running row's token; the runner samples right
    # after each forward, so the first token comes out of the step that read the last chunk (the 4th, not a 5th)
    assert steps_until_second_speaks == 4
    while batch.seqs:
        batch.step()
    alone = [run(DecodeBatch(model, 1, 64), [r])[0].token_ids for r in (running, long)]
    assert [first.completion.token_ids, second.completion.token_ids] == alone


def test_freed_rows_are_reused_and_rows_stay_independent():
    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    greedy = SamplingParams(temperature=0)
    requests = [Request(tuple(range(1 + i, 4 + 2 * i)), 3 + 5 * (i % 3), greedy) for i in range(7)]
    together = run(DecodeBatch(model, 3, 64), requests)  # 7 requests through 3 rows, finishing at different steps
    alone = [run(DecodeBatch(model, 1, 64), [r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == r.max_new_tokens for c, r in zip(together, requests))


def test_prompts_arriving_together_are_read_in_one_step_when_no_row_is_decoding():
    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    batch = DecodeBatch(model, 5, 64, prefill_tokens=8)  # 4 prompts of 6 tokens: 24 tokens, 3x the budget
    seqs = [batch.add(Request(tuple(range(1 + i, 7 + i)), 3)) for i in range(4)]
    out = batch.step()
    assert {seq for seq, _ in out} == set(seqs)  # all four read their prompt and sampled in the first step
    late = batch.add(Request(tuple(range(10, 30)), 2))  # 20 tokens while rows decode: 8 per step again
    batch.step()
    assert late.cached == 8


def test_a_joining_prompt_is_read_in_the_running_rows_forward():
    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    batch = DecodeBatch(model, 3, 64, prefill_tokens=8)
    running = [batch.add(Request((1, 2, 3), 12)), batch.add(Request((4, 5), 12))]
    batch.step()
    joining = batch.add(Request(tuple(range(6, 26)), 4))  # 20 prompt tokens: 3 chunks of at most 8
    forwards = []
    real = model.cached_forward
    model.cached_forward = lambda groups, *a: forwards.append([g.ids.shape for g in groups]) or real(groups, *a)
    for _ in range(3):
        batch.step()
    model.cached_forward = real
    # one forward per step: the 2 running rows' tokens and the joining row's chunk
    assert forwards == [[(2, 1), (1, 8)], [(2, 1), (1, 8)], [(2, 1), (1, 4)]]
    # sampled right after the forward that read its last chunk: its first token came out of the 3rd step
    assert len(joining.completion.token_ids) == 1
    while batch.seqs:
        batch.step()
    alone = [run(DecodeBatch(model, 1, 64), [s.request])[0].token_ids for s in (*running, joining)]
    assert [s.completion.token_ids for s in (*running, joining)] == alone


def test_finished_sequences_return_their_blocks_without_copying_anything():
    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    batch = DecodeBatch(model, 4, 64)
    for i in range(4):
        batch.add(Request((1 + i, 2, 3), 3 + 4 * i))  # finishing at different steps
    copies = []
    real = batch.pool.copy_block
    batch.pool.copy_block = lambda *a: copies.append(a) or real(*a)
    while batch.seqs:
        batch.step()
    assert copies == []
    assert batch.pool.used_blocks == 0
    assert batch.step() == []  # an empty batch steps to nothing


def test_a_pool_too_small_for_everyone_preempts_and_rereads_without_changing_tokens():
    """4 sequences of up to 26 positions in a pool of 6 blocks of 8: they cannot all hold their context; the
    newest are preempted (blocks returned), re-read their prompt and tokens later, and give the tokens they give
    alone, greedy and seeded sampling alike."""
    from aquila.inference.kv_cache import BlockPool

    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    warm = SamplingParams(temperature=0.9, top_k=20)
    requests = [
        Request(tuple(range(1 + i, 11 + i)), 16, SamplingParams(temperature=0) if i % 2 else warm, seed=i)
        for i in range(4)
    ]
    pool = BlockPool.for_model(model, 48, block_size=8)
    batch = DecodeBatch(model, 4, 64, pool=pool)
    seen_in_use = []
    seqs = [batch.add(r) for r in requests]
    while batch.seqs:
        batch.step()
        seen_in_use.append(pool.used_blocks)
    assert batch.preemptions > 0
    assert max(seen_in_use) <= pool.blocks
    assert pool.used_blocks == 0
    alone = [run(DecodeBatch(model, 1, 64), [r])[0].token_ids for r in requests]
    assert [s.completion.token_ids for s in seqs] == alone
    assert all(len(s.completion.token_ids) == 16 for s in seqs)


def test_a_sequence_grows_block_by_block_and_cancel_returns_its_blocks():
    from aquila.inference.kv_cache import BlockPool

    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    pool = BlockPool.for_model(model, 64, block_size=4)
    batch = DecodeBatch(model, 2, 64, pool=pool)
    seq = batch.add(Request((1, 2, 3, 4, 5), 20))
    held = []
    for _ in range(8):
        batch.step()
        held.append(len(seq.table.blocks))
    # blocks for the positions written, no more: step 1 reads the 5 prompt positions (and samples), each later
    # step writes its newest token's position, so after step k 4 + k positions are written
    assert held == [-(-(4 + k) // 4) for k in range(1, 9)]
    batch.cancel(seq, "cancelled")
    assert pool.used_blocks == 0 and seq.completion.finish_reason == "cancelled"


def test_a_sequence_longer_than_the_whole_pool_is_refused_when_added():
    import pytest

    from aquila.errors import AquilaError
    from aquila.inference.kv_cache import BlockPool

    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    batch = DecodeBatch(model, 2, 64, pool=BlockPool.for_model(model, 16, block_size=8))
    with pytest.raises(AquilaError, match="KV blocks"):
        batch.add(Request((1, 2, 3), 20))
    assert batch.add(Request((1, 2, 3), 13)).table.blocks == []  # 16 positions fit; blocks come as tokens do


def test_prompts_sharing_leading_blocks_read_them_once_and_give_the_same_tokens():
    from aquila.inference.kv_cache import BlockPool

    model = build_model(tiny_args(max_seq_len=64), seed=0).eval()
    common = tuple(range(3, 23))  # 20 ids: 2 full blocks of 8
    requests = [Request((*common, 30 + i, 31 + i), 6) for i in range(3)] + [Request(common, 6)]
    results, pools = {}, {}
    for sharing in (False, True):
        pool = pools[sharing] = BlockPool.for_model(model, 4 * 32, block_size=8, prefix_cache=sharing)
        batch = DecodeBatch(model, 4, 64, pool=pool)
        first = run(batch, requests[:1])  # alone: its filled blocks stay in the pool, unreferenced
        rest = run(batch, requests[1:])  # together, after it
        results[sharing] = [c.token_ids for c in first + rest]
        assert pool.used_blocks == 0
    assert results[True] == results[False]
    assert pools[False].prefix_hits == 0
    # 2 shared blocks for each of the 3 later prompts (the last one, exactly 20 ids, keeps its last id to read)
    assert pools[True].prefix_hits == 6


def test_unreferenced_prefix_blocks_are_evicted_least_recently_used_first_and_never_one_in_use():
    import pytest

    from aquila.inference.kv_cache import BlockPool, BlockTable, PoolExhausted

    pool = BlockPool(1, 1, 2, blocks=4, block_size=2)
    a, b, c = (BlockTable(pool) for _ in range(3))
    for t, ids in ((a, [1, 2]), (b, [4, 5]), (c, [7, 8])):
        assert t.reserve(2)
        t.register_full(ids, 2)  # one full block each: a registered prefix
    held = a.blocks[0]
    b.release()  # b's prefix block unreferenced first, then c's
    c.release()
    assert pool.free_blocks == 3 and pool.cached_blocks == 3
    taken = [pool.allocate() for _ in range(3)]  # the free one, then b's prefix (older), then c's
    assert held not in taken
    assert pool.lookup((4, 5)) is None and pool.lookup((7, 8)) is None and pool.lookup((1, 2)) == held
    with pytest.raises(PoolExhausted):
        pool.allocate()  # a's blocks are in use: never evicted
    shared = BlockTable(pool)
    assert shared.match_prefix([1, 2, 3]) == 2 and shared.blocks == [held] and pool.refs[held] == 2
