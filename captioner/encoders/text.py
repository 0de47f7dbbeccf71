r"""Source-sentence encoder for translation (Bahdanau, Cho and Bengio 2015, Section 3.2).

A bidirectional recurrent network reads the source ``x = (x_1, ..., x_S)`` in both directions;
the annotation of word ``j`` concatenates the two hidden states (Section 3.2; the context of
Eq. 5, Section 3.1, is the attention-weighted sum of these annotations)::

    ->h_j = f(->h_{j-1}, E x_j)          <-h_j = f(<-h_{j+1}, E x_j)
    h_j   = [->h_j ; <-h_j]              (D = 2 * hidden_dim)

so that ``h_j`` summarises the whole sentence with a focus on the words around ``x_j``. These
``(B, S, D)`` annotations play exactly the role of the image annotations ``(B, L, D)`` of
:class:`~captioner.encoders.ImageEncoder`: the same :class:`~captioner.decoder.AttentionDecoder`
consumes them, with the key mask ``(B, S)`` so that padding gets exactly zero attention weight.

Padding never enters the recurrences: the batch is packed (``pack_padded_sequence``), so the
backward direction of a short sentence starts at its own last word, and the padded positions of
the annotations are exactly zero.

Differences from the paper, by design of the shared decoder:

* initial decoder state: Bahdanau et al. use ``s_0 = tanh(W_s <-h_1)`` (Appendix A.2.2, the
  backward state of the first word), which the decoder gives with
  ``init_summary: first_backward``; by default (and in ``configs/model/multi30k_gru.yaml``, whose
  results were measured with it) :meth:`AttentionDecoder.init_state` uses Xu et al.'s
  ``h_0 = tanh(f_init,h(mean_j h_j))`` with the *masked* mean over real words, which also sees
  the whole sentence (``<-h_1`` is one of the averaged halves);
* recurrent unit: the decoder is Xu et al.'s LSTM with the deep output of Eq. 7 (Bahdanau et al.
  use a gated unit and a maxout deep output, Appendix A.2.2); the encoder here is a GRU (the
  paper's gated unit) or an LSTM, configurable, with any number of layers;
* deep output: Xu et al.'s Eq. 7 reads the new state ``h_t`` (Bahdanau et al.'s Eq. 4 has
  ``s_i``, their Appendix A.2.2 ``s_{i-1}``: the paper is not consistent) and adds the previous
  word's embedding ``E y_{t-1}`` as it is, without Bahdanau et al.'s ``V_o`` projection;
* PyTorch's GRU (as cuDNN's) applies the reset gate after the recurrent matrix,
  ``r * (U h + b)``, where the paper's gated unit has ``U (r * h)`` (Appendix A.1.1): a
  slightly different function, kept for the fused kernels;
* every source sentence ends with an ``<end>`` token (:mod:`captioner.data.parallel_text`), a
  place for the attention of the final ``<end>`` to go.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["TextEncoder"]


class TextEncoder(nn.Module):
    """Embedding + bidirectional GRU / LSTM returning per-word annotations and their mask.

    Args:
        vocab_size: ``V`` of the *source* language (the first, positional argument: in YAML the
            encoder is a callable ``(src_vocab_size) -> TextEncoder`` whose size is linked
            from the data module).
        embed_dim: ``E``, source word-embedding size.
        hidden_dim: hidden size of each direction; annotations have ``D = 2 * hidden_dim``.
        rnn: ``"gru"`` (Bahdanau et al.'s gated unit) or ``"lstm"``.
        num_layers: stacked bidirectional layers.
        dropout: dropout on the embeddings and between stacked layers.
        pad_id: index of ``<pad>`` in the source vocabulary.

    Attributes:
        out_channels: ``D``, the annotation size (named as in ``ImageEncoder``).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 256,
        hidden_dim: int = 256,
        rnn: Literal["gru", "lstm"] = "gru",
        num_layers: int = 1,
        dropout: float = 0.0,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {rnn!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.vocab_size, self.embed_dim, self.hidden_dim = vocab_size, embed_dim, hidden_dim
        self.pad_id = pad_id
        self.out_channels = 2 * hidden_dim  # D
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        rnn_class = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = rnn_class(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                             bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a right-padded batch of source sentences.

        Args:
            tokens: ``(B, S)`` source ids, right-padded with ``pad_id``.
            lengths: ``(B,)`` number of real tokens per sentence; default: the count of
                non-``pad_id`` tokens.

        Returns:
            ``(annotations (B, S, D), mask (B, S))``: ``annotations[b, j] = [->h_j ; <-h_j]``
            (exactly zero at padding), ``mask`` ``True`` at real tokens.

        Raises:
            ValueError: an empty batch, a sentence of length 0 (nothing to attend to) or
                ``lengths`` beyond the ``S`` columns of ``tokens``.
        """
        B, S = tokens.shape
        if B == 0:
            raise ValueError("an empty batch of source sentences (B = 0)")
        if lengths is None:
            lengths = (tokens != self.pad_id).sum(1)  # (B,)
        lengths = lengths.to(tokens.device)
        if bool((lengths < 1).any()):
            raise ValueError("every source sentence needs at least one token")
        if bool((lengths > S).any()):
            raise ValueError(f"lengths up to {int(lengths.max())} given for tokens of {S} "
                             "columns (B, S)")
        mask = torch.arange(S, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, S)
        emb = self.dropout(self.embedding(tokens))  # (B, S, E)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        annotations, _ = pad_packed_sequence(out, batch_first=True, total_length=S)  # (B, S, D)
        return annotations, mask
