"""Greedy and batched beam search: beam 1 == greedy, batched == per image, lengths, no crash."""

import pytest
import torch

from captioner.decoder import AttentionDecoder
from captioner.search import beam_search, greedy_search

B, L, D, V = 5, 7, 5, 13
IDS = dict(start_id=1, end_id=2, pad_id=0)


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(3)
    return AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()


@pytest.fixture(scope="module")
def annotations():
    torch.manual_seed(4)
    return torch.randn(B, L, D) * 3


def test_beam_size_one_equals_greedy(decoder, annotations):
    g = greedy_search(decoder, annotations, max_length=15, **IDS)
    b = beam_search(decoder, annotations, beam_size=1, max_length=15, **IDS)
    assert torch.equal(g.tokens, b.tokens)
    assert torch.equal(g.lengths, b.lengths)
    assert torch.allclose(g.scores, b.scores, atol=1e-5)
    assert torch.allclose(g.alphas, b.alphas, atol=1e-6)


@pytest.mark.parametrize("k", [3, 5])
def test_batched_beam_equals_per_image_beam(decoder, annotations, k):
    batched = beam_search(decoder, annotations, beam_size=k, max_length=15, **IDS)
    for i in range(B):
        single = beam_search(decoder, annotations[i:i + 1], beam_size=k, max_length=15, **IDS)
        n = int(single.lengths[0])
        assert int(batched.lengths[i]) == n
        assert torch.equal(batched.tokens[i, :n], single.tokens[0, :n])
        assert torch.allclose(batched.scores[i], single.scores[0], atol=1e-4)


def test_beam_finds_a_score_at_least_as_good_as_greedy(decoder, annotations):
    g = greedy_search(decoder, annotations, max_length=15, **IDS)
    b = beam_search(decoder, annotations, beam_size=5, max_length=15, **IDS)
    # greedy hypotheses that ended are in the beam's search space
    ended = g.tokens.gather(1, (g.lengths - 1).unsqueeze(1)).squeeze(1) == 2
    assert (b.scores[ended] >= g.scores[ended] - 1e-4).all()


def test_scores_are_the_sum_of_token_log_probs(decoder, annotations):
    b = beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)
    for i in range(B):
        n = int(b.lengths[i])
        state = decoder.init_state(annotations[i:i + 1])
        prev, total = torch.tensor([1]), 0.0
        for t in range(n):
            logp, state, _, _ = decoder.step(prev, state)
            tok = b.tokens[i, t]
            total += float(logp[0, tok].detach())
            prev = tok.view(1)
        assert abs(total - float(b.scores[i])) < 1e-3


def test_min_equals_max_length_decodes_exactly_that_many_steps(decoder, annotations):
    for k in (1, 3):
        r = beam_search(decoder, annotations, beam_size=k, max_length=20, min_length=20, **IDS)
        assert r.tokens.shape == (B, 20) and (r.lengths == 20).all()
    g = greedy_search(decoder, annotations, max_length=20, min_length=20, **IDS)
    assert (g.lengths == 20).all()


def test_no_crash_when_no_hypothesis_ends():
    torch.manual_seed(0)
    dec = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
    with torch.no_grad():
        dec.L_o.bias[2] = -1e4  # <end> essentially impossible
    ann = torch.randn(3, L, D)
    r = beam_search(dec, ann, beam_size=4, max_length=6, **IDS)
    assert r.tokens.shape == (3, 6) and (r.lengths == 6).all()
    assert (r.tokens != 2).all() and torch.isfinite(r.scores).all()


def test_never_emits_pad_or_start_and_pads_after_end(decoder, annotations):
    for r in (greedy_search(decoder, annotations, max_length=15, **IDS),
              beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)):
        for i in range(B):
            n = int(r.lengths[i])
            assert not ((r.tokens[i, :n] == 0) | (r.tokens[i, :n] == 1)).any()
            assert (r.tokens[i, n:] == 0).all()
            assert (r.alphas[i, n:] == 0).all()
            assert torch.allclose(r.alphas[i, :n].sum(-1), torch.ones(n), atol=1e-5)


def test_length_penalty_prefers_longer_hypotheses(decoder, annotations):
    raw = beam_search(decoder, annotations, beam_size=5, max_length=15, **IDS)
    norm = beam_search(decoder, annotations, beam_size=5, max_length=15, length_penalty=1.0, **IDS)
    assert norm.lengths.float().mean() >= raw.lengths.float().mean()
