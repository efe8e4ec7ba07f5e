"""Choice scoring, greedy answers and perplexity against independent full-forward computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aquila.checkpoint import build_model
from aquila.evaluation.perplexity import perplexity, read_stream, sliding_windows
from aquila.evaluation.runner import evaluate_subset, greedy_answer
from aquila.evaluation.scoring import ChoiceRequest, ChoiceScorer
from aquila.evaluation.tasks import Item, Subset
from aquila.tokenizer import ENDOFTEXT, Tokenizer, bytes_to_unicode
from tests.conftest import tiny_args


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: 257 base ids (<|endoftext|> = 0, then one per byte) + 8 specials."""
    vocab = {ENDOFTEXT: 0}
    for i, ch in enumerate(bytes_to_unicode().values(), 1):
        vocab[ch] = i
    return Tokenizer(vocab, [])


def bigram_model(tok: Tokenizer, transitions: dict[str, str], strength: float = 3.0):
    """A model whose next token depends only on the current one: each key's single-byte token is followed by its
    value's token with probability ~1; any other token is followed by <|endoftext|> (a stop token).

    Blocks output zero (wo = w2 = 0), so the final hidden state is the normalised embedding: token t embeds as
    basis vector e_slot(t), and the output matrix maps slot(t) to its successor."""
    args = tiny_args(max_seq_len=256)
    model = build_model(args, seed=0).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0
        model.output.weight.zero_()
        model.output.weight[0, 0] = strength  # unlisted tokens -> <|endoftext|>
        for slot, (cur, nxt) in enumerate(transitions.items(), 1):
            (cur_id,), (nxt_id,) = tok.encode(cur), tok.encode(nxt)
            model.tok_embeddings.weight[cur_id] = 0.0
            model.tok_embeddings.weight[cur_id, slot] = 1.0
            model.output.weight[nxt_id, slot] = strength
    return model


@torch.no_grad()
def full_forward_logprob(model, context: list[int], cont: list[int]) -> float:
    ids = torch.tensor([context + cont])
    logp = model(ids)["logits"][0].log_softmax(-1).double()
    return float(sum(logp[len(context) + j - 1, t] for j, t in enumerate(cont)))


@torch.no_grad()
def full_forward_greedy(model, context: list[int], n: int, stop: set[int]) -> list[int]:
    ids, out = list(context), []
    for _ in range(n):
        token = int(model(torch.tensor([ids]))["logits"][0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        ids.append(token)
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_choice_logprob_is_sum_of_token_logprobs_from_a_full_forward(batch_size, monkeypatch):
    from aquila.inference.kv_cache import BlockPool

    pools = []
    made = BlockPool.for_model.__func__
    monkeypatch.setattr(
        BlockPool, "for_model", classmethod(lambda cls, *a, **k: pools.append(made(cls, *a, **k)) or pools[-1])
    )
    torch.manual_seed(0)
    model = build_model(tiny_args(), seed=0).eval()
    contexts = [[5, 17, 42, 8, 99], [7], [3, 3, 250, 11, 12, 13, 14]]
    conts = [[12], [40, 41, 42], [7, 8], [200, 3, 4, 5, 6], [9]]
    requests = [ChoiceRequest(c, conts, max_new_tokens=4) for c in contexts]
    scored = ChoiceScorer(model, batch_size).score(requests)
    for req, res in zip(requests, scored):
        expected = [full_forward_logprob(model, req.context, c) for c in conts]
        assert res.logprobs == pytest.approx(expected, abs=1e-4)
        assert res.generated == full_forward_greedy(model, req.context, 4, set())
    assert len(pools) == 1 and pools[0].used_blocks == 0  # every choice's and the prompt's blocks were returned


def test_greedy_stops_at_stop_tokens():
    tok = byte_tokenizer()
    model = bigram_model(tok, {":": " ", " ": "Y"})  # "Y" is unlisted -> <|endoftext|> (id 0)
    ctx = [tok.token_start_id, *tok.encode("Answer:")]
    (res,) = ChoiceScorer(model, stop_ids={0}).score([ChoiceRequest(ctx, [tok.encode(" Y")], max_new_tokens=6)])
    assert tok.decode(res.generated) == " Y"
    assert res.generated == full_forward_greedy(model, ctx, 6, {0})
    scorer = ChoiceScorer(model, stop_ids={0})
    (early,) = scorer.score([ChoiceRequest(ctx, [[5]], max_new_tokens=6)], done=lambda toks: len(toks) == 1)
    (none,) = scorer.score([ChoiceRequest(ctx, [[5]], max_new_tokens=0)])
    assert tok.decode(early.generated) == " " and none.generated == []


def _subset(items: list[Item], mode: str) -> Subset:
    return Subset("t", "s", "", items, items, "leave-one-out", mode, leave_one_out=True)


def test_constructed_model_picks_the_known_label_and_answers_it_greedily():
    tok = byte_tokenizer()
    model = bigram_model(tok, {":": " ", " ": "Y", "Y": "e", "e": "s", "s": "\n"})
    yes = Item("Passage: the sky is blue\nQuestion: Is it?\nAnswer:", (" No", " Yes"), 1, "yes:1")
    no = Item("Passage: grass is red\nQuestion: Is it?\nAnswer:", (" No", " Yes"), 0, "no:1")
    scorer = ChoiceScorer(model, batch_size=2, stop_ids={0, tok.token_end_id})
    requests = [
        ChoiceRequest([tok.token_start_id, *tok.encode(i.query)], [tok.encode(c) for c in i.choices], 6)
        for i in (yes, no)
    ]
    for res in scorer.score(requests):
        assert res.best == 1
        assert greedy_answer(tok.decode, res.generated, "label") == "Yes"
    result = evaluate_subset(scorer, tok, _subset([yes, no], "label"), shots=1, seed=0)
    assert (result["n"], result["acc"], result["em"], result["shots"]) == (2, 0.5, 0.5, 1)


def test_constructed_model_picks_the_known_letter():
    tok = byte_tokenizer()
    model = bigram_model(tok, {":": " ", " ": "C"})
    items = [
        Item(f"Question {i}\nA. x\nB. y\nC. z\nD. w\nAnswer:", (" A", " B", " C", " D"), gold, f"f:{i}")
        for i, gold in enumerate([2, 0, 2, 3])
    ]
    scorer = ChoiceScorer(model, batch_size=4, stop_ids={0})
    result = evaluate_subset(scorer, tok, _subset(items, "letter"), shots=2, seed=1)
    assert (result["acc"], result["em"]) == (0.5, 0.5)


def test_greedy_answer_normalisation():
    tok = byte_tokenizer()
    assert greedy_answer(tok.decode, tok.encode(" \n B. because"), "letter") == "B"
    assert greedy_answer(tok.decode, tok.encode("\n 体育。\n娱乐"), "label") == "体育"
    assert greedy_answer(tok.decode, [], "label") == ""


def test_sliding_windows_score_every_token_once_with_context():
    for n, window, stride in [(10, 4, 2), (11, 4, 3), (3, 8, 4), (100, 16, 15), (2, 2, 1)]:
        windows = sliding_windows(n, window, stride)
        scored = []
        for w in windows:
            assert w.end - w.begin <= window and w.targets <= w.end - w.begin
            first_target = w.end - w.targets
            assert w.begin < first_target or w.begin == 0  # every target has context (except token 0)
            scored += range(max(first_target, 1), w.end)
        assert scored == list(range(1, n))


def test_perplexity_of_one_window_is_exp_of_the_model_loss():
    model = build_model(tiny_args(), seed=0).eval()
    tokens = np.random.default_rng(0).integers(0, 300, size=40)
    ids = torch.tensor(tokens)[None]
    with torch.no_grad():
        loss = float(model(ids, labels=ids)["loss"])
    result = perplexity(model, tokens, window=64, stride=32)
    assert result["tokens"] == 39
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_perplexity_matches_per_token_logprobs_and_batching():
    model = build_model(tiny_args(), seed=0).eval()
    tokens = np.random.default_rng(1).integers(0, 300, size=101)
    window, stride = 16, 6
    nll = []
    for w in sliding_windows(len(tokens), window, stride):
        with torch.no_grad():
            logp = model(torch.tensor(tokens[w.begin : w.end])[None])["logits"][0].log_softmax(-1).double()
        for pos in range(max(w.end - w.targets, 1), w.end):
            nll.append(-float(logp[pos - w.begin - 1, tokens[pos]]))
    expected = math.exp(sum(nll) / len(nll))
    for batch_size in (1, 4):
        result = perplexity(model, tokens, window, stride, batch_size=batch_size)
        assert result["tokens"] == 100
        assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_read_stream_concatenates_sequences(tmp_path):
    from aquila.data.indexed_dataset import MMapIndexedDatasetBuilder

    with MMapIndexedDatasetBuilder(tmp_path / "d", dtype=np.uint16) as builder:
        builder.add_document([1, 2, 3])
        builder.add_document([4, 5])
    assert read_stream(tmp_path / "d").tolist() == [1, 2, 3, 4, 5]
    assert read_stream(tmp_path / "d", max_tokens=4).tolist() == [1, 2, 3, 4]


def test_prompts_with_a_shared_prefix_reuse_the_kept_pool_and_score_the_same():
    torch.manual_seed(0)
    model = build_model(tiny_args(), seed=0).eval()
    shots = list(range(10, 50))  # 40 ids of "few-shot examples": two full blocks shared by every prompt
    requests = [ChoiceRequest([1, *shots, 60 + i, 61], [[12], [40, 41], [7, 8, 9]], 3) for i in range(4)]
    shared, whole = ChoiceScorer(model, 2), ChoiceScorer(model, 2, prefix_cache=False)
    a, b = shared.score(requests[:2]), shared.score(requests[2:])  # one pool kept across calls
    c = whole.score(requests)
    assert shared.prefix_hits == 3 * 2 and whole.prefix_hits == 0  # every prompt after the first: 2 blocks
    for x, y in zip([*a, *b], c):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5) and x.generated == y.generated
        assert x.best == y.best
    assert shared.pool.used_blocks == 0 and shared.pool.cached_blocks >= 2


def test_scoring_request_is_choice_request_under_its_old_name_too():
    import aquila.evaluation.scoring as scoring

    with pytest.warns(DeprecationWarning, match="ChoiceRequest"):
        assert scoring.Request is ChoiceRequest
