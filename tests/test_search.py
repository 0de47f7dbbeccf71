"""Greedy and batched beam search: beam 1 == greedy, batched == per image, lengths, no crash."""

import contextlib
import copy
import dataclasses
import math

import pytest
import torch

from captioner.decoder import AttentionDecoder
from captioner.search import beam_search, greedy_search
from tests.conftest import CastCounter

B, L, D, V = 5, 7, 5, 13
IDS = dict(start_id=1, end_id=2, pad_id=0)


@pytest.fixture(scope="module")
def decoder():
    """A random decoder whose ``<end>`` is likely enough that hypotheses finish at varied
    lengths: greedy 2, 1, 15, 15, 2 tokens; beam 5 with ``length_penalty`` 1: 4-5 tokens."""
    torch.manual_seed(3)
    dec = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
    with torch.no_grad():
        dec.L_o.bias[IDS["end_id"]] += 0.8
    return dec


def test_the_fixture_finishes_some_hypotheses_and_not_others(decoder, annotations):
    g = greedy_search(decoder, annotations, max_length=15, **IDS)
    assert (g.lengths < 15).any() and (g.lengths == 15).any()


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


def test_an_empty_batch_gives_empty_results_of_one_shape(decoder):
    """Greedy gave ``(0, 1)`` tokens and beam search ``(0, 0)``: both now ``(0, 0)``."""
    empty = torch.zeros(0, L, D)
    for result in (greedy_search(decoder, empty, max_length=6, **IDS),
                   beam_search(decoder, empty, beam_size=3, max_length=6, **IDS)):
        assert result.tokens.shape == (0, 0) and result.tokens.dtype == torch.long
        assert result.alphas.shape == (0, 0, L) and result.betas.shape == (0, 0)
        assert result.lengths.shape == (0,) and result.scores.shape == (0,)


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
    assert ended.sum() >= 2
    assert (b.scores[ended] >= g.scores[ended] - 1e-4).all()
    assert (b.scores > g.scores + 1e-3).any()  # and strictly better somewhere


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


@pytest.mark.parametrize("search, kw, name", [
    (greedy_search, dict(max_length=0), "max_length"),
    (beam_search, dict(beam_size=3, max_length=-2), "max_length"),
    (beam_search, dict(beam_size=0, max_length=5), "beam_size"),
])
def test_impossible_settings_are_clear_errors(decoder, annotations, search, kw, name):
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        search(decoder, annotations, **kw, **IDS)


def test_never_emits_pad_or_start_and_pads_after_end(decoder, annotations):
    for r in (greedy_search(decoder, annotations, max_length=15, **IDS),
              beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)):
        assert (r.lengths < 15).any()  # some rows are padded after their <end>
        for i in range(B):
            n = int(r.lengths[i])
            assert not ((r.tokens[i, :n] == 0) | (r.tokens[i, :n] == 1)).any()
            assert (r.tokens[i, n:] == 0).all()
            assert (r.alphas[i, n:] == 0).all()
            assert (r.betas[i, n:] == 0).all()
            assert torch.allclose(r.alphas[i, :n].sum(-1), torch.ones(n), atol=1e-5)


def test_length_penalty_prefers_longer_hypotheses(decoder, annotations):
    raw = beam_search(decoder, annotations, beam_size=5, max_length=15, **IDS)
    norm = beam_search(decoder, annotations, beam_size=5, max_length=15, length_penalty=1.0, **IDS)
    assert (norm.lengths >= raw.lengths).all()
    assert norm.lengths.float().mean() > raw.lengths.float().mean() + 1


# ---------------------------------------------------------------- annotations shared among beams
class CopiedKeysDecoder(AttentionDecoder):
    """Every hypothesis gets its own copy of its image's annotations (the pre-sharing path)."""

    def expand_beams(self, state, k):
        return state.repeat_rows(k, share_keys=False)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("min_length", [1, 12])
def test_shared_beam_keys_decode_as_copied_keys(decoder, annotations, k, masked, min_length):
    """Also with every beam alive for all 12 steps (min_length 12): with the default the
    fixture's beams end after a few tokens, and a fault in later steps could go unseen."""
    copied = CopiedKeysDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
    copied.load_state_dict(decoder.state_dict())
    mask = None
    if masked:  # ragged source lengths, as in translation
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[0, 4:] = mask[3, 2:] = False
    kw = dict(beam_size=k, mask=mask, max_length=12, min_length=min_length, **IDS)
    a = beam_search(decoder, annotations, **kw)
    b = beam_search(copied, annotations, **kw)
    assert min_length == 1 or (a.lengths == 12).all()
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.alphas, b.alphas, rtol=0, atol=1e-6)


class ProtocolOnlyDecoder:
    """The search protocol alone (no ``expand_beams``, no ``frozen_weights``), recording the
    rows of every step."""

    def __init__(self, decoder):
        self.decoder, self.rows = decoder, []

    def init_state(self, annotations, mask=None):
        return self.decoder.init_state(annotations, mask)

    def step(self, prev, state):
        self.rows.append(prev.shape[0])
        return self.decoder.step(prev, state)


@pytest.mark.parametrize("k", [1, 3])
def test_step_zero_runs_once_per_image_and_the_beams_follow(decoder, annotations, k):
    """Step 0 reads ``<start>`` from one state per image: it runs on ``B`` rows, the later
    steps on ``B K``; the protocol's ``select`` path decodes as ``expand_beams`` does."""
    kw = dict(beam_size=k, max_length=6, min_length=6, **IDS)
    plain = ProtocolOnlyDecoder(decoder)
    a, b = beam_search(plain, annotations, **kw), beam_search(decoder, annotations, **kw)
    assert plain.rows == [B] + [B * k] * 5
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    first = decoder.step(torch.full((B,), IDS["start_id"]), decoder.init_state(annotations))
    torch.testing.assert_close(b.alphas[:, 0], first[2])  # every image's step-0 attention


def test_expand_beams_shares_annotations_only_where_the_score_does_not_read_them(annotations):
    torch.manual_seed(0)
    additive = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11).eval()
    state = additive.init_state(annotations)
    beams = additive.expand_beams(state, 3)
    assert beams.group == 3 and beams.keys is annotations  # (B, L, D), not repeated
    assert beams.h.shape == (3 * B, 11) and beams.proj_keys.shape[0] == 3 * B
    torch.testing.assert_close(beams.h[3:6], state.h[1:2].expand(3, -1))
    assert additive.step(torch.ones(3 * B, dtype=torch.long), beams)[1].group == 3
    assert additive.expand_beams(state, 1).group == 1
    assert additive.expand_beams(dataclasses.replace(state, step=1), 3).step == 1
    from captioner.attention import DotAttention

    dot = AttentionDecoder(V, D, embed_dim=9, hidden_dim=D, attention=DotAttention).eval()
    copied = dot.expand_beams(dot.init_state(annotations), 3)  # its score reads the keys
    assert copied.group == 1 and copied.keys.shape == (3 * B, L, D)
    torch.testing.assert_close(copied.keys[3:6], annotations[1:2].expand(3, -1, -1))
    hard = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, attention_mode="hard").eval()
    assert hard.expand_beams(hard.init_state(annotations), 3).group == 1


def test_shared_keys_context_and_select_by_hand():
    from captioner.decoder import DecoderState

    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]],
                         [[2.0, 2.0], [1.0, -1.0], [0.0, 4.0]]])  # (2 images, L=3, D=2)
    alpha = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0],    # image 0's two beams
                          [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])  # image 1's two beams
    h = torch.arange(8.0).view(4, 2)
    state = DecoderState(h, -h, keys, None, None, group=2)
    expected = torch.tensor([[0.5, 1.0], [3.0, 1.0], [2.0, 2.0], [0.75, 2.25]])
    torch.testing.assert_close(state.context(alpha), expected)
    picked = state.select(torch.tensor([3, 0, 0]))  # copied out: one key row per row
    assert picked.group == 1 and torch.equal(picked.keys, keys[[1, 0, 0]])
    assert torch.equal(picked.h, h[[3, 0, 0]])
    torch.testing.assert_close(picked.context(alpha[[3, 0, 0]]), expected[[3, 0, 0]])
    moved = state.select_recurrent(torch.tensor([1, 1, 2, 3]))  # beams stay with their image
    assert moved.group == 2 and moved.keys is keys and torch.equal(moved.h, h[[1, 1, 2, 3]])


# ---------------------------------------------------------------- against exhaustive search
T_SMALL, V_SMALL = 4, 6  # every caption of up to 4 tokens over 4 words + <end>: 340 of them


def _small_decoder(end_bias: float) -> tuple[AttentionDecoder, torch.Tensor]:
    torch.manual_seed(0)
    dec = AttentionDecoder(V_SMALL, D, embed_dim=4, hidden_dim=6, dropout=0.0).eval()
    with torch.no_grad():
        dec.L_o.bias[IDS["end_id"]] += end_bias
    return dec, torch.randn(3, 4, D) * 2


def _replay(dec, annotations, tokens):
    """Teacher-force ``tokens`` on one image: total log-prob, alphas ``(T, L)``, betas."""
    state, prev, total, alphas, betas = dec.init_state(annotations), torch.tensor([1]), 0.0, [], []
    with torch.no_grad():
        for tok in tokens:
            logp, state, alpha, beta = dec.step(prev, state)
            total += float(logp[0, tok])
            alphas.append(alpha[0])
            betas.append(beta[0])
            prev = torch.tensor([tok])
    return total, torch.stack(alphas), torch.stack(betas)


@pytest.mark.parametrize("end_bias, min_length, length_penalty",
                         [(1.0, 2, 0.0), (1.0, 3, 1.0), (0.0, 1, 1.0), (2.0, 2, 0.5)])
def test_a_wide_beam_returns_the_exhaustive_optimum(end_bias, min_length, length_penalty):
    """With K larger than every hypothesis set, beam search is exact: compare it with the best
    of all captions ranked by ``score / length ** length_penalty``."""
    import itertools

    dec, ann = _small_decoder(end_bias)
    words = [2, 3, 4, 5]  # <end> and the four words (never <pad> / <start>)
    for i in range(ann.shape[0]):
        best = None
        for n in range(min_length, T_SMALL + 1):
            for seq in itertools.product(words, repeat=n):
                if 2 in seq[:-1] or (n < T_SMALL and seq[-1] != 2):
                    continue  # <end> only last; shorter than T_SMALL only if it ended
                score = _replay(dec, ann[i:i + 1], seq)[0]
                if best is None or score / n ** length_penalty > best[0]:
                    best = (score / n ** length_penalty, score, seq)
        r = beam_search(dec, ann[i:i + 1], beam_size=64, max_length=T_SMALL,
                        min_length=min_length, length_penalty=length_penalty, **IDS)
        n = int(r.lengths[0])
        assert tuple(r.tokens[0, :n].tolist()) == best[2]
        assert float(r.scores[0]) == pytest.approx(best[1], abs=1e-4)


def test_beam_alphas_and_betas_are_those_of_the_returned_tokens():
    """After backtracking through the beams, step t's alpha and beta are the ones that produced
    token t (replayed under teacher forcing)."""
    torch.manual_seed(1)
    dec = AttentionDecoder(V, D, embed_dim=4, hidden_dim=6, dropout=0.0).eval()
    ann = torch.randn(8, L, D) * 2
    r = beam_search(dec, ann, beam_size=3, max_length=10, length_penalty=1.0, **IDS)
    assert len(set(r.lengths.tolist())) > 1
    for i in range(8):
        n = int(r.lengths[i])
        score, alphas, betas = _replay(dec, ann[i:i + 1], r.tokens[i, :n].tolist())
        torch.testing.assert_close(r.alphas[i, :n], alphas)
        torch.testing.assert_close(r.betas[i, :n], betas)
        assert float(r.scores[i]) == pytest.approx(score, abs=1e-4)


def test_min_length_is_exact_when_end_is_the_likeliest_word():
    dec, ann = _small_decoder(3.0)
    for m in (1, 2, 3):
        for r in (greedy_search(dec, ann, max_length=T_SMALL, min_length=m, **IDS),
                  beam_search(dec, ann, beam_size=2, max_length=T_SMALL, min_length=m, **IDS)):
            assert (r.lengths == m).all(), (m, r.lengths)


def test_greedy_scores_stop_at_end():
    dec, ann = _small_decoder(0.3)
    g = greedy_search(dec, ann, max_length=T_SMALL, **IDS)
    assert (g.lengths < T_SMALL).any() and (g.lengths == T_SMALL).any()
    for i in range(ann.shape[0]):
        n = int(g.lengths[i])
        replayed = _replay(dec, ann[i:i + 1], g.tokens[i, :n].tolist())[0]
        assert float(g.scores[i]) == pytest.approx(replayed, abs=1e-4)


def test_float64_decoders_score_in_float64():
    """A float64 model's search accumulates its scores in float64 (not float32): greedy and beam
    scores equal the replayed float64 sums to 1e-12."""
    dec, ann = _small_decoder(0.3)
    dec, ann = dec.double(), ann.double()
    for result in (greedy_search(dec, ann, max_length=T_SMALL, **IDS),
                   beam_search(dec, ann, beam_size=2, max_length=T_SMALL, **IDS)):
        assert result.scores.dtype == torch.float64
        for i in range(ann.shape[0]):
            n = int(result.lengths[i])
            replayed = _replay(dec, ann[i:i + 1], result.tokens[i, :n].tolist())[0]
            assert float(result.scores[i]) == pytest.approx(replayed, abs=1e-12, rel=0)


def test_exact_stopping_never_ranks_worse_and_finds_better_hypotheses():
    """``stop="exact"`` searches until no alive beam can outrank the best finished hypothesis:
    its result is never ranked below the K-finished rule's, and better where an alive beam
    would have gone on to win (with a length penalty, longer hypotheses)."""
    better = 0
    for seed in range(4):
        torch.manual_seed(seed)
        dec = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
        with torch.no_grad():
            dec.L_o.bias[IDS["end_id"]] += 0.5 + seed % 2 * 0.5
        ann = torch.randn(16, L, D) * 3
        for k in (2, 3):
            for penalty in (0.0, 0.5, 1.0):
                kw = dict(beam_size=k, max_length=12, length_penalty=penalty, **IDS)
                usual = beam_search(dec, ann, **kw)
                exact = beam_search(dec, ann, stop="exact", **kw)
                rank_usual = usual.scores / usual.lengths.float() ** penalty
                rank_exact = exact.scores / exact.lengths.float() ** penalty
                assert (rank_exact >= rank_usual - 1e-5).all(), (seed, k, penalty)
                better += int((rank_exact > rank_usual + 1e-5).sum())
    assert better >= 5
    with pytest.raises(ValueError, match="stop must be"):
        beam_search(dec, ann, beam_size=2, stop="first", **IDS)


def _never_stopping_beam(dec, ann, k, max_length, min_length, penalty):
    """Reference: one image, the library's candidate rules (best ``2K``; an ``<end>`` among the
    first ``K`` ends a hypothesis), but the search runs to ``max_length`` and keeps every ended
    hypothesis. Returns the best rank ``score / length ** penalty``."""
    from captioner.search import _constrain

    state = dec.init_state(ann)
    beams = [((), 0.0)]  # (tokens, score)
    ended = []
    for t in range(max_length):
        prev = torch.tensor([toks[-1] if toks else IDS["start_id"] for toks, _ in beams])
        rows = state.select(torch.zeros(len(beams), dtype=torch.long)) if t == 0 else state
        with torch.no_grad():
            logp, rows, _, _ = dec.step(prev, rows)
        logp = _constrain(logp, t, min_length, IDS["end_id"], (IDS["pad_id"], IDS["start_id"]))
        cand = torch.tensor([s for _, s in beams]).unsqueeze(1) + logp  # (n, V)
        scores, flat = cand.view(-1).topk(min(2 * k, cand.numel()))
        keep, alive = [], []
        for rank, (score, j) in enumerate(zip(scores.tolist(), flat.tolist())):
            b, tok = divmod(j, logp.shape[1])
            if score == float("-inf"):
                continue
            if tok == IDS["end_id"]:
                if rank < k:
                    ended.append(score / (t + 1) ** penalty)
            elif len(alive) < k:
                alive.append((beams[b][0] + (tok,), score))
                keep.append(b)
        if t == max_length - 1:
            ended += [s / max_length ** penalty for _, s in alive]
            break
        beams, state = alive, rows.select(torch.tensor(keep))
    return max(ended)


@pytest.mark.parametrize("penalty", [-0.5, 1.0, 2.0])
@pytest.mark.parametrize("min_length", [1, 3])
@pytest.mark.parametrize("end_bias", [1.0, 2.0])
def test_exact_stopping_equals_a_search_that_never_stops(penalty, min_length, end_bias):
    """The bound is right for every sign of the length penalty: stopping early never loses the
    hypothesis a search run to ``max_length`` would return (same beam, same pruning). (A bound
    without its ``max_length`` term fails here at penalty 2, end bias 2.)"""
    for seed in range(3):
        torch.manual_seed(seed)
        dec = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
        with torch.no_grad():
            dec.L_o.bias[IDS["end_id"]] += end_bias
        ann = torch.randn(4, L, D) * 3
        r = beam_search(dec, ann, beam_size=2, max_length=8, min_length=min_length,
                        length_penalty=penalty, stop="exact", **IDS)
        for i in range(4):
            expected = _never_stopping_beam(dec, ann[i:i + 1], 2, 8, min_length, penalty)
            got = float(r.scores[i]) / int(r.lengths[i]) ** penalty
            assert got == pytest.approx(expected, abs=1e-4), (seed, i)


def test_exact_stopping_with_a_wide_beam_is_the_exhaustive_optimum():
    import itertools

    dec, ann = _small_decoder(0.0)
    for i in range(ann.shape[0]):
        ranks = []
        for n in range(1, T_SMALL + 1):
            for seq in itertools.product([2, 3, 4, 5], repeat=n):
                if 2 in seq[:-1] or (n < T_SMALL and seq[-1] != 2):
                    continue
                ranks.append(_replay(dec, ann[i:i + 1], seq)[0] / n)
        r = beam_search(dec, ann[i:i + 1], beam_size=64, max_length=T_SMALL, length_penalty=1.0,
                        stop="exact", **IDS)
        assert float(r.scores[0]) / int(r.lengths[0]) == pytest.approx(max(ranks), abs=1e-4)


def test_autocast_search_casts_each_weight_once_and_sees_every_update(annotations):
    """Under autocast, a search casts each weight once (autocast caches only whole leaf
    parameters, and not at all under Lightning's ``bf16-mixed``, so every step would cast the
    output layer and the views of ``lstm.weight_ih`` again) and the keys once; the results are
    bit-identical to per-step casting; and a weight changed between two searches by a fused
    optimiser (which does not bump the tensor's version) is seen by the next search."""
    torch.manual_seed(5)
    E, N, T = 9, 11, 6
    dec = AttentionDecoder(V, D, embed_dim=E, hidden_dim=N, dropout=0.0).eval()
    weight_shapes = [(4 * N, E), (4 * N, D), (4 * N, E + D)]

    def search(decoder: AttentionDecoder, per_step_casts: bool = False):
        if per_step_casts:  # a fresh copy without the block: nothing cached, cast at each step
            decoder = copy.deepcopy(decoder)
            decoder.frozen_weights = contextlib.nullcontext
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return beam_search(decoder, annotations, beam_size=3, max_length=T, **IDS)

    with CastCounter([*weight_shapes, (V, E), (B, L, D)]) as casts:
        once = search(dec)
    assert sum(casts.counts[s] for s in weight_shapes) == 1 and casts.counts[(V, E)] == 1
    assert casts.counts[(B, L, D)] <= 2  # the keys for the context, and the key projection
    with CastCounter(weight_shapes) as casts:
        reference = search(dec, per_step_casts=True)
    assert sum(casts.counts.values()) >= T  # what the block saves
    assert torch.equal(once.tokens, reference.tokens)
    assert torch.equal(once.scores, reference.scores)

    opt = torch.optim.Adam(dec.parameters(), lr=0.05, fused=True)
    version = dec.lstm.weight_ih._version
    dec(annotations, torch.randint(3, V, (B, T))).logits.square().mean().backward()
    opt.step()
    assert dec.lstm.weight_ih._version == version  # the fused kernel leaves the version as is
    after, reference = search(dec), search(dec, per_step_casts=True)
    assert not torch.equal(after.scores, once.scores)
    assert torch.equal(after.tokens, reference.tokens)
    assert torch.equal(after.scores, reference.scores)


class TiedDecoder(ProtocolOnlyDecoder):
    """Log-probabilities rounded to halves: many exactly equal, ``<end>`` often tied with a
    word (what bf16 log-probabilities do now and then)."""

    def step(self, prev, state):
        log_probs, state, alpha, beta = super().step(prev, state)
        return (log_probs * 2).round() / 2, state, alpha, beta


@pytest.mark.parametrize("seed", range(4))
def test_beam_size_one_equals_greedy_when_scores_tie(seed):
    """Equal scores rank by index in both searches (greedy's ``max``: the lower token id), so
    ``K = 1`` decodes as greedy also where a word and ``<end>`` have the same log-probability."""
    torch.manual_seed(seed)
    dec = AttentionDecoder(V, D, embed_dim=9, hidden_dim=11, dropout=0.0).eval()
    with torch.no_grad():
        dec.L_o.bias[IDS["end_id"]] += 1.0
    ann = torch.randn(17, L, D) * 3
    tied = TiedDecoder(dec)
    g = greedy_search(tied, ann, max_length=12, **IDS)
    b = beam_search(tied, ann, beam_size=1, max_length=12, **IDS)
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.scores, b.scores, rtol=0, atol=0)


def test_best_is_the_head_of_a_stable_descending_sort():
    """``_best``'s ``n`` entries equal a stable sort's first ``n``: ties inside the cut ordered
    by column, ties across it keeping the lower columns."""
    from captioner.search import _best

    torch.manual_seed(0)
    values = torch.randint(0, 4, (200, 11)).float()  # many equal values in every row
    values[:5, 3:] = float("-inf")  # rows whose finite part is shorter than some cuts
    for n in (1, 2, 3, 6, 11):
        top, index = _best(values, n)
        want_top, want_index = values.sort(dim=1, descending=True, stable=True)
        finite = torch.isfinite(want_top[:, :n])
        assert torch.equal(top, want_top[:, :n])
        assert torch.equal(index[finite], want_index[:, :n][finite])


class _ImageRows:
    """The search protocol's state for a decoder that keeps nothing but each row's image."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def select(self, index):
        return _ImageRows(self.images[index])

    select_recurrent = select


class _TableDecoder:
    """Log-probabilities that depend on the image and the previous token only:
    ``log table[image, prev]`` (``(B, V, V)`` probabilities, or one ``(V, V)`` table for
    every image); L = 3, beta 0.5."""

    def __init__(self, table):
        self.table = torch.log(torch.tensor(table))
        if self.table.dim() == 2:
            self.table = self.table.unsqueeze(0)

    def init_state(self, annotations, mask=None):
        return _ImageRows(torch.arange(annotations.shape[0]))

    def step(self, prev, state):
        R = prev.shape[0]
        log_probs = self.table[state.images % self.table.shape[0], prev]
        return log_probs, state, torch.full((R, 3), 1 / 3), torch.full((R,), 0.5)


# V = 4 (<pad> 0, <start> 1, <end> 2, w 3): after <start>, <end> 0.3 and w 0.7; after anything
# else, <end> 1 - 1e-6 and w 1e-6
TWO_STEPS = [[0, 0, 1 - 1e-6, 1e-6], [0, 0, 0.3, 0.7], [0, 0, 1 - 1e-6, 1e-6],
             [0, 0, 1 - 1e-6, 1e-6]]


def test_exact_stopping_bound_with_a_negative_length_penalty():
    """Guards the ``s / (t + 2)^p`` term of ``stop="exact"``'s bound: with ``p < 0`` a longer
    hypothesis ranks *worse*, so an alive beam's best possible rank is the one it gets by ending
    at the very next step. K = 2, p = -1, max_length = 8 (rank = score * length):
    step 0: [<end>] finishes with rank log 0.3 * 1 = -1.204; w stays alive with s = log 0.7 =
    -0.357, bound max(-0.357 * 2, -0.357 * 8) = -0.713 > -1.204: search goes on (a bound of
    s * 8 = -2.853 alone would stop here and return [<end>]).
    step 1: [w, <end>] finishes with score log 0.7 + log(1 - 1e-6) = -0.35668, rank -0.713,
    the best: returned with length 2."""
    ann = torch.zeros(1, 3, 2)
    r = beam_search(_TableDecoder(TWO_STEPS), ann, beam_size=2, max_length=8,
                    length_penalty=-1.0, stop="exact", **IDS)
    assert r.lengths.tolist() == [2]
    assert r.tokens.tolist() == [[3, 2]]
    assert r.scores.item() == pytest.approx(math.log(0.7), abs=1e-5)  # -0.356675


def test_k_finished_stops_once_k_hypotheses_end_even_at_one_step():
    """V = 6 (<pad>, <start>, <end>, a 3, b 4, c 5), length penalty 1 (rank = mean log-prob).
    After <start>: <end> 0.1, a 0.5, b 0.4; after a or b: <end> 0.6, c 0.4; after c: <end> 1.
    K = 2: step 0 keeps [a] (-0.693) and [b] (-0.916) ([<end>], third, is not among the first K);
    step 1 ranks [a <end>] log 0.3 = -1.204 and [b <end>] log 0.24 = -1.427 first: both end at
    once, K have finished, and [a <end>] (rank -0.602) is returned. A search that went on would
    find [a c <end>], log 0.2 = -1.609 over 3 tokens, rank -0.536 (what stop="exact" returns).
    K = 1 is greedy search whatever the length penalty: [a <end>]."""
    table = [[0.0] * 6, [0, 0, 0.1, 0.5, 0.4, 0], [0.0] * 6,
             [0, 0, 0.6, 0, 0, 0.4], [0, 0, 0.6, 0, 0, 0.4], [0, 0, 1.0, 0, 0, 0]]
    ann = torch.zeros(1, 3, 2)
    kw = dict(max_length=5, length_penalty=1.0, **IDS)
    for k in (1, 2):
        r = beam_search(_TableDecoder(table), ann, beam_size=k, **kw)
        assert r.tokens.tolist() == [[3, 2]] and r.lengths.tolist() == [2], k
        assert r.scores.item() == pytest.approx(math.log(0.3), abs=1e-6)
    greedy = greedy_search(_TableDecoder(table), ann, max_length=5, **IDS)
    assert greedy.tokens.tolist() == [[3, 2]]
    exact = beam_search(_TableDecoder(table), ann, beam_size=2, stop="exact", **kw)
    assert exact.tokens.tolist() == [[3, 5, 2]]
    assert exact.scores.item() == pytest.approx(math.log(0.2), abs=1e-6)


def test_an_image_done_at_the_last_step_returns_a_finished_hypothesis():
    """V = 4 (<pad>, <start>, <end>, w 3). Image 0: after <start> <end> 0.3, w 0.7; after w
    <end> 0.2, w 0.8. K = 2, max_length = 2: step 0 finishes [<end>] (log 0.3 = -1.204) and
    keeps [w]; step 1, the last, ranks [w w] (log 0.56 = -0.580) above [w <end>]
    (log 0.14 = -1.966), which finishes as the second: K have finished, image 0 is done and
    [<end>] is returned, not the unfinished [w w]. Image 1 never ends (w 1 always): it is still
    searching after the last step, and its alive [w w] (score 0) is returned. With
    stop="exact" image 0 is not done either (-0.580 > -1.204): its alive [w w] wins."""
    table = [[[0.0] * 4, [0, 0, 0.3, 0.7], [0.0] * 4, [0, 0, 0.2, 0.8]],
             [[0.0] * 4, [0, 0, 0.0, 1.0], [0.0] * 4, [0, 0, 0.0, 1.0]]]
    ann = torch.zeros(2, 3, 2)
    r = beam_search(_TableDecoder(table), ann, beam_size=2, max_length=2, **IDS)
    assert r.tokens.tolist() == [[2, 0], [3, 3]] and r.lengths.tolist() == [1, 2]
    assert r.scores.tolist() == pytest.approx([math.log(0.3), 0.0], abs=1e-6)
    exact = beam_search(_TableDecoder(table), ann, beam_size=2, max_length=2, stop="exact", **IDS)
    assert exact.tokens.tolist() == [[3, 3], [3, 3]]
    assert exact.scores.tolist() == pytest.approx([math.log(0.56), 0.0], abs=1e-6)


def test_a_beam_wider_than_the_live_candidates_counts_only_real_ends():
    """V = 4 (<pad>, <start>, <end>, w 3): after <start> <end> 0.3, w 0.7; after w <end> 0.2,
    w 0.8. With K = 5 most of the 2K candidates are -inf (one live hypothesis per step); those
    are no finished hypotheses. Only 4 hypotheses ever end within max_length = 4, so the image
    is never done and the alive [w w w w], log(0.7 * 0.8^3) = log 0.3584 = -1.026, wins over
    [<end>] (log 0.3 = -1.204)."""
    table = [[0.0] * 4, [0, 0, 0.3, 0.7], [0.0] * 4, [0, 0, 0.2, 0.8]]
    r = beam_search(_TableDecoder(table), torch.zeros(1, 3, 2), beam_size=5, max_length=4, **IDS)
    assert r.tokens.tolist() == [[3, 3, 3, 3]] and r.lengths.tolist() == [4]
    assert r.scores.item() == pytest.approx(math.log(0.3584), abs=1e-6)
