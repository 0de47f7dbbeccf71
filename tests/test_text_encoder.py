"""TextEncoder: bidirectional annotations, packing, and exact masking through the shared decoder."""

import pytest
import torch

from captioner.attention import AdditiveAttention
from captioner.decoder import AttentionDecoder
from captioner.encoders.text import TextEncoder
from captioner.search import beam_search, greedy_search

B, S, V, E, H = 3, 7, 13, 5, 11  # H: hidden size per direction, D = 2H = 22
LENGTHS = torch.tensor([7, 4, 2])


def make(**kw) -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(V, embed_dim=E, hidden_dim=H, **kw).eval()


def batch() -> torch.Tensor:
    torch.manual_seed(1)
    tokens = torch.randint(4, V, (B, S))
    for b, n in enumerate(LENGTHS.tolist()):
        tokens[b, n:] = 0  # <pad>
    return tokens


def test_annotations_shape_mask_and_zero_padding():
    enc = make()
    annotations, mask = enc(batch())
    assert enc.out_channels == 2 * H
    assert annotations.shape == (B, S, 2 * H)
    assert mask.tolist() == [[j < n for j in range(S)] for n in LENGTHS.tolist()]
    assert (annotations[~mask] == 0).all()
    assert (annotations[mask].abs().sum(-1) > 0).all()


def test_lengths_default_to_non_pad_count():
    enc = make()
    tokens = batch()
    a1, m1 = enc(tokens)
    a2, m2 = enc(tokens, LENGTHS)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)


@pytest.mark.parametrize("rnn,layers", [("gru", 1), ("lstm", 2)])
def test_padding_does_not_change_a_sentence(rnn, layers):
    # packed sequences: a short sentence encodes the same alone or padded inside a batch (the
    # backward direction starts at its own last word, not at the padding)
    enc = make(rnn=rnn, num_layers=layers, dropout=0.3)
    tokens = batch()
    annotations, _ = enc(tokens)
    for b, n in enumerate(LENGTHS.tolist()):
        alone, _ = enc(tokens[b : b + 1, :n])
        assert torch.allclose(annotations[b, :n], alone[0], atol=1e-6)


def test_forward_half_reads_left_context_backward_half_right_context():
    enc = make()
    tokens = batch()[:1]  # length 7
    changed = tokens.clone()
    changed[0, 5] = 4 if tokens[0, 5] != 4 else 5
    a, _ = enc(tokens)
    c, _ = enc(changed)
    fwd, bwd = slice(0, H), slice(H, 2 * H)
    assert torch.equal(a[0, :5, fwd], c[0, :5, fwd])  # ->h_j for j < 5 never saw x_5
    assert not torch.allclose(a[0, :5, bwd], c[0, :5, bwd])  # <-h_j for j < 5 did
    assert torch.equal(a[0, 6, bwd], c[0, 6, bwd])  # <-h_6 never saw x_5
    assert not torch.allclose(a[0, 6, fwd], c[0, 6, fwd])


def test_empty_sentence_and_bad_options_raise():
    enc = make()
    with pytest.raises(ValueError, match="at least one token"):
        enc(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lengths up to 4 given for tokens of 3 columns"):
        enc(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 4]))  # was a RuntimeError
    with pytest.raises(ValueError, match=r"empty batch"):
        enc(torch.ones(0, 3, dtype=torch.long))  # was "Cannot pack empty tensors"
    with pytest.raises(ValueError, match="rnn"):
        TextEncoder(V, rnn="transformer")  # type: ignore[arg-type]


def shared_decoder() -> AttentionDecoder:
    torch.manual_seed(2)
    return AttentionDecoder(17, 2 * H, embed_dim=9, hidden_dim=15, dropout=0.0, gate="none",
                            attention=lambda q, k: AdditiveAttention(q, k, attention_dim=7)).eval()


def test_padding_gets_exactly_zero_attention_through_encoder_and_decoder():
    enc, dec = make(), shared_decoder()
    annotations, mask = enc(batch())
    targets = torch.randint(4, 17, (B, 6))
    targets[:, 0] = 1
    out = dec(annotations, targets, mask)  # (B, 5, S) attention
    for b, n in enumerate(LENGTHS.tolist()):
        assert (out.alphas[b, :, n:] == 0).all()  # exactly zero, not just small
        assert torch.allclose(out.alphas[b, :, :n].sum(-1), torch.ones(5), atol=1e-6)
    # ... so a padded sentence decodes exactly as it does alone
    for b, n in enumerate(LENGTHS.tolist()):
        a, m = enc(batch()[b : b + 1, :n])
        alone = dec(a, targets[b : b + 1], m)
        assert torch.allclose(out.logits[b], alone.logits[0], atol=1e-5)
        assert torch.allclose(out.alphas[b, :, :n], alone.alphas[0], atol=1e-6)


def test_search_attention_over_padding_is_exactly_zero():
    enc, dec = make(), shared_decoder()
    annotations, mask = enc(batch())
    kw = dict(start_id=1, end_id=2, pad_id=0, max_length=6, mask=mask)
    for result in (greedy_search(dec, annotations, **kw),
                   beam_search(dec, annotations, beam_size=3, **kw)):
        for b, n in enumerate(LENGTHS.tolist()):
            assert (result.alphas[b, :, n:] == 0).all()


def test_extra_padding_columns_keep_the_width_of_the_tokens():
    # lengths (4, 2) inside 7 columns: annotations stay (B, 7, D), in step with the (B, 7) mask
    enc = make()
    tokens = batch()[1:]  # lengths 4 and 2, 7 columns
    annotations, mask = enc(tokens, torch.tensor([4, 2]))
    assert annotations.shape == (2, S, 2 * H) and mask.shape == (2, S)
    assert (annotations[:, 4:] == 0).all()


def test_dropout_acts_on_the_embeddings_and_between_stacked_layers():
    enc = make(dropout=0.4).train()
    tokens = batch()
    torch.manual_seed(2)
    a1, _ = enc(tokens)
    a2, _ = enc(tokens)
    assert not torch.equal(a1, a2)  # one layer: the embedding dropout is the only noise
    assert make(num_layers=2, dropout=0.4).rnn.dropout == 0.4
    assert make(num_layers=1, dropout=0.4).rnn.dropout == 0.0  # no layer above to feed


def test_bahdanau_initial_state_is_the_backward_recurrences_final_state():
    """With ``init_summary="first_backward"`` the decoder's ``h_0`` reads ``<-h_1``: the
    backward GRU's state after reading each sentence from its own last word to its first, so
    it is the sentence's alone (padding or other sentences change nothing) and equals the GRU's
    final backward hidden state."""
    enc = make()
    torch.manual_seed(2)
    dec = AttentionDecoder(17, 2 * H, embed_dim=9, hidden_dim=15, dropout=0.0, gate="none",
                           init_summary="first_backward").eval()
    tokens = batch()
    with torch.no_grad():
        annotations, mask = enc(tokens)
        h0 = dec.init_state(annotations, mask).h  # (B, 15)
        for b, n in enumerate(LENGTHS.tolist()):
            _, h_n = enc.rnn(enc.embedding(tokens[b:b + 1, :n]))  # (2, 1, H): forward, backward
            torch.testing.assert_close(h0[b], torch.tanh(dec.init_h(h_n[1, 0])))
            alone, alone_mask = enc(tokens[b:b + 1, :n])
            torch.testing.assert_close(dec.init_state(alone, alone_mask).h[0], h0[b])
