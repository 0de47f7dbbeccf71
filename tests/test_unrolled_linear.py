"""UnrolledLinear: the deferred weight gradient equals autograd's, in the op and in the decoder."""

import functools

import pytest
import torch

from captioner.attention import AdditiveAttention, CosineAttention, NoAttention
from captioner.decoder import AttentionDecoder
from captioner.search import greedy_search
from captioner.unrolled_linear import UnrolledLinear
from tests.conftest import CastCounter

B, L, D, V, E, N, A, T = 3, 7, 5, 13, 9, 11, 17, 6


def recurrence(linear, x0: torch.Tensor, steps: int, u: torch.Tensor) -> torch.Tensor:
    """``x_{t+1} = tanh(u_t + linear(x_t))``; returns a scalar that uses every step."""
    x, total = x0, 0.0
    for t in range(steps):
        x = torch.tanh(u[t] + linear(x))  # (B, M) with M = K
        total = total + (x * (t + 1)).sum()
    return total


def test_weight_and_input_gradients_equal_autograds():
    torch.manual_seed(0)
    K = 5
    w = torch.randn(K, K, requires_grad=True)
    x0 = torch.randn(B, K, requires_grad=True)
    u = torch.randn(T, B, K)
    recurrence(lambda x: x.mm(w.t()), x0, T, u).backward()
    ref_w, ref_x = w.grad.clone(), x0.grad.clone()
    w.grad = x0.grad = None
    recurrence(UnrolledLinear(w), x0, T, u).backward()
    assert torch.allclose(w.grad, ref_w, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x0.grad, ref_x, rtol=1e-5, atol=1e-6)
    assert w.grad.abs().sum() > 0


def test_a_backward_that_does_not_reach_step_0_leaks_nothing_into_the_next():
    """A gradient probe with respect to step 1's input runs the nodes of steps 2.. only (step
    0's is not on its path), which store their pairs; the next full backward used to add them
    into ``dW`` (85 % off in the decoder below)."""
    torch.manual_seed(3)
    K = 5
    w = torch.randn(K, K, requires_grad=True)
    x0 = torch.randn(B, K)
    us = [torch.randn(B, K, requires_grad=True) for _ in range(T)]

    def loss(linear):
        x, total = x0, 0.0
        for t in range(T):
            x = torch.tanh(us[t] + linear(x))  # (B, K)
            total = total + (x * (t + 1)).sum()
        return total

    loss(lambda x: x.mm(w.t())).backward()
    ref = w.grad.clone()
    w.grad = None
    probed = loss(UnrolledLinear(w))
    (g_1,) = torch.autograd.grad(probed, [us[1]], retain_graph=True)  # through steps 2..T-1
    assert g_1.abs().sum() > 0 and w.grad is None
    probed.backward()
    assert torch.allclose(w.grad, ref, rtol=1e-5, atol=1e-6)


def test_decoder_gradients_after_a_probe_equal_the_plain_unrolls():
    """The same in the decoder: a probe of the loss's gradient with respect to the word
    embeddings, then the training backward (the recurrent weights' gradients)."""
    from captioner.losses import masked_nll

    torch.manual_seed(0)
    dec = AttentionDecoder(V, D, embed_dim=E, hidden_dim=N, dropout=0.0).double()
    ann = torch.randn(B, L, D, dtype=torch.double)
    caps = torch.randint(3, V, (B, T))
    caps[:, 0] = 1

    def grads(fused: bool, probe: bool) -> dict[str, torch.Tensor]:
        dec.fused_recurrent = fused
        dec.zero_grad(set_to_none=True)
        out = dec(ann, caps)
        loss = masked_nll(out.token_logits, caps[:, 1:], 0)
        if probe:
            torch.autograd.grad(loss, [dec.embedding.weight], retain_graph=True)
        loss.backward()
        return {"weight_hh": dec.lstm.weight_hh.grad.clone(),
                "weight_ih": dec.lstm.weight_ih.grad.clone()}

    ref = grads(fused=False, probe=False)
    for name, got in grads(fused=True, probe=True).items():
        assert torch.allclose(got, ref[name], rtol=1e-9, atol=1e-12), name


def test_a_weight_that_is_a_function_of_parameters_gets_its_gradient_once():
    """``W = cat([P, Q])``: the gradient reaches both parameters through the concatenation."""
    torch.manual_seed(1)
    p, q = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    x0, u = torch.randn(B, 4), torch.randn(T, B, 4)
    recurrence(lambda x: x.mm(torch.cat([p, q], 1).t()), x0, T, u).backward()
    ref = p.grad.clone(), q.grad.clone()
    p.grad = q.grad = None
    recurrence(UnrolledLinear(torch.cat([p, q], 1)), x0, T, u).backward()
    assert torch.allclose(p.grad, ref[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(q.grad, ref[1], rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_weight_are_plain_matmuls():
    w = torch.randn(3, 3)  # frozen: no custom node
    x = torch.randn(B, 3, requires_grad=True)
    assert UnrolledLinear(w)(x).grad_fn.name() != "_SummedWeightGradBackward"
    wg = w.clone().requires_grad_()
    with torch.no_grad():
        assert UnrolledLinear(wg)(x).grad_fn is None
    assert "SummedWeightGrad" in UnrolledLinear(wg)(x).grad_fn.name()


def test_autocast_casts_the_weight_once_per_unroll_and_matches_autocasts_gradient():
    """Under autocast the weight (a concatenation: not a leaf, so autocast's cache misses it)
    is cast once, not at every step; outputs are in the autocast dtype, and the input and
    weight gradients equal those of autocast's own per-step ``mm`` up to bf16 rounding."""
    torch.manual_seed(2)
    K = 8
    p, q = torch.randn(K, 3, requires_grad=True), torch.randn(K, K - 3, requires_grad=True)
    x0, u = torch.randn(B, K, requires_grad=True), torch.randn(T, B, K)

    def run(linear):
        p.grad = q.grad = x0.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), CastCounter([(K, K)]) as casts:
            total = recurrence(linear, x0, T, u)
        total.backward()
        return casts.counts[(K, K)], float(total.detach()), torch.cat([p.grad, q.grad], 1), x0.grad.clone()

    casts, total, grad_w, grad_x = run(UnrolledLinear(torch.cat([p, q], 1)))
    ref_casts, ref_total, ref_w, ref_x = run(lambda x: x.mm(torch.cat([p, q], 1).t()))
    assert (casts, ref_casts) == (1, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = UnrolledLinear(torch.cat([p, q], 1))(x0)
    assert y.dtype == torch.bfloat16 and "SummedWeightGrad" in y.grad_fn.name()
    assert total == pytest.approx(ref_total, rel=1e-2)
    assert grad_w.abs().sum() > 0
    assert torch.allclose(grad_w, ref_w, rtol=3e-2, atol=3e-2 * ref_w.abs().max().item())
    assert torch.allclose(grad_x, ref_x, rtol=3e-2, atol=3e-2 * ref_x.abs().max().item())


def _decoder(attention, mode: str) -> AttentionDecoder:
    torch.manual_seed(0)
    return AttentionDecoder(V, D, embed_dim=E, hidden_dim=N, dropout=0.0, attention=attention,
                            attention_mode=mode, hard_expectation_prob=0.5)


@pytest.mark.parametrize("attention,mode", [
    (functools.partial(AdditiveAttention, attention_dim=A), "soft"),
    (functools.partial(AdditiveAttention, attention_dim=A), "hard"),
    (CosineAttention, "soft"),
    (NoAttention, "soft"),
])
def test_decoder_fused_unroll_equals_the_sliced_one(attention, mode):
    """Loss and every parameter gradient of the fused unroll equal the per-step-slices unroll
    (same random draws for hard attention)."""
    ann = torch.randn(B, L, D)
    cap = torch.randint(4, V, (B, T + 1))
    cap[:, 0] = 1
    grads = []
    for fused in (True, False):
        dec = _decoder(attention, mode)
        dec.fused_recurrent = fused
        torch.manual_seed(7)
        out = dec(ann, cap)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), cap[:, 1:].reshape(-1))
        if out.location_log_probs is not None:
            loss = loss + out.location_log_probs.sum()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in dec.named_parameters()
                                      if p.grad is not None}))
    (loss_f, g_f), (loss_s, g_s) = grads
    assert torch.allclose(loss_f, loss_s, atol=1e-6)
    assert g_f.keys() == g_s.keys() and "lstm.weight_hh" in g_f
    for name in g_f:
        assert torch.allclose(g_f[name], g_s[name], rtol=1e-4, atol=1e-6), name


def test_a_float64_decoder_under_autocast_stays_float64():
    """Autocast leaves float64 tensors alone; the casts the decoder makes on its behalf (the
    fused recurrent weight, the keys, the search's weights) follow the same rule, so a float64
    decoder computes under autocast exactly what it computes without it."""
    torch.manual_seed(3)
    dec = _decoder(functools.partial(AdditiveAttention, attention_dim=A), "soft").double()
    ann = torch.randn(B, L, D, dtype=torch.float64)
    cap = torch.randint(4, V, (B, T + 1))
    cap[:, 0] = 1
    runs = []
    for autocast in (False, True):
        dec.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = dec(ann, cap).logits.square().mean()
            scores = greedy_search(dec, ann, start_id=1, end_id=2, max_length=T).scores
        loss.backward()
        runs.append((loss.detach(), scores, dec.lstm.weight_ih.grad.clone()))
    (loss, scores, grad), (loss_ac, scores_ac, grad_ac) = runs
    assert loss_ac.dtype == torch.float64 and torch.equal(loss_ac, loss)
    assert torch.equal(scores_ac, scores) and torch.equal(grad_ac, grad)


def test_autocast_keys_cast_once_only_where_no_gradient_flows_to_them():
    """The keys are cast to bf16 once for every step's context only when the annotations get
    no gradient; for a trained encoder's output the steps' gradients must reach it summed in
    float32 as through autocast's own per-step casts (bit-identical to them), not summed in
    bf16."""
    torch.manual_seed(4)
    dec = _decoder(functools.partial(AdditiveAttention, attention_dim=A), "soft")
    x = torch.randn(B, L, D, requires_grad=True)
    cap = torch.randint(4, V, (B, 3 * T + 1))
    cap[:, 0] = 1

    def annotation_grad(per_step_casts: bool) -> torch.Tensor:
        x.grad = None
        if per_step_casts:
            dec._keys_feed_context_only = lambda: False  # the keys cast by autocast, per step
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                dec(x * 1.0, cap).logits.float().logsumexp(-1).sum().backward()
        finally:
            dec.__dict__.pop("_keys_feed_context_only", None)
        return x.grad.clone()

    assert torch.equal(annotation_grad(False), annotation_grad(True))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert dec.init_state(x).keys.dtype == torch.bfloat16  # no gradient: cast once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dec.init_state(x).keys.dtype == torch.float32
