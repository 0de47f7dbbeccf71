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


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_gated_context_by_hand(gate):
    """``z_t = beta_t sum_i alpha_ti a_i`` with ``beta_t = sigmoid(f_beta(h_{t-1}))``
    (Section 4.2.1); a closed gate removes the context."""
    dec = make(gate=gate).eval()
    ann = torch.randn(B, L, D)
    state = dec.init_state(ann)
    z, alpha, beta = dec._attend(state)
    expected_beta = torch.sigmoid(dec.f_beta(state.h))  # (B, 1) or (B, D)
    torch.testing.assert_close(beta, expected_beta)
    torch.testing.assert_close(z, expected_beta * torch.einsum("bl,bld->bd", alpha, ann))
    with torch.no_grad():
        dec.f_beta.weight.zero_()
        dec.f_beta.bias.fill_(-30.0)
    assert dec._attend(state)[0].abs().max() < 1e-10


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


@pytest.mark.parametrize("init_layers", [1, 2])
def test_gradients_reach_every_parameter(init_layers):
    dec = make(dropout=0.3, init_layers=init_layers)
    out = dec(torch.randn(B, L, D), captions())
    out.logits.sum().backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_invalid_vocab_size_is_clear():
    with pytest.raises(ValueError, match="vocab_size"):
        AttentionDecoder(0, D)


@pytest.mark.parametrize("skip_padding", [False, True])
def test_captions_without_a_target_are_a_clear_error(skip_padding):
    """``<start>`` alone has no step to unroll (it was an internal ``stack`` / ``amax`` error)."""
    with pytest.raises(ValueError, match=r"T >= 1 steps .* got shape \(3, 1\)"):
        make()(torch.randn(B, L, D), torch.ones(B, 1, dtype=torch.long),
               skip_padding=skip_padding)
    with pytest.raises(ValueError, match=r"got shape \(6,\)"):
        make()(torch.randn(B, L, D), torch.ones(6, dtype=torch.long))


# ---------------------------------------------------------------- skip_padding (training's unroll)
def ragged_captions(lengths, T):
    """``(len(lengths), T + 1)`` ids with ``lengths[b]`` real targets (``<end>`` included)."""
    g = torch.Generator().manual_seed(3)
    c = torch.randint(4, V, (len(lengths), T + 1), generator=g)
    c[:, 0] = 1
    for b, n in enumerate(lengths):
        c[b, n] = 2
        c[b, n + 1:] = 0
    return c


def test_rows_alive_schedule_by_hand():
    """Lengths 3, 1 (an empty caption still runs one step), 5, 2 within T = 7: sorted 5, 3, 2, 1
    (rows 2, 0, 3, 1); steps 0..4 have 4, 3, 2, 1, 1 captions alive; steps 5, 6 none."""
    dec = make()
    targets = torch.tensor([[5, 6, 2, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0, 0, 0],
                            [5, 6, 7, 8, 2, 0, 0],
                            [5, 2, 0, 0, 0, 0, 0]])
    alive, order = dec._rows_alive(targets)
    assert alive == [4, 3, 2, 1, 1] and order.tolist() == [2, 0, 3, 1]
    alive, order = dec._rows_alive(targets[[2, 0, 3]])  # already longest first
    assert alive == [3, 3, 2, 1, 1] and order is None


@pytest.mark.parametrize("masked", [False, True])
def test_skip_padding_equals_the_full_unroll_on_real_tokens(masked):
    """Unsorted lengths, two all-padding steps at the end: the real positions' outputs and the
    gradients of a loss over them are those of the full unroll; skipped positions get zero
    attention and gate."""
    Bs, Ls, T = 5, 9, 8
    dec = make(dropout=0.3).eval()
    lengths = [3, 6, 1, 6, 4]
    cap = ragged_captions(lengths, T)
    real = cap[:, 1:] != 0  # (B, T)
    ann = torch.randn(Bs, Ls, D)
    mask = None
    if masked:
        mask = torch.ones(Bs, Ls, dtype=torch.bool)
        mask[0, 5:] = mask[2, 2:] = False
    outs, grads = [], []
    for skip in (False, True):
        a = ann.clone().requires_grad_()
        dec.zero_grad()
        out = dec(a, cap, mask, skip_padding=skip)
        assert out.logits.shape == (Bs, T, V) and out.alphas.shape == (Bs, T, Ls)
        loss = (torch.log_softmax(out.logits, -1)[..., 4] * real).sum() + (out.alphas ** 2)[real].sum()
        loss.backward()
        outs.append(out)
        grads.append([a.grad] + [p.grad.clone() for p in dec.parameters()])
    full, skipped = outs
    assert full.positions is None and full.token_logits.shape == (Bs * T, V)
    # the computed rows are exactly the real positions, each once
    assert sorted(skipped.positions.tolist()) == real.flatten().nonzero().squeeze(1).tolist()
    torch.testing.assert_close(skipped.token_logits,
                               full.logits.flatten(0, 1)[skipped.positions])
    torch.testing.assert_close(skipped.logits[real], full.logits[real])
    torch.testing.assert_close(skipped.alphas[real], full.alphas[real])
    torch.testing.assert_close(skipped.betas[real], full.betas[real])
    assert (skipped.alphas[~real] == 0).all() and (skipped.betas[~real] == 0).all()
    assert (skipped.logits[~real] == 0).all()
    assert not (full.alphas[~real] == 0).all()  # the full unroll did compute them
    for g_full, g_skip in zip(*grads):
        torch.testing.assert_close(g_skip, g_full, rtol=1e-5, atol=1e-6)


def test_skip_padding_hard_attention_pads_its_selections():
    dec = make(attention_mode="hard", hard_expectation_prob=0.0).train()
    lengths = [2, 5, 3]
    cap = ragged_captions(lengths, 5)
    real = cap[:, 1:] != 0
    out = dec(torch.randn(B, L, D), cap, skip_padding=True)
    assert out.sampled.shape == (B, 5) and torch.equal(out.sampled, real)
    assert (out.location_log_probs[~real] == 0).all() and (out.location_log_probs[real] < 0).all()
    picked = out.alphas.gather(2, out.locations.unsqueeze(-1)).squeeze(-1)  # (B, T)
    torch.testing.assert_close(out.location_log_probs[real], picked[real].log())
    mixed = make(attention_mode="hard", hard_expectation_prob=0.5).train()
    cap = ragged_captions([2, 5, 3, 1, 4, 5, 2, 3], 5)
    firsts = []
    for skip in (False, True):  # same seed: each image keeps its own per-sequence choice
        torch.manual_seed(7)
        firsts.append(mixed(torch.randn(8, L, D), cap, skip_padding=skip).sampled[:, 0])
    assert torch.equal(*firsts) and 0 < int(firsts[0].sum()) < 8
    cap = ragged_captions(lengths, 5)
    dec.eval()  # argmax locations: deterministic, so equal to the full unroll's
    ann = torch.randn(B, L, D)
    a, b = dec(ann, cap), dec(ann, cap, skip_padding=True)
    assert torch.equal(a.locations[real], b.locations[real])
    torch.testing.assert_close(a.logits[real], b.logits[real])


def test_initial_state_from_the_masked_mean_annotation_by_hand():
    """Guards the masked mean of ``init_state``: with a key mask (text annotations) the mean is
    over the valid positions only, not over all ``L``. B=2, L=3, D=4 (a decoder built for
    D=4): row 0 keeps positions 0, 1: mean = ([1, 2, 3, 4] + [3, 0, -1, 2]) / 2 = [2, 1, 1, 3]
    (dividing by L = 3 would give [4/3, 2/3, 2/3, 2]); row 1 keeps all 3: sum [3, 3, 3, 3],
    mean [1, 1, 1, 1]. Row 0's padded position holds 50s that must not leak in."""
    torch.manual_seed(0)
    dec = AttentionDecoder(V, 4, embed_dim=E, hidden_dim=N, dropout=0.0).eval()
    ann = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, -1.0, 2.0], [50.0, 50.0, 50.0, 50.0]],
                        [[3.0, 0.0, 0.0, 6.0], [0.0, 3.0, 0.0, -3.0], [0.0, 0.0, 3.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    mean = torch.tensor([[2.0, 1.0, 1.0, 3.0],   # row 0: over 2 valid positions
                         [1.0, 1.0, 1.0, 1.0]])  # row 1: [3, 3, 3, 3] / 3
    with torch.no_grad():
        s = dec.init_state(ann, mask)
        torch.testing.assert_close(s.h, torch.tanh(dec.init_h(mean)))
        torch.testing.assert_close(s.c, torch.tanh(dec.init_c(mean)))



def test_bahdanau_initial_state_reads_the_backward_half_of_the_first_annotation():
    """``init_summary="first_backward"``: ``h_0 = tanh(W_s <-h_1)`` (Bahdanau et al. 2015,
    App. A.2.2), ``<-h_1`` the second half of annotation 0. B=2, L=3, D=4: rows 0 and 1 read
    [3, 4] and [-1, 2]; the first halves, the later positions and the mask do not enter."""
    torch.manual_seed(0)
    dec = AttentionDecoder(V, 4, embed_dim=E, hidden_dim=N, dropout=0.0,
                           init_summary="first_backward").eval()
    assert dec.init_h.in_features == dec.init_c.in_features == 2  # W_s: D / 2 -> N
    ann = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, -1.0, 2.0], [50.0, 50.0, 50.0, 50.0]],
                        [[9.0, 9.0, -1.0, 2.0], [0.0, 3.0, 0.0, -3.0], [0.0, 0.0, 3.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    first_backward = torch.tensor([[3.0, 4.0], [-1.0, 2.0]])
    with torch.no_grad():
        s = dec.init_state(ann, mask)
        torch.testing.assert_close(s.h, torch.tanh(dec.init_h(first_backward)))
        torch.testing.assert_close(s.c, torch.tanh(dec.init_c(first_backward)))
        changed = ann.clone()
        changed[:, 1:] += 7.0  # the other words
        changed[:, 0, :2] -= 5.0  # the forward half of word 1
        torch.testing.assert_close(dec.init_state(changed, mask).h, s.h)
    with pytest.raises(ValueError, match="an image grid has no backward state"):
        dec.init_state(ann)  # no key mask: an image grid
    with pytest.raises(ValueError, match="init_summary must be"):
        make(init_summary="last")
    with pytest.raises(ValueError, match="even encoder_dim, got 5"):
        make(init_summary="first_backward")  # D = 5
    with pytest.raises(ValueError, match="init_from_mean=True"):
        AttentionDecoder(V, 4, init_summary="first_backward", init_from_mean=False)

# ---------------------------------------------------------------- init_layers (arctic-captions)
DEFAULT_KEYS = {"embedding.weight", "attention.key_proj.weight", "attention.key_proj.bias",
                "attention.query_proj.weight", "attention.energy.weight", "f_beta.weight",
                "f_beta.bias", "init_h.weight", "init_h.bias", "init_c.weight", "init_c.bias",
                "lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh",
                "L_h.weight", "L_h.bias", "L_z.weight", "L_o.weight", "L_o.bias"}


def test_default_init_layers_keeps_the_state_dict_keys():
    """Checkpoints saved before ``init_layers`` existed load into the default decoder."""
    assert set(make().state_dict()) == DEFAULT_KEYS
    deeper = make(init_layers=3).state_dict()
    assert set(deeper) == DEFAULT_KEYS | {f"init_hidden.{k}.{p}" for k in (0, 1)
                                          for p in ("weight", "bias")}
    assert deeper["init_hidden.0.weight"].shape == (D, D)  # ctx_dim -> ctx_dim, as theirs


@pytest.mark.parametrize("init_layers", [2, 3])
def test_deeper_init_shapes(init_layers):
    dec = make(init_layers=init_layers).eval()
    s = dec.init_state(torch.randn(B, L, D))
    assert s.h.shape == (B, N) and s.c.shape == (B, N)
    out = dec(torch.randn(B, L, D), captions())
    assert out.logits.shape == (B, 5, V) and out.alphas.shape == (B, 5, L)


def test_init_layers_2_by_hand_over_the_masked_mean():
    """``h_0 = tanh(W_h relu(W_1 u + b_1) + b_h)``, ``c_0`` the same with ``W_c, b_c`` and the
    same hidden layer (shared, as in arctic-captions), ``u`` the mean over the valid positions.
    B=2, L=3, D=2: row 0 keeps positions 0, 1: u = ([1, -2] + [3, 0]) / 2 = [2, -1]; row 1 keeps
    all: u = [3, 3] / 3 = [1, 1]. With W_1 = [[1, 1], [1, -1]], b_1 = [0, -4]: row 0
    relu([1, 3 - 4]) = [1, 0], row 1 relu([2, 0 - 4]) = [2, 0]; so h_0 = tanh(W_h[:, 0] r + b_h)
    with r = 1 and 2: the second hidden unit is cut off by the ReLU in both rows."""
    torch.manual_seed(0)
    dec = AttentionDecoder(V, 2, embed_dim=E, hidden_dim=N, dropout=0.5, init_layers=2).eval()
    ann = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [50.0, 50.0]],
                        [[1.0, 2.0], [0.0, 3.0], [2.0, -2.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        dec.init_hidden[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        dec.init_hidden[0].bias.copy_(torch.tensor([0.0, -4.0]))
        s = dec.init_state(ann, mask)
    r = torch.tensor([[1.0], [2.0]])  # (2, 1) the surviving hidden unit of rows 0, 1
    for got, head in ((s.h, dec.init_h), (s.c, dec.init_c)):
        expected = torch.tanh(r * head.weight[:, 0] + head.bias)  # (2, N)
        torch.testing.assert_close(got, expected.detach())
    dec.dropout = _Halve()  # the hidden layer's dropout: r = 1, 2 -> 0.5, 1
    with torch.no_grad():
        s = dec.init_state(ann, mask)
        torch.testing.assert_close(s.h, torch.tanh(0.5 * r * dec.init_h.weight[:, 0]
                                                   + dec.init_h.bias))


def test_bad_init_layers_are_clear_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="init_layers must be an integer >= 1"):
            make(init_layers=bad)
    with pytest.raises(ValueError, match="init_layers=2 needs init_from_mean=True"):
        make(init_layers=2, init_from_mean=False)
    make(init_layers=1, init_from_mean=False)  # zeros, as before


def test_show_and_tell_with_init_layers_2_learns_through_the_initial_state():
    """Without attention the image enters only through ``h_0, c_0``: with the two-layer init
    MLP, five random images (their annotations differ in mean) are told apart by their word."""
    from captioner.attention import NoAttention

    torch.manual_seed(0)
    dec = AttentionDecoder(V, D, embed_dim=E, hidden_dim=N, dropout=0.0, init_layers=2,
                           attention=NoAttention)
    ann = torch.randn(5, L, D) + 2 * torch.randn(5, 1, D)  # (5, L, D): distinct means
    cap = torch.tensor([[1, 4 + k, 2] for k in range(5)])  # <start> word_k <end>
    opt = torch.optim.Adam(dec.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        logits = dec(ann, cap).logits  # (5, 2, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cap[:, 1:].flatten())
        loss.backward()
        opt.step()
    dec.eval()
    with torch.no_grad():
        first = dec(ann, cap).logits[:, 0].argmax(-1)  # (5,)
    assert loss.item() < 0.05
    assert torch.equal(first, cap[:, 1])
    assert dec.init_hidden[0].weight.grad.abs().sum() > 0


class _Halve(torch.nn.Module):
    """A deterministic stand-in for dropout: every unit kept, at half its value."""

    def forward(self, x):
        return 0.5 * x


@pytest.mark.parametrize("deep_output", [True, False])
def test_dropout_reaches_h_and_the_deep_output_sum(deep_output):
    """``dropout`` acts on ``h_t`` before the output layer and on the deep-output sum (Eq. 7):
    with a stand-in that halves its input, ``L_o(d(tanh(E y + L_h d(h) + L_z z)))``, or
    ``L_o(d(h))`` without the deep output."""
    dec = make(deep_output=deep_output)
    dec.dropout = _Halve()
    emb, h, z = torch.randn(B, E), torch.randn(B, N), torch.randn(B, D)
    with torch.no_grad():
        if deep_output:
            expected = dec.L_o(0.5 * torch.tanh(emb + dec.L_h(0.5 * h) + dec.L_z(z)))
        else:
            expected = dec.L_o(0.5 * h)
        torch.testing.assert_close(dec.output_logits(emb, h, z), expected)


def test_a_row_without_valid_annotations_starts_from_a_zero_mean():
    """An empty source (every position masked) gives the mean 0, not 0 / 0: h_0 = tanh(b_h),
    c_0 = tanh(b_c), and the other rows are unaffected. B=2, L=3, D=2."""
    torch.manual_seed(0)
    dec = AttentionDecoder(V, 2, embed_dim=E, hidden_dim=N, dropout=0.0).eval()
    ann = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [7.0, 7.0]],
                        [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with torch.no_grad():
        s = dec.init_state(ann, mask)
        torch.testing.assert_close(s.h[0], torch.tanh(dec.init_h(torch.tensor([2.0, -1.0]))))
        torch.testing.assert_close(s.h[1], torch.tanh(dec.init_h.bias))
        torch.testing.assert_close(s.c[1], torch.tanh(dec.init_c.bias))
