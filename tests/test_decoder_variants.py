"""The decoder with the attention family: soft numerics unchanged, position-aware attention gets
the step, no-attention (Show and Tell), hard attention (train / test), config reachability."""

import functools
import re

import pytest
import torch
from torch import nn

from captioner.attention import (
    AdditiveAttention,
    CosineAttention,
    GeneralAttention,
    LocalAttention2d,
    LocalMonotonicAttention,
    LocalPredictiveAttention,
    LocationAttention,
    NoAttention,
    ScaledDotProductAttention,
)
from captioner.config import instantiate
from captioner.decoder import AttentionDecoder
from captioner.lit.captioning import CaptioningModule
from captioner.losses import doubly_stochastic_penalty, masked_nll
from captioner.search import beam_search, greedy_search

B, L, D, V, E, N = 3, 9, 5, 11, 7, 13  # L = 9: a 3 x 3 grid for the 2-D local attention
IDS = dict(start_id=1, end_id=2, pad_id=0)

ATTENTIONS = {
    "additive": functools.partial(AdditiveAttention, attention_dim=3),
    "general": GeneralAttention,
    "scaled_dot": functools.partial(ScaledDotProductAttention, attention_dim=3),
    "cosine": CosineAttention,
    "location": functools.partial(LocationAttention, num_positions=L),
    "local_m": functools.partial(LocalMonotonicAttention, window=1),
    "local_p": functools.partial(LocalPredictiveAttention, window=2, position_dim=3),
    "local_2d": functools.partial(LocalAttention2d, window=1, position_dim=3),
    "none": NoAttention,
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(attention=ATTENTIONS["additive"], **kw) -> AttentionDecoder:
    torch.manual_seed(0)
    return AttentionDecoder(V, D, embed_dim=E, hidden_dim=N, dropout=0.0, attention=attention, **kw)


def data(T: int = 6):
    g = torch.Generator().manual_seed(1)
    annotations = torch.randn(B, L, D, generator=g) * 2
    captions = torch.randint(3, V, (B, T), generator=g)
    captions[:, 0] = 1
    captions[0, 4:] = 0
    return annotations, captions


def test_soft_attention_numerics_match_the_reference_before_the_attention_family():
    """Numbers computed with the decoder as it was before this change (same seeds)."""
    torch.manual_seed(0)
    dec = AttentionDecoder(11, 5, embed_dim=7, hidden_dim=9, dropout=0.0,
                           attention=lambda q, k: AdditiveAttention(q, k, attention_dim=3))
    g = torch.Generator().manual_seed(1)
    ann = torch.randn(3, 7, 5, generator=g)
    cap = torch.randint(3, 11, (3, 6), generator=g)
    cap[:, 0] = 1
    out = dec(ann, cap)
    torch.testing.assert_close(out.logits[0, 0, :4], torch.tensor(
        [0.29814857244491577, -0.41132017970085144, 0.3931106925010681, 0.6497385501861572]))
    assert out.logits.sum().item() == pytest.approx(19.53921890258789, abs=1e-4)
    torch.testing.assert_close(out.alphas[1, 2], torch.tensor(
        [0.17969517409801483, 0.09140440821647644, 0.09215648472309113, 0.1462344527244568,
         0.13680970668792725, 0.14858534932136536, 0.20511440932750702]))
    torch.testing.assert_close(out.betas[2], torch.tensor(
        [0.4739459455013275, 0.4306909143924713, 0.4512791633605957, 0.4385872185230255,
         0.44546839594841003]))
    assert out.locations is None and out.location_log_probs is None
    r = greedy_search(dec.eval(), ann, max_length=6, **IDS)
    assert r.tokens.tolist() == [[9, 10, 7, 10, 7, 10], [9, 10, 7, 7, 7, 7], [9, 10, 7, 7, 7, 7]]
    torch.testing.assert_close(r.scores, torch.tensor([-11.380077362060547, -11.555529594421387,
                                                       -11.358348846435547]))


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_attention_unrolls_and_step_equals_unroll(name):
    dec = make(ATTENTIONS[name]).eval()
    annotations, captions = data()
    out = dec(annotations, captions)
    T = captions.shape[1] - 1
    assert out.logits.shape == (B, T, V) and out.alphas.shape == (B, T, L)
    state = dec.init_state(annotations)
    for t in range(T):
        log_probs, state, alpha, _ = dec.step(captions[:, t], state)
        assert state.step == t + 1
        torch.testing.assert_close(log_probs, torch.log_softmax(out.logits[:, t], -1))
        torch.testing.assert_close(alpha, out.alphas[:, t])


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_attention_skip_padding_equals_the_full_unroll_on_real_tokens(name):
    dec = make(ATTENTIONS[name]).eval()
    annotations, captions = data(T=8)
    captions[2, 3:] = 0  # rows end after 3 (row 0: 2 targets), 2 and 7 steps: unsorted
    real = captions[:, 1:] != 0
    full = dec(annotations, captions)
    skipped = dec(annotations, captions, skip_padding=True)
    torch.testing.assert_close(skipped.logits[real], full.logits[real])
    torch.testing.assert_close(skipped.alphas[real], full.alphas[real])


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_attention_greedy_equals_beam_one(name):
    dec = make(ATTENTIONS[name]).eval()
    annotations, _ = data()
    greedy = greedy_search(dec, annotations, max_length=5, **IDS)
    beam = beam_search(dec, annotations, beam_size=1, max_length=5, **IDS)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.alphas, beam.alphas)


def test_local_m_in_the_decoder_attends_around_each_step():
    dec = make(ATTENTIONS["local_m"])
    annotations, captions = data()
    out = dec(annotations, captions)
    for t in range(out.alphas.shape[1]):
        support = (out.alphas[:, t] > 0).nonzero()[:, 1].unique().tolist()
        assert support == [s for s in (t - 1, t, t + 1) if 0 <= s < L]


def test_beam_search_passes_the_step_to_position_aware_attention():
    dec = make(ATTENTIONS["local_m"]).eval()
    annotations, _ = data()
    result = beam_search(dec, annotations, beam_size=3, max_length=4, min_length=4, **IDS)
    for t in range(4):
        assert (result.alphas[:, t, t + 2:] == 0).all() and (result.alphas[:, t, t + 1] > 0).all()


# ---------------------------------------------------------------- no attention (Show and Tell)
def test_no_attention_feeds_no_context_and_sees_the_image_only_through_the_mean():
    dec = make(NoAttention)
    assert dec.lstm.input_size == E and not hasattr(dec, "L_z") and not hasattr(dec, "f_beta")
    annotations, captions = data()
    out = dec(annotations, captions)
    shuffled = annotations[:, torch.randperm(L)]  # same mean annotation, different layout
    torch.testing.assert_close(dec(shuffled, captions).logits, out.logits)
    other = annotations + torch.randn(B, 1, D)  # a different mean changes the caption
    assert not torch.allclose(dec(other, captions).logits, out.logits)
    torch.testing.assert_close(out.alphas, torch.full_like(out.alphas, 1 / L))
    out.logits.sum().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_no_attention_needs_the_initial_state_from_the_image():
    with pytest.raises(ValueError, match="init_from_mean"):
        make(NoAttention, init_from_mean=False)
    with pytest.raises(ValueError, match="hard attention"):
        make(NoAttention, attention_mode="hard")


# ---------------------------------------------------------------- hard attention
def test_hard_attention_has_the_same_parameters_as_soft():
    soft, hard = make(), make(attention_mode="hard")
    for (name, p), (_, q) in zip(soft.named_parameters(), hard.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert "hard.baseline" in hard.state_dict() and "hard.baseline" not in soft.state_dict()


def test_hard_attention_with_expectation_everywhere_is_soft_attention():
    soft = make()
    hard = make(attention_mode="hard", hard_expectation_prob=1.0).train()
    annotations, captions = data()
    out = hard(annotations, captions)
    torch.testing.assert_close(out.logits, soft(annotations, captions).logits)
    assert not out.sampled.any() and (out.location_log_probs == 0).all()


def test_hard_attention_training_samples_locations_per_caption():
    torch.manual_seed(5)
    dec = make(attention_mode="hard").train()
    annotations, captions = data(T=9)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 6:] = False
    seen_sampled = set()
    for _ in range(6):
        out = dec(annotations, captions, mask)
        # the paper's rule: per image, either the sample at every step or the expectation
        assert (out.sampled.all(1) | ~out.sampled.any(1)).all()
        seen_sampled |= set(out.sampled[:, 0].tolist())
        assert (out.locations[1] < 6).all()  # never a masked position
        rows = out.sampled[:, 0]
        picked = out.alphas.gather(2, out.locations.unsqueeze(-1)).squeeze(-1)  # (B, T)
        torch.testing.assert_close(out.location_log_probs[rows], torch.log(picked[rows]))
    assert seen_sampled == {True, False}
    per_step = make(attention_mode="hard", hard_expectation_per="step").train()
    out = per_step(annotations, captions)
    assert out.sampled.shape == (B, 8)
    assert not (out.sampled.all(1) | ~out.sampled.any(1)).all()  # rows mix the two


def test_hard_attention_at_test_time_is_deterministic_and_returns_the_chosen_location():
    dec = make(attention_mode="hard").eval()
    annotations, captions = data()
    a, b = dec(annotations, captions), dec(annotations, captions)
    assert torch.equal(a.logits, b.logits) and a.location_log_probs is None
    assert torch.equal(a.locations, a.alphas.argmax(-1))
    greedy = greedy_search(dec, annotations, max_length=5, **IDS)
    beam = beam_search(dec, annotations, beam_size=1, max_length=5, **IDS)
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.alphas, beam.alphas)
    steps = greedy.lengths.max()
    alive = greedy.alphas[:, :steps].sum(-1) > 0
    assert ((greedy.alphas[:, :steps] == 1).sum(-1) == alive.long()).all()  # one-hot rows
    expectation = make(attention_mode="hard", hard_test="expectation").eval()
    torch.testing.assert_close(expectation(annotations, captions).logits,
                               make().eval()(annotations, captions).logits)


class _Features(nn.Module):
    out_channels = D


def _module(samples: int = 1, **decoder_kw) -> CaptioningModule:
    """The penalty's weight is 1 for both attentions (hard attention's default is 0)."""
    torch.manual_seed(0)
    decoder = functools.partial(AttentionDecoder, embed_dim=E, hidden_dim=N, dropout=0.0,
                                attention=ATTENTIONS["additive"], **decoder_kw)
    return CaptioningModule(_Features(), decoder, vocab_size=V, hard_num_samples=samples,
                            doubly_stochastic=1.0)


def test_module_loss_is_unchanged_for_soft_attention():
    annotations, captions = data()
    losses = _module().train().loss({"features": annotations, "captions": captions})
    assert set(losses) == {"loss", "nll", "dsr"}
    torch.testing.assert_close(losses["loss"], losses["nll"] + losses["dsr"])


def test_module_loss_scores_the_real_tokens_as_the_full_unroll_does():
    """The module trains with ``skip_padding``; its loss is the full unroll's masked loss."""
    module = _module().eval()
    annotations, captions = data(T=8)
    losses = module.loss({"features": annotations, "captions": captions})
    out = module.decoder(annotations, captions)  # every step computed
    targets = captions[:, 1:]
    expected = masked_nll(out.logits, targets) + doubly_stochastic_penalty(out.alphas, targets != 0)
    torch.testing.assert_close(losses["loss"], expected)


def test_module_loss_adds_the_reinforce_terms_for_hard_attention():
    module = _module(samples=3, attention_mode="hard", hard_expectation_prob=0.0).train()
    annotations, captions = data()
    batch = {"features": annotations, "captions": captions}
    torch.manual_seed(2)
    losses = module.loss(batch)
    assert {"reward", "baseline", "entropy", "reinforce"} <= set(losses)
    torch.testing.assert_close(losses["loss"], losses["nll"] + losses["dsr"] + losses["reinforce"])
    assert losses["reward"] < 0 and losses["entropy"] > 0
    assert module.decoder.hard.baseline.item() == pytest.approx(losses["reward"].item(), abs=1e-5)
    losses["loss"].backward()
    for name, p in module.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    module.eval()  # evaluation: no sampling, plain penalised NLL
    assert set(module.loss(batch)) == {"loss", "nll", "dsr"}


def test_attention_variants_are_reachable_from_config():
    decoder = instantiate("captioner.decoder.AttentionDecoder", {
        "vocab_size": V, "encoder_dim": D, "embed_dim": E, "hidden_dim": N,
        "attention_mode": "hard",
        "attention": {"class_path": "captioner.attention.LocalAttention2d",
                      "init_args": {"window": 1, "grid_size": [3, 3],
                                    "score": {
                                        "class_path": "captioner.attention.ScaledDotProductAttention",
                                        "init_args": {"attention_dim": 3}}}},
    })
    assert isinstance(decoder.attention, LocalAttention2d) and decoder.hard is not None
    assert isinstance(decoder.attention.align, ScaledDotProductAttention)
    assert decoder.attention.grid_size == (3, 3)


def test_the_2d_local_attention_takes_the_encoders_grid_or_refuses_another():
    """``L = H W`` alone cannot tell a 4 x 9 grid from 6 x 6 (it was inferred square) nor
    ``(3, 5)`` from ``(5, 3)``: the module gives the attention the encoder's grid when it has
    none and refuses a different one."""
    from captioner.attention import LocalAttention2d
    from captioner.encoders.encoder import ImageEncoder

    def module(encoder_grid, attention_grid):
        decoder = functools.partial(
            AttentionDecoder, embed_dim=4, hidden_dim=6, dropout=0.0,
            attention=functools.partial(LocalAttention2d, window=1, position_dim=3,
                                        grid_size=attention_grid))
        encoder = ImageEncoder("shapes_cnn", weights=None, grid_size=encoder_grid)
        return CaptioningModule(encoder, decoder, vocab_size=9)

    assert module((4, 9), None).decoder.attention.grid_size == (4, 9)
    assert module((3, 5), (3, 5)).decoder.attention.grid_size == (3, 5)
    with pytest.raises(ValueError, match=r"grid_size=\(5, 3\).*encoder's grid is \(3, 5\)"):
        module((3, 5), (5, 3))


def test_location_attention_of_another_size_is_refused_when_the_model_is_built():
    """``LocationAttention(num_positions=196)`` on a 4 x 4 grid built the data and the model and
    failed at the first training step with a 43-frame traceback; it is now refused at once."""
    from captioner.attention import LocationAttention
    from captioner.encoders.encoder import ImageEncoder

    def module(num_positions):
        decoder = functools.partial(AttentionDecoder, embed_dim=4, hidden_dim=6, dropout=0.0,
                                    attention=functools.partial(LocationAttention,
                                                                num_positions=num_positions))
        return CaptioningModule(ImageEncoder("shapes_cnn", weights=None, grid_size=(3, 5)),
                                decoder, vocab_size=9)

    assert module(15).decoder.attention.num_positions == 15
    with pytest.raises(ValueError, match=re.escape(
            "LocationAttention(num_positions=196) but the encoder's grid is 3 x 5 = 15 "
            "positions: set num_positions to 15")):
        module(196)
