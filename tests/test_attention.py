"""The attention family: shapes, invariants (sums, masks, gradients) and each equation by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from captioner import attention as attention_module
from captioner.attention import (
    ATTENTION_REGISTRY,
    AdditiveAttention,
    Attention,
    CosineAttention,
    DotAttention,
    GeneralAttention,
    LocalAttention2d,
    LocalMonotonicAttention,
    LocalPredictiveAttention,
    LocationAttention,
    NoAttention,
    ScaledDotProductAttention,
    build_attention,
    fused_energies,
    masked_softmax,
)
from captioner.config import instantiate

B, L, D, N, A = 3, 7, 5, 11, 4
GRID = (3, 5)  # (H, W) for the 2-D local attention: L = 15

# name -> (factory (query_dim, key_dim) -> Attention, number of positions, query size)
VARIANTS = {
    "additive": (lambda q, k: AdditiveAttention(q, k, attention_dim=A), L, N),
    "additive_tanh_keys": (lambda q, k: AdditiveAttention(q, k, attention_dim=A,
                                                          key_activation="tanh"), L, N),
    "dot": (DotAttention, L, D),
    "general": (GeneralAttention, L, N),
    "scaled_dot": (lambda q, k: ScaledDotProductAttention(q, k, attention_dim=A), L, N),
    "cosine": (CosineAttention, L, N),
    "location": (lambda q, k: LocationAttention(q, k, num_positions=L), L, N),
    "local_m": (lambda q, k: LocalMonotonicAttention(q, k, window=2), L, N),
    "local_p": (lambda q, k: LocalPredictiveAttention(q, k, window=2, renormalize=True,
                                                      position_dim=A), L, N),
    "local_2d": (lambda q, k: LocalAttention2d(q, k, window=1, renormalize=True, position_dim=A,
                                               grid_size=GRID), GRID[0] * GRID[1], N),
    "none": (NoAttention, L, N),
}


def inputs(num_positions: int, query_dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, query_dim, generator=g),
            torch.randn(B, num_positions, D, generator=g) * 2)


def key_mask(num_positions: int) -> torch.Tensor:
    """Row 0 all valid, row 1 the last 3 padded, row 2 only 2 valid (prefix masks)."""
    lengths = torch.tensor([num_positions, num_positions - 3, 2])
    return torch.arange(num_positions).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)


def build(name: str) -> tuple[Attention, torch.Tensor, torch.Tensor]:
    factory, positions, qdim = VARIANTS[name]
    torch.manual_seed(0)
    attn = factory(qdim, D)
    query, keys = inputs(positions, qdim)
    return attn, query, keys


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_weights_have_shape_and_sum_to_one(name):
    attn, query, keys = build(name)
    alpha = attn(query, keys, step=3)
    assert alpha.shape == (B, keys.shape[1])
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_masked_positions_get_exactly_zero_weight(name):
    attn, query, keys = build(name)
    mask = key_mask(keys.shape[1])
    alpha = attn(query, keys, mask=mask, step=3)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_precomputed_key_projection_gives_the_same_weights(name):
    attn, query, keys = build(name)
    torch.testing.assert_close(attn(query, keys, attn.project_keys(keys), step=1),
                               attn(query, keys, step=1))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradients_reach_every_parameter(name):
    attn, query, keys = build(name)
    query.requires_grad_(True)
    weights = torch.randn(B, keys.shape[1], generator=torch.Generator().manual_seed(5))
    alpha = attn(query, keys, step=3)
    params = dict(attn.named_parameters())
    assert (len(params) == 0) == (name in ("dot", "none"))
    assert alpha.requires_grad == (name != "none")  # uniform weights depend on nothing
    if name != "none":
        (alpha * weights).sum().backward()
        assert query.grad.abs().sum() > 0
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_registry_builds_every_variant_by_name():
    assert {"additive", "concat", "dot", "general", "scaled_dot", "cosine", "location",
            "local_m", "local_p", "local_2d", "none"} <= set(ATTENTION_REGISTRY)
    assert isinstance(build_attention("general", N, D), GeneralAttention)
    assert isinstance(build_attention("location", N, D, num_positions=9), LocationAttention)
    with pytest.raises(ValueError, match="available: .*cosine"):
        build_attention("nope", N, D)


# ---------------------------------------------------------------- equations by hand
def test_dot_is_h_dot_a_and_needs_equal_sizes():
    attn, query, keys = build("dot")
    expected = torch.softmax(torch.einsum("bd,bld->bl", query, keys), -1)
    torch.testing.assert_close(attn(query, keys), expected)
    with pytest.raises(ValueError, match="query_dim=11.*key_dim=5"):
        DotAttention(N, D)


@pytest.mark.parametrize("tanh_via_sigmoid", [True, False])
def test_additive_energies_are_w_tanh_Wa_a_plus_b_plus_Wh_h(tanh_via_sigmoid):
    """e = w^T tanh(W_a a_i + b + W_h h), by hand, for both ways of computing tanh; the
    sigmoid form's energies (not only its weights) match to float32 rounding."""
    torch.manual_seed(0)
    attn = AdditiveAttention(N, D, attention_dim=A, tanh_via_sigmoid=tanh_via_sigmoid)
    query, keys = inputs(L, N)
    hidden = torch.tanh(keys @ attn.key_proj.weight.T + attn.key_proj.bias
                        + (query @ attn.query_proj.weight.T).unsqueeze(1))  # (B, L, A)
    energies = hidden @ attn.energy.weight.view(-1)  # (B, L)
    got = attn.score(query, keys, attn.project_keys(keys))
    torch.testing.assert_close(got, energies, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(query, keys), torch.softmax(energies, -1))


def test_additive_sigmoid_form_has_the_tanh_forms_gradients():
    """Both forms are the same function: equal gradients for every parameter and input,
    also for saturated units (|x| up to ~20) and with broadcast (beam-like) queries."""
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        attn = AdditiveAttention(N, D, attention_dim=A, tanh_via_sigmoid=flag)
        query, keys = inputs(L, N, seed=3)
        query, keys = (query * 4).requires_grad_(), (keys * 3).requires_grad_()
        q = attn.query_proj(query).view(B, 1, 1, A).expand(B, 2, 1, A)  # (B, 2, 1, A)
        e = attn.energies(attn.project_keys(keys).unsqueeze(1), q)  # (B, 2, L)
        assert e.shape == (B, 2, L)
        (e.sin().sum() + torch.softmax(e, -1)[..., 0].sum()).backward()
        grads.append([query.grad, keys.grad, *(p.grad for p in attn.parameters())])
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_additive_sigmoid_form_under_bf16_is_as_accurate_as_the_tanh_form():
    """In bf16 ``2 w^T sigmoid(.)`` is about ``sum_k w_k`` in size: rounding it before
    subtracting ``sum_k w_k`` lost the energies' digits when ``|sum_k w_k| >> |e|``. With the
    shift inside the GEMV the weights' error against float64 is near the tanh form's (1.35x
    here; 4.7x before, with ``sum_k w_k`` = 13.3), with and without autograd (search)."""
    torch.manual_seed(0)
    n, d, a, b, l = 64, 32, 256, 4, 49
    attn = AdditiveAttention(n, d, attention_dim=a)
    with torch.no_grad():
        attn.energy.weight.normal_(0, 0.1).add_(0.05)  # sum_k w_k = 13.3
    exact = AdditiveAttention(n, d, attention_dim=a, tanh_via_sigmoid=False).double()
    exact.load_state_dict(attn.state_dict())
    keys, query = torch.randn(b, l, d), torch.randn(b, n)
    with torch.no_grad():
        ref = exact(query.double(), keys.double())  # (b, l)
    errors = {}
    for flag in (False, True):
        attn.tanh_via_sigmoid = flag
        for grad in (True, False):
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
                alpha = attn(query, keys)  # (b, l)
            errors[flag, grad] = float((alpha.double() - ref).abs().sum(-1).max())
    assert all(0 < e < 0.01 for e in errors.values()), errors
    for grad in (True, False):
        assert errors[True, grad] < 2 * errors[False, grad], errors


@pytest.mark.parametrize("tanh_via_sigmoid", [True, False])
def test_additive_search_scores_in_chunks_with_the_same_energies(tanh_via_sigmoid):
    """Without autograd the hidden layer is formed ``chunk_elements`` at a time: 13 rows of
    7 x 4 in chunks of 2 rows (7 chunks, the last one short) give the energies of the whole;
    with autograd (training) it is formed whole."""
    torch.manual_seed(0)
    attn = AdditiveAttention(N, D, attention_dim=A, tanh_via_sigmoid=tanh_via_sigmoid,
                             chunk_elements=2 * L * A + 5)
    whole = AdditiveAttention(N, D, attention_dim=A, tanh_via_sigmoid=tanh_via_sigmoid,
                              chunk_elements=0)
    whole.load_state_dict(attn.state_dict())
    g = torch.Generator().manual_seed(4)
    query, keys = torch.randn(13, N, generator=g), torch.randn(13, L, D, generator=g)
    calls = []
    attn.energies = lambda p, q: calls.append(p.shape[0]) or AdditiveAttention.energies(attn, p, q)
    with torch.no_grad():
        chunked = attn.score(query, keys, attn.project_keys(keys))
        expected = whole.score(query, keys, whole.project_keys(keys))
    assert calls == [2, 2, 2, 2, 2, 2, 1]
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-6)
    calls.clear()
    trained = attn.score(query, keys, attn.project_keys(keys))
    assert calls == [13] and trained.requires_grad
    torch.testing.assert_close(trained.detach(), expected, rtol=0, atol=1e-6)


# ------------------------------------------ the authors' COCO attention (n_layers_att = 2)
def tanh_keys_energies(attn: AdditiveAttention, query: torch.Tensor,
                       keys: torch.Tensor) -> torch.Tensor:
    """``w^T tanh(tanh(W_a a_i + b) + W_h h)`` ``(B, L)`` from the module's weights."""
    k = torch.tanh(keys @ attn.key_proj.weight.T + attn.key_proj.bias)  # (B, L, A)
    q = (query @ attn.query_proj.weight.T).unsqueeze(1)  # (B, 1, A)
    return torch.tanh(k + q) @ attn.energy.weight.view(-1)  # (B, L)


@pytest.mark.parametrize("tanh_via_sigmoid", [True, False])
def test_tanh_keys_energy_by_hand(tanh_via_sigmoid):
    """``key_activation="tanh"`` on A = 2, D = 2, L = 3, N = 1 with hand-set weights, against
    ``e_i = sum_j w_j tanh(tanh(sum_d Wa_jd a_id + b_j) + Wh_j h)`` in scalars."""
    attn = AdditiveAttention(1, 2, attention_dim=2, key_activation="tanh",
                             tanh_via_sigmoid=tanh_via_sigmoid)
    Wa, b = [[1.0, 0.5], [-2.0, 1.5]], [0.3, -0.4]
    Wh, w = [2.0, -1.0], [1.5, -0.5]
    with torch.no_grad():
        attn.key_proj.weight.copy_(torch.tensor(Wa))
        attn.key_proj.bias.copy_(torch.tensor(b))
        attn.query_proj.weight.copy_(torch.tensor(Wh).view(2, 1))
        attn.energy.weight.copy_(torch.tensor(w).view(1, 2))
    a, h = [[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0]], 0.4
    expected = [sum(w[j] * math.tanh(math.tanh(Wa[j][0] * ai[0] + Wa[j][1] * ai[1] + b[j])
                                     + Wh[j] * h) for j in range(2)) for ai in a]
    without_squash = [sum(w[j] * math.tanh(Wa[j][0] * ai[0] + Wa[j][1] * ai[1] + b[j]
                                           + Wh[j] * h) for j in range(2)) for ai in a]
    assert max(abs(x - y) for x, y in zip(expected, without_squash)) > 0.1
    query, keys = torch.tensor([[h]]), torch.tensor([a])  # (1, 1), (1, 3, 2)
    got = attn.score(query, keys, attn.project_keys(keys))  # (1, 3)
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(query, keys), torch.softmax(torch.tensor([expected]), -1))


def test_tanh_keys_sigmoid_tanh_chunked_and_compiled_paths_agree(monkeypatch):
    """The sigmoid form (squash, then double), the plain ``tanh`` form, the chunked no-grad
    search path and the ``compile_search`` path (:func:`fused_energies` run eagerly here: the
    squashed keys are its input) give ``w^T tanh(tanh(W_a a + b) + W_h h)``; both forms have
    the same gradients, and masked weights are exactly 0."""
    torch.manual_seed(0)
    forms = {flag: AdditiveAttention(N, D, attention_dim=A, key_activation="tanh",
                                     tanh_via_sigmoid=flag, chunk_elements=2 * L * A + 5)
             for flag in (True, False)}
    forms[False].load_state_dict(forms[True].state_dict())
    g = torch.Generator().manual_seed(4)
    query, keys = torch.randn(13, N, generator=g), torch.randn(13, L, D, generator=g) * 2
    expected = tanh_keys_energies(forms[True], query, keys).detach()  # (13, L)
    plain = AdditiveAttention(N, D, attention_dim=A)  # the option ignored: other energies
    plain.load_state_dict(forms[True].state_dict())
    assert (plain.score(query, keys, plain.project_keys(keys)) - expected).abs().max() > 0.05
    grads = []
    for flag, attn in forms.items():
        q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
        e = attn.score(q, k, attn.project_keys(k))  # (13, L), autograd: formed whole
        torch.testing.assert_close(e.detach(), expected, rtol=1e-5, atol=1e-5)
        (e.sin().sum() + torch.softmax(e, -1)[:, 0].sum()).backward()
        grads.append([q.grad, k.grad, *(p.grad for p in attn.parameters())])
        calls = []
        monkeypatch.setattr(attn, "energies", lambda p, q_, attn=attn: calls.append(p.shape[0])
                            or AdditiveAttention.energies(attn, p, q_))
        with torch.no_grad():
            chunked = attn.score(query, keys, attn.project_keys(keys))
        assert calls == [2, 2, 2, 2, 2, 2, 1]
        torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
        fused = []
        monkeypatch.setattr(attention_module, "_FUSED_ENERGIES",
                            lambda *args: fused.append(args[3]) or fused_energies(*args))
        attn.compile_search = True
        with torch.no_grad():
            compiled = attn.score(query, keys, attn.project_keys(keys))
        attn.compile_search = False
        assert fused == [flag]
        torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    mask = torch.arange(L) < torch.arange(13).remainder(L).add(1).unsqueeze(1)  # (13, L)
    alpha = forms[True](query, keys, mask=mask)  # (13, L)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(13))
    torch.testing.assert_close(
        alpha, torch.softmax(expected.masked_fill(~mask, float("-inf")), -1), rtol=1e-5,
        atol=1e-6)


def test_key_activation_default_is_unchanged():
    """The default is ``identity`` and computes today's keys bit for bit (``2 (W_a a + b)``);
    ``tanh`` adds no parameter (same state-dict keys, loads the default's) but other keys."""
    torch.manual_seed(0)
    default = AdditiveAttention(N, D, attention_dim=A)
    squashed = AdditiveAttention(N, D, attention_dim=A, key_activation="tanh")
    assert default.key_activation == "identity"
    assert list(default.state_dict()) == list(squashed.state_dict()) == [
        "key_proj.weight", "key_proj.bias", "query_proj.weight", "energy.weight"]
    squashed.load_state_dict(default.state_dict())
    query, keys = inputs(L, N)
    linear = F.linear(keys, default.key_proj.weight, default.key_proj.bias)  # (B, L, A)
    assert torch.equal(default.project_keys(keys), linear * 2.0)
    assert torch.equal(squashed.project_keys(keys), torch.tanh(linear) * 2.0)
    assert not torch.allclose(squashed(query, keys), default(query, keys))
    with pytest.raises(ValueError, match="key_activation.*'relu'"):
        AdditiveAttention(N, D, key_activation="relu")


def test_key_activation_reaches_the_decoder_from_config():
    """``attention: {class_path: ..AdditiveAttention, init_args: {key_activation: tanh}}`` as
    LightningCLI parses it: the decoder's first-step weights are the squashed keys' softmax."""
    vocab, embed, hidden, steps = 9, 3, 11, 4
    torch.manual_seed(0)
    decoder = instantiate("captioner.decoder.AttentionDecoder", {
        "vocab_size": vocab, "encoder_dim": D, "embed_dim": embed, "hidden_dim": hidden,
        "dropout": 0.0,
        "attention": {"class_path": "captioner.attention.AdditiveAttention",
                      "init_args": {"attention_dim": A, "key_activation": "tanh"}},
    })
    attn = decoder.attention
    assert isinstance(attn, AdditiveAttention) and attn.key_activation == "tanh"
    _, annotations = inputs(L, N)
    captions = torch.randint(1, vocab, (B, steps + 1), generator=torch.Generator().manual_seed(2))
    out = decoder(annotations, captions)
    assert out.alphas.shape == (B, steps, L)
    h0 = decoder.init_state(annotations).h  # (B, N)
    torch.testing.assert_close(out.alphas[:, 0],
                               torch.softmax(tanh_keys_energies(attn, h0, annotations), -1))
    out.logits.sum().backward()  # the squashed keys' doubling is not in place
    assert attn.key_proj.weight.grad.abs().sum() > 0
    with pytest.raises(Exception, match="key_activation"):
        instantiate("captioner.decoder.AttentionDecoder", {
            "vocab_size": vocab, "encoder_dim": D,
            "attention": {"class_path": "captioner.attention.AdditiveAttention",
                          "init_args": {"key_activation": "relu"}}})


def test_general_is_h_W_a():
    attn, query, keys = build("general")
    W = attn.key_proj.weight  # (N, D)
    expected = torch.softmax(torch.einsum("bn,nd,bld->bl", query, W, keys), -1)
    torch.testing.assert_close(attn(query, keys), expected)


def test_scaled_dot_divides_by_sqrt_of_the_common_size():
    attn, query, keys = build("scaled_dot")
    q = query @ attn.query_proj.weight.T  # (B, A)
    k = keys @ attn.key_proj.weight.T  # (B, L, A)
    expected = torch.softmax(torch.einsum("ba,bla->bl", q, k) / math.sqrt(A), -1)
    torch.testing.assert_close(attn(query, keys), expected)


def test_cosine_is_key_strength_times_cosine_similarity():
    attn, query, keys = build("cosine")
    k = query @ attn.key_vector.weight.T + attn.key_vector.bias  # (B, D)
    beta = F.softplus(query @ attn.strength.weight.T + attn.strength.bias)  # (B, 1)
    cos = F.cosine_similarity(keys, k.unsqueeze(1), dim=-1)  # (B, L)
    torch.testing.assert_close(attn(query, keys), torch.softmax(beta * cos, -1))
    # content-based: rescaling an annotation by a positive factor changes nothing
    scale = torch.tensor([0.5, 3.0, 1.0, 7.0, 0.1, 2.0, 4.0]).view(1, L, 1)
    torch.testing.assert_close(attn(query, keys * scale), attn(query, keys))


def test_location_attention_ignores_content_and_checks_the_number_of_positions():
    attn, query, keys = build("location")
    torch.testing.assert_close(attn(query, keys), torch.softmax(attn.location(query), -1))
    torch.testing.assert_close(attn(query, torch.randn_like(keys)), attn(query, keys))
    with pytest.raises(ValueError, match="num_positions=7.*L=9"):
        attn(query, torch.randn(B, 9, D))
    # Eq. 8 has no bias: a zero query attends uniformly (a bias is an option, a learned prior)
    assert attn.location.bias is None
    torch.testing.assert_close(attn(torch.zeros(B, N), keys), torch.full((B, L), 1 / L))
    assert LocationAttention(N, D, num_positions=L, bias=True).location.bias.shape == (L,)


def test_no_attention_is_uniform_and_provides_no_context():
    attn, query, keys = build("none")
    assert not attn.provides_context and AdditiveAttention.provides_context
    torch.testing.assert_close(attn(query, keys), torch.full((B, L), 1 / L))


# ---------------------------------------------------------------- local attention
def uniform_align(q: int, k: int) -> GeneralAttention:
    """A score that is 0 everywhere: the aligned weights are uniform over the window."""
    g = GeneralAttention(q, k)
    torch.nn.init.zeros_(g.key_proj.weight)
    return g


def set_centre(predictor_w: torch.nn.Linear, predictor_v: torch.nn.Linear, fractions: torch.Tensor,
               gain: float = 3.0) -> torch.Tensor:
    """Make ``sigmoid(v^T tanh(W h))`` equal ``fractions`` ``(B, k)``; returns the queries."""
    k = fractions.shape[1]
    with torch.no_grad():
        predictor_w.weight.zero_()
        predictor_w.weight[:k, :k] = torch.eye(k)  # first k hidden units copy h_0 .. h_{k-1}
        predictor_v.weight.zero_()
        predictor_v.weight[:, :k] = gain * torch.eye(k)
    query = torch.zeros(fractions.shape[0], N)
    query[:, :k] = torch.atanh(torch.logit(fractions) / gain)
    return query


def test_local_m_attends_to_the_window_around_the_step():
    attn = LocalMonotonicAttention(N, D, score=uniform_align, window=2)
    _, keys = inputs(L, N)
    query = torch.randn(B, N)
    alpha = attn(query, keys, step=3)  # positions 1..5
    torch.testing.assert_close(alpha, torch.tensor([[0, .2, .2, .2, .2, .2, 0.]] * B))
    alpha = attn(query, keys, step=0)  # positions 0..2 (window clipped)
    torch.testing.assert_close(alpha[0], torch.tensor([1 / 3] * 3 + [0.] * 4))
    # past the end: clamped to the last valid position of each row
    alpha = attn(query, keys, mask=key_mask(L), step=10)  # lengths 7, 4, 2
    expected = torch.tensor([[0, 0, 0, 0, 1 / 3, 1 / 3, 1 / 3],
                             [0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0],
                             [.5, .5, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(alpha, expected)
    with pytest.raises(ValueError, match="step"):
        attn(query, keys)


@pytest.mark.parametrize("renormalize", [False, True])
def test_local_p_window_is_centred_at_the_predicted_position(renormalize):
    attn = LocalPredictiveAttention(N, D, score=uniform_align, window=2, renormalize=renormalize,
                                    position_dim=A)
    centres = torch.tensor([2.5, 3.5, 1.0])  # p_t = S sigmoid(...), S = 7
    query = set_centre(attn.W_p, attn.v_p, (centres / L).unsqueeze(1))
    _, keys = inputs(L, N)
    torch.testing.assert_close(attn.centre(query, keys, None), centres.unsqueeze(1))
    alpha = attn(query, keys)
    # window |s + 1/2 - p| <= 2, uniform align 1/|window|, Gaussian with sigma = 1
    s = torch.arange(L) + 0.5
    expected = torch.zeros(B, L)
    for b, p in enumerate(centres.tolist()):
        inside = (s - p).abs() <= 2
        expected[b, inside] = torch.exp(-(s[inside] - p) ** 2 / 2) / inside.sum()
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(alpha, expected)
    assert alpha[0].argmax() == 2 and alpha[1].argmax() == 3
    torch.testing.assert_close(alpha[0, 1], alpha[0, 3])  # symmetric around p = 2.5
    if not renormalize:  # Luong et al.: no renormalisation, the weights sum to less than 1
        assert (alpha.sum(-1) < 1).all()


def test_local_p_scales_the_centre_by_each_rows_length():
    attn = LocalPredictiveAttention(N, D, score=uniform_align, window=2, position_dim=A)
    query = set_centre(attn.W_p, attn.v_p, torch.full((B, 1), 0.5))
    _, keys = inputs(L, N)
    centre = attn.centre(query, keys, key_mask(L))  # lengths 7, 4, 2
    torch.testing.assert_close(centre, torch.tensor([[3.5], [2.0], [1.0]]))


def test_local_2d_window_is_centred_at_the_predicted_cell():
    attn = LocalAttention2d(N, D, score=uniform_align, window=1, position_dim=A, grid_size=GRID)
    H, W = GRID
    centres = torch.tensor([[1.5, 2.5], [0.5, 4.5], [2.0, 1.0]])  # (p_r, p_c)
    query = set_centre(attn.W_p, attn.V_p, centres / torch.tensor([H, W]))
    _, keys = inputs(H * W, N)
    torch.testing.assert_close(attn.centre(query, keys), centres)
    alpha = attn(query, keys).view(B, H, W)
    r = (torch.arange(H) + 0.5).view(H, 1)
    c = (torch.arange(W) + 0.5).view(1, W)
    for b in range(B):
        pr, pc = centres[b].tolist()
        inside = ((r - pr).abs() <= 1) & ((c - pc).abs() <= 1)  # (H, W)
        gauss = torch.exp(-((r - pr) ** 2 + (c - pc) ** 2) / (2 * 0.5**2))
        torch.testing.assert_close(alpha[b], torch.where(inside, gauss / inside.sum(), 0.0))
    assert divmod(int(alpha[0].argmax()), W) == (1, 2)
    assert divmod(int(alpha[1].argmax()), W) == (0, 4)
    torch.testing.assert_close(alpha[0, 1, 1], alpha[0, 1, 3])  # symmetric around column 2


@pytest.mark.parametrize("cls", [LocalMonotonicAttention, LocalPredictiveAttention])
def test_local_windows_under_bf16_are_float32s(cls):
    """Coordinates ``s + 1/2`` were built in the keys' dtype: bf16 cannot hold them from
    ``s = 128``, so the window of a long source grew (6-7 positions for ``D_w = 2``). Under
    autocast and in a bf16 model the positions attended to are now float32's."""
    import copy

    torch.manual_seed(0)
    attn = cls(8, 8, window=2)
    keys, query = torch.randn(2, 300, 8), torch.randn(2, 8)
    bf16_model = copy.deepcopy(attn).bfloat16()
    for step in (20, 150, 290):
        support = attn(query, keys, step=step) > 0  # (2, 300)
        assert support.sum(-1).max() <= 5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = attn(query, keys.bfloat16(), step=step)
        pure = bf16_model(query.bfloat16(), keys.bfloat16(), step=step)
        assert autocast.dtype == pure.dtype == torch.bfloat16
        assert torch.equal(autocast > 0, support) and torch.equal(pure > 0, support), step


def test_local_p_centre_of_a_bf16_model_squashes_in_float32():
    """``p_t = S sigmoid(v_p^T tanh(W_p h_t))``: in a bf16 model the logit is bf16, but the
    sigmoid runs on it in float32, so that ``p_t`` (S = 301 here) keeps float32's resolution:
    a bf16 sigmoid near 1/2 is off by up to 2^-9, a whole position at this length."""
    torch.manual_seed(3)
    attn = LocalPredictiveAttention(8, 8, window=2).bfloat16()
    keys, query = torch.randn(4, 301, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.no_grad():
        logit = attn.v_p(torch.tanh(attn.W_p(query)))  # (4, 1) bf16
        p = attn.centre(query, keys, None)  # (4, 1)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, 301 * torch.sigmoid(logit.float()), rtol=1e-6, atol=1e-5)


def test_local_2d_infers_square_grids_and_names_bad_sizes():
    attn = LocalAttention2d(N, D, window=1)
    assert attn.grid(9) == (3, 3)
    with pytest.raises(ValueError, match="L = 15"):
        attn.grid(15)
    with pytest.raises(ValueError, match="3 x 5.*L = 16"):
        LocalAttention2d(N, D, grid_size=GRID).grid(16)


def test_local_2d_window_over_padding_only_falls_back_to_the_valid_cells():
    attn = LocalAttention2d(N, D, score=uniform_align, window=1, position_dim=A, grid_size=GRID)
    query = set_centre(attn.W_p, attn.V_p, torch.tensor([[0.5 / 3, 0.5 / 5]] * B))  # cell (0, 0)
    _, keys = inputs(15, N)
    mask = torch.zeros(B, 15, dtype=torch.bool)
    mask[:, 14] = True  # only cell (2, 4), outside the window
    alpha = attn(query, keys, mask=mask)
    assert torch.isfinite(alpha).all() and (alpha[:, :14] == 0).all()
    # the fallback's weights are not damped by the Gaussian around the centre in the padding
    # (exp(-(2^2 + 4^2) / 0.5) ~ 4e-18 of them was left): the one valid cell gets them all
    torch.testing.assert_close(alpha[:, 14], torch.ones(B))
    context = torch.bmm(alpha.unsqueeze(1), keys).squeeze(1)  # (B, D)
    torch.testing.assert_close(context, keys[:, 14])


def test_masked_softmax_by_hand_and_a_row_without_valid_positions():
    """Row 0: positions 0, 1 valid with energies 0 and log 3: weights 1/4, 3/4, then 0 (its
    energy 5 ignored). Row 1 has no valid position (an empty source): all weights 0, not NaN."""
    scores = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_softmax(scores, mask),
                               torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("name", ["local_p", "local_2d"])
def test_renormalized_local_weights_sum_to_one_so_their_sum_has_no_gradient(name):
    """With ``renormalize`` the weights sum to 1 whatever the query: the gradient of their sum
    with respect to the query is 0 (a denominator left out of the graph would leave one)."""
    attn, query, keys = build(name)
    query = (query * 3).requires_grad_()
    alpha = attn(query, keys)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
    (grad,) = torch.autograd.grad(alpha.sum(), query, retain_graph=True)
    assert grad.abs().max() < 1e-5
    (grad,) = torch.autograd.grad((alpha * torch.arange(alpha.shape[1])).sum(), query)
    assert grad.abs().max() > 1e-3  # the weights themselves do depend on the query
