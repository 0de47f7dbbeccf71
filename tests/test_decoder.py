"""AttentionDecoder: shapes, invariants, the paper's scalar gate and deep output layer."""

import pytest
import torch

from captioner.attention import AdditiveAttention
from captioner.decoder import AttentionDecoder

B, L, D, V, E, N, A = 3, 7, 5, 13, 9, 11, 17


def make(**kw):
    torch.manual_seed(0)
    defaults = dict(embed_dim=E, hidden_dim=N, dropout=0.0,
                    attention=lambda q, k: AdditiveAttention(q, k, attention_dim=A))
    return AttentionDecoder(V, D, **{**defaults, **kw})


def captions(T=6):
    c = torch.randint(4, V, (B, T))
    c[:, 0] = 1
    c[0, 4:] = 0  # padded caption
    return c


def test_unroll_shapes_and_attention_sums_to_one():
    dec = make()
    out = dec(torch.randn(B, L, D), captions())
    assert out.logits.shape == (B, 5, V)
    assert out.alphas.shape == (B, 5, L)
    assert out.betas.shape == (B, 5)
    assert torch.allclose(out.alphas.sum(-1), torch.ones(B, 5), atol=1e-6)
    assert ((out.betas > 0) & (out.betas < 1)).all()


def test_scalar_gate_is_the_papers_and_vector_gate_is_an_option():
    assert make().f_beta.out_features == 1
    assert make(gate="vector").f_beta.out_features == D
    dec = make(gate="none")
    assert not hasattr(dec, "f_beta")
    assert torch.equal(dec(torch.randn(B, L, D), captions()).betas, torch.ones(B, 5))


def test_deep_output_layer_matches_eq7_by_hand():
    dec = make(deep_output_activation="identity").eval()
    emb, h, z = torch.randn(B, E), torch.randn(B, N), torch.randn(B, D)
    expected = (emb + h @ dec.L_h.weight.T + dec.L_h.bias + z @ dec.L_z.weight.T) @ dec.L_o.weight.T \
        + dec.L_o.bias
    assert torch.allclose(dec.output_logits(emb, h, z), expected, atol=1e-5)
    shallow = make(deep_output=False).eval()
    assert torch.allclose(shallow.output_logits(emb, h, z), shallow.L_o(h), atol=1e-6)


def test_step_equals_unroll_under_teacher_forcing():
    """The fast unroll (batched word projections, one output matmul) equals step-by-step decoding."""
    dec = make().eval()
    ann, cap = torch.randn(B, L, D), captions()
    out = dec(ann, cap)
    state = dec.init_state(ann)
    for t in range(cap.shape[1] - 1):
        logp, state, alpha, beta = dec.step(cap[:, t], state)
        assert torch.allclose(logp, torch.log_softmax(out.logits[:, t], -1), atol=1e-5)
        assert torch.allclose(alpha, out.alphas[:, t], atol=1e-6)


def test_lstm_matches_torch_lstmcell():
    dec = make().eval()
    ann = torch.randn(B, L, D)
    state = dec.init_state(ann)
    emb = dec.embedding(torch.tensor([4, 5, 6]))
    z, _, _ = dec._attend(state)
    h, c = dec._lstm(dec._input_gates_from_words(emb), z, state)
    h_ref, c_ref = dec.lstm(torch.cat([emb, z], 1), (state.h, state.c))
    assert torch.allclose(h, h_ref, atol=1e-6) and torch.allclose(c, c_ref, atol=1e-6)


def test_initial_state_from_mean_annotation():
    dec = make().eval()
    ann = torch.randn(B, L, D)
    s = dec.init_state(ann)
    assert torch.allclose(s.h, torch.tanh(dec.init_h(ann.mean(1))))
    assert torch.allclose(s.c, torch.tanh(dec.init_c(ann.mean(1))))


def test_masked_keys_get_exactly_zero_weight():
    dec = make()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    out = dec(torch.randn(B, L, D), captions(), mask=mask)
    assert (out.alphas[1, :, 4:] == 0).all()
    assert torch.allclose(out.alphas.sum(-1), torch.ones(B, 5), atol=1e-6)


def test_gradients_reach_every_parameter():
    dec = make(dropout=0.3)
    out = dec(torch.randn(B, L, D), captions())
    out.logits.sum().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_invalid_vocab_size_is_clear():
    with pytest.raises(ValueError, match="vocab_size"):
        AttentionDecoder(0, D)
