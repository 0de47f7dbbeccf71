"""The opt-in compiled search energies: same numbers as the eager score, a real compile decodes
the same captions, and a failed compile warns once and runs eagerly."""

import warnings

import pytest
import torch

from captioner import attention as attention_module
from captioner.attention import AdditiveAttention, fused_energies, set_compile_search
from captioner.compiled import CompiledOrEager
from captioner.decoder import AttentionDecoder
from captioner.search import beam_search, greedy_search

B, L, N, D, A = 6, 11, 7, 5, 9  # distinct odd sizes


@pytest.mark.parametrize("sigmoid_form", [True, False])
def test_fused_energies_are_the_eager_energies(sigmoid_form):
    torch.manual_seed(0)
    att = AdditiveAttention(N, D, attention_dim=A, tanh_via_sigmoid=sigmoid_form)
    keys, query = torch.randn(B, L, D), torch.randn(B, N)
    with torch.no_grad():
        proj = att.project_keys(keys)  # (B, L, A)
        q = att.query_proj(query).unsqueeze(1)  # (B, 1, A)
        torch.testing.assert_close(fused_energies(proj, q, att.energy.weight.view(-1),
                                                  sigmoid_form),
                                   att.energies(proj, q), rtol=0, atol=2e-6)


def test_a_failed_compile_warns_once_and_runs_eagerly(monkeypatch):
    def no_compiler(fn, **options):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore text")

    monkeypatch.setattr(torch, "compile", no_compiler)
    calls = []
    fused = CompiledOrEager(lambda x: calls.append(x) or x + 1, dynamic=True)
    with pytest.warns(RuntimeWarning, match=r"on None \(RuntimeError: InvalidCxxCompiler: no working C\+\+ compiler"):
        assert fused(1) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert fused(2) == 3
    assert calls == [1, 2] and fused.failed[None].startswith("RuntimeError")


def test_an_error_of_the_arguments_is_raised_and_compiling_stays_on(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(1) or fn)
    add = CompiledOrEager(lambda a, b: a + b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compile failed" warning
        with pytest.raises(RuntimeError, match="must match the size"):
            add(torch.ones(3), torch.ones(5))
        torch.testing.assert_close(add(torch.ones(3), torch.ones(3)), torch.full((3,), 2.0))
    assert add.failed == {} and compiled == [1]


def test_compiled_search_decodes_as_the_eager_search(monkeypatch):
    """A real ``torch.compile`` (a few seconds): beam 3 and greedy give the eager tokens, scores
    and attention, for two batch sizes (one compiled graph, dynamic shapes)."""
    monkeypatch.setattr(attention_module, "_FUSED_ENERGIES",
                        CompiledOrEager(fused_energies, dynamic=True))  # this test's own
    torch.manual_seed(1)
    dec = AttentionDecoder(13, D, embed_dim=9, hidden_dim=N, dropout=0.0).eval()
    annotations = torch.randn(B, L, D) * 2
    kw = dict(start_id=1, end_id=2, pad_id=0, max_length=7)
    eager = [beam_search(dec, annotations, beam_size=3, **kw), greedy_search(dec, annotations, **kw),
             beam_search(dec, annotations[:4], beam_size=3, **kw)]
    assert set_compile_search(dec) == 1 and dec.attention.compile_search
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
        compiled = [beam_search(dec, annotations, beam_size=3, **kw),
                    greedy_search(dec, annotations, **kw),
                    beam_search(dec, annotations[:4], beam_size=3, **kw)]
    assert attention_module._FUSED_ENERGIES.failed == {}
    assert attention_module._FUSED_ENERGIES._compiled is not None  # it did compile
    for a, b in zip(eager, compiled):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.alphas, b.alphas, rtol=0, atol=1e-5)

    def forbidden(*args):
        raise AssertionError("the compiled energies ran with autograd on")

    monkeypatch.setattr(attention_module, "_FUSED_ENERGIES", forbidden)
    dec.train()
    out = dec(annotations, torch.randint(3, 13, (B, 5)))  # training: the eager path
    out.alphas.sum().backward()
    assert dec.attention.query_proj.weight.grad is not None


def test_fused_energies_come_back_in_the_eager_dtype_under_autocast(monkeypatch):
    """Under bf16 autocast the eager energies are bf16 (the GEMV runs in bf16), while the fused
    chain multiplies by the float32 ``w`` and so comes out in float32: the score casts it back,
    so the attention weights and everything after them keep the eager dtype. (The fused
    function is called eagerly here: the dtype rule does not need a compile.)"""
    monkeypatch.setattr(attention_module, "_FUSED_ENERGIES", fused_energies)
    torch.manual_seed(0)
    att = AdditiveAttention(N, D, attention_dim=A)
    keys, query = torch.randn(B, L, D), torch.randn(B, N)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        proj = att.project_keys(keys)  # (B, L, A)
        eager = att.score(query, keys, proj)  # (B, L)
        assert fused_energies(proj, att.query_proj(query).unsqueeze(1),
                              att.energy.weight.view(-1), True).dtype == torch.float32
        att.compile_search = True
        fused = att.score(query, keys, proj)  # (B, L)
    assert eager.dtype == fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused, eager, rtol=0.02, atol=0.05)
