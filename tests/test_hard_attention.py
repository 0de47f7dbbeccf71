"""Stochastic hard attention (Xu et al. 2015, Section 4.1): sampling, the REINFORCE estimator
against the exact gradient by enumeration, the loss the module adds by hand, and a toy task where
the right location is known (learnt by hard and by soft attention, and not by uniform weights)."""

import functools
import math

import pytest
import torch
from torch import nn

from captioner.attention import AdditiveAttention
from captioner.decoder import AttentionDecoder
from captioner.hard_attention import HardAttention
from captioner.lit.captioning import CaptioningModule
from captioner.losses import attention_entropy, reinforce_surrogate, sentence_log_likelihood

B, L, D = 3, 7, 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run much faster on one thread than on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sampling_follows_alpha_and_never_picks_a_masked_position():
    torch.manual_seed(0)
    alpha = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0])
    M = 20000
    sel = HardAttention(expectation_prob=0.0)(alpha.expand(M, L), torch.randn(M, L, D), sample=True)
    freq = torch.bincount(sel.locations, minlength=L).float() / M
    torch.testing.assert_close(freq, alpha, atol=0.015, rtol=0)
    assert sel.sampled.all()
    torch.testing.assert_close(sel.log_probs, torch.log(alpha[sel.locations]))


def test_context_is_the_annotation_at_the_sampled_location_or_the_expectation():
    torch.manual_seed(1)
    alpha = torch.softmax(torch.randn(B, L), -1)
    keys = torch.randn(B, L, D)
    use_exp = torch.tensor([True, False, True])
    sel = HardAttention()(alpha, keys, sample=True, use_expectation=use_exp)
    torch.testing.assert_close(sel.context[1], keys[1, sel.locations[1]])
    torch.testing.assert_close(sel.context[0], alpha[0] @ keys[0])
    torch.testing.assert_close(sel.weights[0], alpha[0])
    assert sel.weights[1].sum() == 1 and sel.weights[1, sel.locations[1]] == 1
    assert sel.sampled.tolist() == [False, True, False]
    assert sel.log_probs[0] == 0 and sel.log_probs[2] == 0
    # rows that used the expectation report its argmax (the draw is not what they used)
    assert sel.locations[[0, 2]].tolist() == alpha[[0, 2]].argmax(-1).tolist()


@pytest.mark.parametrize("rule", ["argmax", "expectation"])
def test_test_time_rule_is_deterministic(rule):
    torch.manual_seed(2)
    alpha = torch.softmax(torch.randn(B, L), -1)
    keys = torch.randn(B, L, D)
    sel = HardAttention(test_rule=rule)(alpha, keys, sample=False)
    assert torch.equal(sel.locations, alpha.argmax(-1)) and not sel.sampled.any()
    if rule == "argmax":
        torch.testing.assert_close(sel.weights, nn.functional.one_hot(alpha.argmax(-1), L).float())
        torch.testing.assert_close(sel.context, keys[torch.arange(B), alpha.argmax(-1)])
    else:
        torch.testing.assert_close(sel.context, torch.einsum("bl,bld->bd", alpha, keys))


def test_expectation_probability_is_respected():
    torch.manual_seed(3)
    draws = HardAttention(expectation_prob=0.3).draw_expectation(20000, torch.device("cpu"))
    assert abs(draws.float().mean().item() - 0.3) < 0.015


def test_moving_average_baseline_by_hand():
    hard = HardAttention()
    hard.update_baseline(torch.tensor([-4.0, -6.0]))  # first update: b = mean
    assert hard.baseline.item() == pytest.approx(-5.0)
    hard.update_baseline(torch.tensor([-1.0, -3.0]))  # b = 0.9 (-5) + 0.1 (-2)
    assert hard.baseline.item() == pytest.approx(-4.7)
    hard.update_baseline(torch.tensor([]))  # nothing sampled: unchanged
    assert hard.baseline.item() == pytest.approx(-4.7)
    assert "baseline" in hard.state_dict()
    hard64 = HardAttention().double()  # a float64 model keeps its baseline in float64
    rewards = torch.tensor([-18.869461482123, -1.0], dtype=torch.float64)
    hard64.update_baseline(rewards)
    assert hard64.baseline.item() == rewards.mean().item()


def test_entropy_and_surrogate_by_hand():
    alphas = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]],
                           [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]])
    steps = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(attention_entropy(alphas, steps),
                               torch.tensor([math.log(2), 1.5 * math.log(2)]))
    reward = torch.tensor([-2.0, -4.0], requires_grad=True)
    log_p_s = torch.tensor([-1.0, -0.5], requires_grad=True)
    entropy = torch.tensor([0.7, 0.1])
    loss = reinforce_surrogate(reward, log_p_s, entropy, baseline=-3.0, lambda_r=0.5, lambda_e=0.1)
    # -mean(0.5 * (r - b) * log p(s) + 0.1 H) = -mean(0.5*1*-1 + 0.07, 0.5*-1*-0.5 + 0.01)
    assert loss.item() == pytest.approx(-((-0.5 + 0.07) + (0.25 + 0.01)) / 2)
    loss.backward()
    assert reward.grad is None or (reward.grad == 0).all()  # the reward is a constant
    torch.testing.assert_close(log_p_s.grad, torch.tensor([-0.25, 0.25]))


def test_sentence_log_likelihood_ignores_padding():
    logits = torch.randn(2, 3, 4)
    targets = torch.tensor([[1, 2, 0], [3, 3, 3]])
    lp = torch.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 0, 1] + lp[0, 1, 2], lp[1, :, 3].sum()])
    torch.testing.assert_close(sentence_log_likelihood(logits, targets, pad_id=0), expected)


@pytest.mark.parametrize("lambda_r,lambda_e", [(1.0, 0.0), (0.5, 0.3)])
def test_reinforce_estimator_matches_the_exact_gradient_by_enumeration(lambda_r, lambda_e):
    """One attention step over L = 7 locations, p(y | s) = softmax(W a_s)_y. The Monte Carlo
    mean of the estimator (Eq. 12) over M samples equals, within a few standard errors, the exact
    expectation sum_s p(s) [d log p(y|s) + lambda_r (log p(y|s) - b) d log p(s)] + lambda_e dH."""
    V, y, M, b = 3, 1, 40000, -1.2
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(L, D, generator=g) * 1.5
    theta0 = torch.randn(L, generator=g)
    W0 = torch.randn(V, D, generator=g) * 0.7

    def log_p_y(W, z):  # (..., D) -> (...)
        return torch.log_softmax(z @ W.T, -1)[..., y]

    # exact: enumerate the L locations (as minimised losses: minus the ascent direction)
    theta, W = theta0.clone().requires_grad_(), W0.clone().requires_grad_()
    p = torch.softmax(theta, -1)
    R = log_p_y(W, keys)  # (L,)
    H = -(p * torch.log(p)).sum()
    likelihood = (p.detach() * R).sum()
    reinforce = (p.detach() * (R.detach() - b) * torch.log(p)).sum()
    exact = -likelihood - lambda_r * reinforce - lambda_e * H
    exact_grads = torch.autograd.grad(exact, [theta, W])

    # Monte Carlo through HardAttention + reinforce_surrogate, M samples in one batch
    torch.manual_seed(1)
    theta, W = theta0.clone().requires_grad_(), W0.clone().requires_grad_()
    alpha = torch.softmax(theta, -1).expand(M, L)
    sel = HardAttention(expectation_prob=0.0)(alpha, keys.expand(M, L, D), sample=True)
    reward = log_p_y(W, sel.context)  # (M,)
    entropy = attention_entropy(alpha.unsqueeze(1), torch.ones(M, 1, dtype=torch.bool))
    surrogate = reinforce_surrogate(reward, sel.log_probs, entropy, b, lambda_r, lambda_e)
    loss = -reward.mean() + surrogate
    mc_grads = torch.autograd.grad(loss, [theta, W])

    for exact_g, mc_g in zip(exact_grads, mc_grads):
        assert exact_g.abs().max() > 0.05  # not a trivial comparison
        torch.testing.assert_close(mc_g, exact_g, atol=0.02, rtol=0.0)


class _Features(nn.Module):
    """Stands in for the image encoder: the batch carries ``features`` (the annotations)."""

    out_channels = 7


def _toy_batch(batch_size: int, g: torch.Generator, num_words: int = 4):
    """L = 9 annotations; one carries a marker (feature 0) and the label (one-hot); the others
    carry random labels. Caption ``<start> label <end>``: only the marked location tells it."""
    Lt, Dt = 9, _Features.out_channels
    pos = torch.randint(0, Lt, (batch_size,), generator=g)
    labels = torch.randint(0, num_words, (batch_size, Lt), generator=g)
    feats = 0.1 * torch.randn(batch_size, Lt, Dt, generator=g)
    feats[:, :, 1:1 + num_words] += nn.functional.one_hot(labels, num_words).float()
    feats[torch.arange(batch_size), pos, 0] += 1.0
    words = labels[torch.arange(batch_size), pos] + 4  # ids 0-3 are the special tokens
    captions = torch.stack([torch.full_like(words, 1), words, torch.full_like(words, 2)], 1)
    return {"features": feats, "captions": captions}, pos


def test_hard_attention_learns_to_pick_the_informative_location():
    """Pure REINFORCE (no expected contexts), trained through ``CaptioningModule.loss``."""
    torch.manual_seed(0)
    decoder = functools.partial(
        AttentionDecoder, embed_dim=8, hidden_dim=16, dropout=0.0, gate="none",
        attention=functools.partial(AdditiveAttention, attention_dim=16),
        attention_mode="hard", hard_expectation_prob=0.0)
    module = CaptioningModule(_Features(), decoder, vocab_size=8, doubly_stochastic=0.0,
                              hard_lambda_r=1.0, hard_lambda_e=0.0)
    optimizer = torch.optim.Adam(module.decoder.parameters(), lr=0.03)
    g = torch.Generator().manual_seed(1)
    module.train()
    for _ in range(150):
        batch, _ = _toy_batch(32, g)
        losses = module.loss(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert {"reward", "baseline", "entropy"} <= set(losses)
    module.eval()
    batch, pos = _toy_batch(300, g)
    with torch.no_grad():
        out = module.decoder(batch["features"], batch["captions"])
    picked = (out.locations[:, 0] == pos).float().mean().item()
    correct = (out.logits[:, 0].argmax(-1) == batch["captions"][:, 1]).float().mean().item()
    assert picked > 0.8, f"picked the marked location {picked:.0%} of the time (chance 11%)"
    assert correct > 0.8


def _toy_module(**decoder_kw) -> CaptioningModule:
    decoder = functools.partial(
        AttentionDecoder, embed_dim=8, hidden_dim=16, dropout=0.0, gate="none",
        attention=functools.partial(AdditiveAttention, attention_dim=16), **decoder_kw)
    return CaptioningModule(_Features(), decoder, vocab_size=8, doubly_stochastic=0.0)


def _train_toy(module: CaptioningModule, g: torch.Generator, steps: int = 150) -> None:
    optimizer = torch.optim.Adam(module.decoder.parameters(), lr=0.03)
    module.train()
    for _ in range(steps):
        batch, _ = _toy_batch(32, g)
        loss = module.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _trained_soft_toy() -> tuple[float, float]:
    """Train soft attention on the toy; attention mass on the marked cell and word accuracy
    over 300 new examples."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    module = _toy_module()
    _train_toy(module, g)
    module.eval()
    batch, pos = _toy_batch(300, g)
    with torch.no_grad():
        out = module.decoder(batch["features"], batch["captions"])
    mass = out.alphas[torch.arange(300), 0, pos].mean().item()
    correct = (out.logits[:, 0].argmax(-1) == batch["captions"][:, 1]).float().mean().item()
    return mass, correct


def test_soft_attention_learns_to_look_at_the_informative_location():
    """Soft attention puts its mass on the marked cell and so tells the word."""
    mass, correct = _trained_soft_toy()
    assert mass > 0.8, f"attention mass on the marked cell {mass:.2f} (uniform: 0.11)"
    assert correct > 0.9


def test_uniform_attention_cannot_solve_the_toy(monkeypatch):
    """The control for the test above: with every score 0 (mean pooling) the same training
    stays near chance, so the test above fails an attention that ignores its scores."""
    monkeypatch.setattr(AdditiveAttention, "score",
                        lambda self, query, keys, proj_keys, mask=None: torch.zeros(
                            keys.shape[0], keys.shape[1]))
    mass, correct = _trained_soft_toy()
    assert mass == pytest.approx(1 / 9) and correct < 0.6


def _capture_decoder_output(module):
    seen = {}

    def hook(_module, args, output):
        seen["annotations"], seen["output"] = args[0], output

    return seen, module.decoder.register_forward_hook(hook)


def test_module_reinforce_loss_and_baseline_by_hand():
    """``CaptioningModule.loss`` adds ``-mean[lambda_r (R - b) sum_t log alpha_{t,s_t} +
    lambda_e H]`` and moves ``b`` towards the mean reward of the captions that sampled."""
    torch.manual_seed(5)
    lambda_r, lambda_e = 0.7, 0.3
    module = _toy_module(attention_mode="hard", hard_expectation_prob=0.5)
    module.hparams.update(hard_lambda_r=lambda_r, hard_lambda_e=lambda_e)
    module.train()
    g = torch.Generator().manual_seed(2)
    module.loss(_toy_batch(16, g)[0])  # the first update sets b to a mean reward
    b_before = module.decoder.hard.baseline.clone()
    seen, handle = _capture_decoder_output(module)
    batch, _ = _toy_batch(16, g)
    losses = module.loss(batch)
    handle.remove()

    out, targets = seen["output"], batch["captions"][:, 1:]  # (16, 2): word, <end>
    steps = targets != 0
    reward = (torch.log_softmax(out.logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
              * steps).sum(1)  # (16,) log p(y | s~, a)
    log_p_s = (out.location_log_probs * steps).sum(1)  # summed over the caption's steps
    entropy = attention_entropy(out.alphas, steps)
    sampled = (out.sampled & steps).any(1)
    assert 0 < int(sampled.sum()) < 16  # some captions sampled, some used the expectation
    expected = -(lambda_r * (reward - b_before) * log_p_s + lambda_e * entropy).mean()
    torch.testing.assert_close(losses["reinforce"], expected.detach())
    torch.testing.assert_close(losses["baseline"], b_before)
    torch.testing.assert_close(module.decoder.hard.baseline,
                               0.9 * b_before + 0.1 * reward[sampled].mean().detach())
    torch.testing.assert_close(losses["reward"], reward[sampled].mean().detach())


def test_hard_num_samples_repeats_each_caption_n_times_in_training_only():
    """``N`` of Eq. 12: training unrolls each caption N times (B N rows); evaluation once. With
    the expectation always taken (no sampling) the N copies give the loss of one."""
    g = torch.Generator().manual_seed(3)
    batch, _ = _toy_batch(5, g)
    losses = {}
    for n in (1, 3):
        torch.manual_seed(0)
        module = _toy_module(attention_mode="hard", hard_expectation_prob=1.0)
        module.hparams.update(hard_num_samples=n)
        seen, handle = _capture_decoder_output(module)
        module.train()
        losses[n] = module.loss(batch)["loss"]
        assert seen["annotations"].shape[0] == 5 * n
        module.eval()
        module.loss(batch)
        assert seen["annotations"].shape[0] == 5
        handle.remove()
    torch.testing.assert_close(losses[3], losses[1])



def test_token_reduction_divides_every_term_by_the_token_count():
    """``loss_reduction: token`` divides the NLL, ``lambda`` times the penalty and the REINFORCE
    terms, each summed over the captions, by the number of target tokens; ``sentence`` divides
    the same sum by ``B``. So ``loss_token * N_tok == loss_sentence * B`` for the same draws, with
    captions of different lengths (a per-caption penalty left as a mean over ``B`` breaks it)."""
    g = torch.Generator().manual_seed(4)
    batch, _ = _toy_batch(6, g)
    word = batch["captions"][:, 1]
    captions = torch.zeros(6, 5, dtype=torch.long)  # <start> word x n <end> <pad>...
    for i, n in enumerate([1, 3, 2, 1, 3, 2]):
        captions[i, 0], captions[i, 1:1 + n], captions[i, 1 + n] = 1, word[i], 2
    batch = {"features": batch["features"], "captions": captions}
    tokens = int((captions[:, 1:] != 0).sum())  # 18 targets

    torch.manual_seed(0)
    module = _toy_module(attention_mode="hard", hard_expectation_prob=0.5)
    module.hparams.update(doubly_stochastic=0.3, hard_lambda_r=0.7, hard_lambda_e=0.2)
    module.train()
    hard_state = {k: v.clone() for k, v in module.decoder.hard.state_dict().items()}
    losses = {}
    for reduction in ("sentence", "token"):
        module.decoder.hard.load_state_dict(hard_state)  # the same baseline for both
        module.hparams.loss_reduction = reduction
        torch.manual_seed(1)  # the same locations for both
        losses[reduction] = module.loss(batch)
    sentence, token = losses["sentence"], losses["token"]
    assert float(sentence["reinforce"]) != 0 and float(sentence["dsr"].detach()) != 0
    for key in ("dsr", "reinforce", "reward"):  # the logged terms are per caption in both
        torch.testing.assert_close(token[key], sentence[key])
    torch.testing.assert_close(token["nll"] * tokens, sentence["nll"] * 6)
    torch.testing.assert_close(token["loss"] * tokens, sentence["loss"] * 6)


def test_first_reinforce_baseline_is_the_batch_mean_reward():
    """Guards ``b_0``: on the very first training batch (baseline not started) the REINFORCE
    term uses the batch's own mean reward as ``b``, not the buffer's initial 0 (which would push
    every early sample down). With ``hard_expectation_prob=0`` every caption samples, so
    ``b = mean_n R_n`` and ``reinforce = -mean[lambda_r (R - mean R) log p(s~) + lambda_e H]``."""
    torch.manual_seed(7)
    lambda_r, lambda_e = 0.6, 0.25
    module = _toy_module(attention_mode="hard", hard_expectation_prob=0.0)
    module.hparams.update(hard_lambda_r=lambda_r, hard_lambda_e=lambda_e)
    module.train()
    assert not bool(module.decoder.hard.baseline_started)  # the buffer still holds b = 0
    g = torch.Generator().manual_seed(3)
    batch, _ = _toy_batch(6, g)
    seen, handle = _capture_decoder_output(module)
    losses = module.loss(batch)  # the first call
    handle.remove()

    out, targets = seen["output"], batch["captions"][:, 1:]  # (6, 2): word, <end>
    steps = targets != 0
    reward = (torch.log_softmax(out.logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
              * steps).sum(1)  # (6,) log p(y | s~, a), all < 0
    log_p_s = (out.location_log_probs * steps).sum(1)  # (6,)
    entropy = attention_entropy(out.alphas, steps)  # (6,)
    assert (out.sampled & steps).any(1).all()  # every caption sampled its locations
    # b_0 = the batch mean reward (the mutant's 0 would give baseline 0 != reward < 0)
    assert losses["reward"].item() < -0.5
    assert losses["baseline"].item() == pytest.approx(losses["reward"].item(), abs=1e-6)
    assert losses["baseline"].item() == pytest.approx(reward.mean().item(), abs=1e-5)
    # the centred rewards R - mean R sum to 0; with b = 0 the term would differ by
    # lambda_r * mean R * mean(log p(s~)), far more than the tolerance here
    expected = -(lambda_r * (reward - reward.mean()) * log_p_s + lambda_e * entropy).mean()
    torch.testing.assert_close(losses["reinforce"], expected.detach())
    assert abs(lambda_r * reward.mean().item() * log_p_s.mean().item()) > 1e-2


def test_selection_renormalises_weights_that_do_not_sum_to_one():
    """Guards the renormalisation ``probs = alpha / sum(alpha)`` in ``HardAttention``: local-p
    weights need not sum to 1. B=1, L=2, D=1, alpha = [0.1, 0.3] -> probs = [0.25, 0.75];
    keys a_0 = 1, a_1 = 0. Expectation: weights [0.25, 0.75], context 0.25*1 + 0.75*0 = 0.25
    (unnormalised: [0.1, 0.3] and 0.1). A sample: log p(s~) = log probs[s~], log 0.75 = -0.2877
    or log 0.25 = -1.3863 (unnormalised: log 0.3 = -1.2040 or log 0.1 = -2.3026)."""
    alpha = torch.tensor([[0.1, 0.3]])
    keys = torch.tensor([[[1.0], [0.0]]])
    sel = HardAttention(test_rule="expectation")(alpha, keys, sample=False)
    torch.testing.assert_close(sel.weights, torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(sel.context, torch.tensor([[0.25]]))
    assert sel.locations.tolist() == [1] and not sel.sampled.any()

    torch.manual_seed(0)
    M = 64  # both locations get drawn (0.25 each time; all 1s has probability 1e-8)
    sel = HardAttention(expectation_prob=0.0)(alpha.expand(M, 2), keys.expand(M, 2, 1),
                                              sample=True)
    assert sel.sampled.all() and set(sel.locations.tolist()) == {0, 1}
    expected = torch.log(torch.tensor([0.25, 0.75]))[sel.locations]  # -1.3863 or -0.2877
    torch.testing.assert_close(sel.log_probs, expected)
    torch.testing.assert_close(sel.context, keys[0, sel.locations])  # one-hot: a_{s~}


@pytest.mark.parametrize("mode, expected", [("soft", 1.0), ("hard", 0.0)])
def test_the_doubly_stochastic_default_is_the_papers_for_each_attention(mode, expected):
    """Eq. 14 belongs to soft attention (Sec. 4.2.1); hard attention's ``L_s`` (Sec. 4.1) has
    no such term. The value used is stored in the hyperparameters, and a given one is kept."""
    decoder = functools.partial(
        AttentionDecoder, embed_dim=8, hidden_dim=16, dropout=0.0, gate="none",
        attention=functools.partial(AdditiveAttention, attention_dim=16), attention_mode=mode)
    module = CaptioningModule(_Features(), decoder, vocab_size=8)
    assert module.hparams.doubly_stochastic == expected
    assert module.hparams_initial.doubly_stochastic == expected  # what hparams.yaml shows
    given = CaptioningModule(_Features(), decoder, vocab_size=8, doubly_stochastic=0.25)
    assert given.hparams.doubly_stochastic == 0.25
    batch, _ = _toy_batch(5, torch.Generator().manual_seed(2))
    module.train()
    torch.manual_seed(3)
    losses = module.loss(batch)
    assert float(losses["dsr"].detach()) > 0  # the penalty is computed (and logged) either way
    reinforce = losses.get("reinforce", torch.tensor(0.0))
    torch.testing.assert_close(losses["loss"].detach(),
                               losses["nll"].detach() + expected * losses["dsr"].detach()
                               + reinforce)


def test_a_resumed_fit_keeps_the_doubly_stochastic_weight_it_was_trained_with(monkeypatch):
    """A hard-attention checkpoint from before the paper's default (1, now 0 under hard
    attention), resumed with a config that leaves the option out, trains on with 1; one given
    on the command line wins."""
    from captioner.lit.base import CaptionerModule

    monkeypatch.setattr(CaptionerModule, "on_load_checkpoint", lambda self, checkpoint: None)
    decoder = functools.partial(
        AttentionDecoder, embed_dim=8, hidden_dim=16, dropout=0.0, gate="none",
        attention=functools.partial(AdditiveAttention, attention_dim=16), attention_mode="hard")
    old = {"hyper_parameters": {"doubly_stochastic": 1.0}}
    resumed = CaptioningModule(_Features(), decoder, vocab_size=8)
    assert resumed.hparams.doubly_stochastic == 0.0
    resumed.on_load_checkpoint(old)
    assert resumed.hparams.doubly_stochastic == 1.0
    given = CaptioningModule(_Features(), decoder, vocab_size=8, doubly_stochastic=0.5)
    given.on_load_checkpoint(old)
    assert given.hparams.doubly_stochastic == 0.5
