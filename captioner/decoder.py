r"""The attention LSTM decoder of Show, Attend and Tell (Xu et al. 2015, Sections 3.1.2 and 4).

One decoding step ``t`` (Eqs. 1-7 of the paper; ``E y_{t-1}`` is the embedded previous word)::

    alpha_t = softmax_i f_att(a_i, h_{t-1})                       (Eqs. 4-5, captioner.attention)
    beta_t  = sigmoid(f_beta(h_{t-1}))                            (Section 4.2.1, a scalar)
    z_t     = beta_t * sum_i alpha_ti a_i                         (Eq. 6 for soft attention)
    (i, f, g, o) = W [E y_{t-1}; z_t] + U h_{t-1} + b             (Eqs. 1-3: the LSTM T_{D+m+n,n},
                                                                   the paper's m = E, n = N)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);   h_t = sigmoid(o) * tanh(c_t)
    p(y_t | a, y_{<t}) ~ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))  (Eq. 7: the deep output layer)

(the gate pre-activations ``i, f, g, o`` in ``torch.nn.LSTMCell``'s order, whose weights the
decoder keeps).

Initial state (Section 3.1.2): ``h_0 = tanh(f_init,h(mean_i a_i))``, ``c_0 = tanh(f_init,c(mean_i a_i))``,
one linear layer each by default; ``init_layers`` adds the authors' shared ReLU layers before the
two heads (see :class:`AttentionDecoder`).

Attention variants (all options; the defaults are the paper's soft attention):

* any score function of :mod:`captioner.attention` (dot, general, scaled dot-product, cosine,
  location-based, local-m / local-p / 2-D local); the decoder passes the step index ``t`` to the
  attention module (``step=t``) for position-aware attention such as local-m;
* no attention (Show and Tell, Vinyals et al. 2015): ``attention: captioner.attention.NoAttention``.
  The image then enters only through ``h_0, c_0``; ``z_t`` is absent (the LSTM input is
  ``E y_{t-1}`` alone, Eq. 7 has no ``L_z z_t``, no gate);
* stochastic hard attention (Section 4.1, :mod:`captioner.hard_attention`):
  ``attention_mode="hard"`` gives ``z_t = beta_t a_{s_t}``, ``s_t ~ Multinoulli(alpha_t)`` in
  training (or the expectation, with probability ``hard_expectation_prob``), and the most
  probable location (or the expectation, ``hard_test``) in evaluation mode. :meth:`step` never
  samples, so search is deterministic, and it returns the weights actually used (one-hot rows
  for ``hard_test="argmax"``), so ``alphas.argmax(-1)`` of a search result is the chosen
  location of each word.

Deviations are options, not defaults: ``gate="vector"`` is the per-channel gate of popular ports
(``f_beta: N -> D``), ``gate="none"`` drops it; ``deep_output=False`` replaces Eq. 7 by a single
linear layer over ``h_t``. The deep output applies ``tanh`` before ``L_o`` as the authors' released
code (arctic-captions) does; ``deep_output_activation="identity"`` gives the literal Eq. 7.

Efficiency (the unroll in :meth:`AttentionDecoder.forward`): the attention key projection is
computed once per image, the word-embedding part of the LSTM input and of the deep output are
computed for all steps in one matmul, the context is a batched matmul, the recurrent part
``[W_z, U] [z_t; h_{t-1}]`` is one matmul per step whose weight gradient is one GEMM over all
steps (:mod:`captioner.unrolled_linear`), and the output layer over the vocabulary runs once over
all ``T`` steps instead of once per step. With ``skip_padding=True`` (training) a caption's steps
stop at its end: the batch is ordered by length once, and the captions still running are a prefix
of it, taken as views only when one ends (no per-step gathering), and the output layer runs
on the real tokens only; the losses score those rows where they are (``DecoderOutput.positions``)
instead of a ``(B, T, V)`` grid that is mostly copies and zeros.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioner.attention import AdditiveAttention, Attention
from captioner.autocast import autocast_dtype
from captioner.hard_attention import HardAttention, HardSelection
from captioner.losses import at_least_float32
from captioner.unrolled_linear import UnrolledLinear


@dataclass
class DecoderState:
    """Recurrent state and per-image cached tensors of a batch of ``B`` hypotheses.

    Attributes:
        h: ``(B, N)`` hidden state.
        c: ``(B, N)`` memory cell.
        keys: ``(B, L, D)`` annotation vectors, or ``(B / group, L, D)`` shared by each run of
            ``group`` consecutive rows (beam search's hypotheses of one image).
        proj_keys: query-independent attention projection (``(B, L, A)`` or ``None``).
        mask: ``(B, L)`` bool, ``True`` where an annotation is valid, or ``None``.
        step: the index ``t`` of the next step (0 for the initial state), the same for all rows.
        group: rows per row of ``keys`` (1: one each).
    """

    h: torch.Tensor
    c: torch.Tensor
    keys: torch.Tensor
    proj_keys: torch.Tensor | None
    mask: torch.Tensor | None
    step: int = 0
    group: int = 1

    def select(self, index: torch.Tensor) -> "DecoderState":
        """Reorder / repeat the batch: every tensor ``x`` becomes ``x[index]`` (shared keys are
        copied out, one row each)."""

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.index_select(0, index)

        key_rows = index if self.group == 1 else torch.div(index, self.group,
                                                           rounding_mode="floor")
        return DecoderState(pick(self.h), pick(self.c), self.keys.index_select(0, key_rows),
                            pick(self.proj_keys), pick(self.mask), self.step)

    def head(self, n: int) -> "DecoderState":
        """The first ``n`` rows of every tensor, as views (no copy)."""
        if self.group != 1:
            return self.select(torch.arange(n, device=self.h.device))

        def first(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:n]

        return DecoderState(first(self.h), first(self.c), first(self.keys), first(self.proj_keys),
                            first(self.mask), self.step)

    def select_recurrent(self, index: torch.Tensor) -> "DecoderState":
        """Reorder only ``h`` and ``c`` (cheap, for beams of the same image sharing keys)."""
        return replace(self, h=self.h.index_select(0, index), c=self.c.index_select(0, index))

    def repeat_rows(self, k: int, share_keys: bool = False) -> "DecoderState":
        """Each row ``k`` times in a row, ``(B, ...) -> (B k, ...)`` (beam search's ``K``
        hypotheses per image). With ``share_keys`` the keys stay ``(B, L, D)``, shared by each
        image's ``k`` rows (``group = k``), instead of ``k`` copies."""
        rows = torch.arange(self.h.shape[0], device=self.h.device).repeat_interleave(k)
        if not share_keys or k == 1 or self.group != 1:
            return self.select(rows)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.index_select(0, rows)

        return DecoderState(pick(self.h), pick(self.c), self.keys, pick(self.proj_keys),
                            pick(self.mask), self.step, group=k)

    def context(self, alpha: torch.Tensor) -> torch.Tensor:
        """``z = sum_i alpha_i a_i`` (Eq. 6): ``alpha`` ``(B, L)`` -> ``(B, D)``; with shared
        keys one batched matmul per image over its ``group`` rows."""
        if self.group == 1:
            return torch.bmm(alpha.unsqueeze(1), self.keys).squeeze(1)  # (B, D)
        n, L, D = self.keys.shape
        z = torch.bmm(alpha.view(n, self.group, L), self.keys)  # (B / group, group, D)
        return z.view(n * self.group, D)  # (B, D)


@dataclass
class DecoderOutput:
    """Teacher-forced unroll of ``T`` steps.

    The logits are stored as the rows that were computed: ``token_logits`` ``(M, V)`` at the
    flat positions ``positions`` ``(M,)`` (``b T + t``) of the ``(B, T)`` grid, so that a loss over
    the real tokens scores them without a ``(B, T, V)`` copy (``masked_nll(out.token_logits,
    targets, positions=out.positions)``). :attr:`logits` gives the ``(B, T, V)`` view.

    Attributes:
        token_logits: ``(M, V)`` unnormalised scores of the computed positions; ``M = B T`` (all
            positions, in order) when ``positions`` is ``None``.
        alphas: ``(B, T, L)`` attention weights.
        betas: ``(B, T)`` gate values (ones when there is no gate; mean over channels for a
            vector gate).
        positions: ``(M,)`` flat index ``b T + t`` of each row of ``token_logits``, or ``None``
            when every position was computed (``forward(skip_padding=False)``).
        locations: hard attention only: ``(B, T)`` the location ``s_t`` used at each step
            (the argmax where the expectation was used); ``None`` for soft attention.
        location_log_probs: hard attention in training mode only: ``(B, T)``
            ``log alpha_{t, s_t}`` of sampled locations, ``0`` at steps that used the
            expectation; ``None`` otherwise.
        sampled: with ``location_log_probs``: ``(B, T)`` bool, ``True`` where ``s_t`` was sampled.
    """

    token_logits: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor
    positions: torch.Tensor | None = None
    locations: torch.Tensor | None = None
    location_log_probs: torch.Tensor | None = None
    sampled: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """``(B, T, V)`` unnormalised scores of ``y_1 .. y_T``; 0 at positions not computed."""
        B, T = self.betas.shape
        V = self.token_logits.shape[-1]
        if self.positions is None:
            return self.token_logits.view(B, T, V)
        return self.token_logits.new_zeros(B * T, V).index_copy(
            0, self.positions, self.token_logits).view(B, T, V)  # (B, T, V)


class AttentionDecoder(nn.Module):
    r"""LSTM decoder with soft (or hard, or no) attention over annotation vectors.

    Initial state (Section 3.1.2: "two separate MLPs (init,c and init,h)" over the mean
    annotation; the mean is over the valid positions when there is a key mask)::

        u_0 = mean_i a_i                                          (B, D)
        u_k = dropout(relu(W_k u_{k-1} + b_k)),  k = 1 .. init_layers - 1    (D -> D, shared)
        h_0 = tanh(W_h u + b_h),   c_0 = tanh(W_c u + b_c)        (u = u_{init_layers - 1})

    ``init_layers = 1`` (the default) is one linear layer and ``tanh`` per state. Larger values
    follow the authors' code (arctic-captions ``capgen.py``, option ``n_layers_init``, 2 in their
    ``evaluate_coco.py``): the hidden layers are rectifier layers of width ``D``, shared by
    ``h_0`` and ``c_0`` (only the ``tanh`` heads are separate), each followed by the decoder's
    dropout (theirs with ``use_dropout``).

    For translation, ``init_summary="first_backward"`` gives Bahdanau et al.'s initial state
    (2015, Appendix A.2.2) instead of the mean: ``u_0 = <-h_1``, the backward half of the first
    annotation of a bidirectional :class:`~captioner.encoders.text.TextEncoder` (annotations
    ``[->h_j; <-h_j]``, so ``<-h_1`` is the backward recurrence's last state, which has read the
    whole sentence), giving ``s_0 = tanh(W_s <-h_1)`` as ``h_0`` and, for the LSTM's cell,
    ``c_0 = tanh(W_c <-h_1)``; ``u`` then has ``D / 2`` features. It needs the key mask (text
    annotations): an image grid is refused.

    Args:
        vocab_size: ``V``.
        encoder_dim: ``D``, size of an annotation vector.
        embed_dim: ``E`` (the paper's ``m``).
        hidden_dim: ``N`` (the paper's ``n``).
        attention: callable ``(query_dim N, key_dim D) -> Attention``; a class such as
            :class:`~captioner.attention.AdditiveAttention`, configured in YAML by
            ``class_path`` / ``init_args``.
        dropout: dropout on ``h_t`` before the output layer (and on the deep-output sum).
        gate: ``"scalar"`` (paper), ``"vector"`` (per-channel, popular ports) or ``"none"``.
        deep_output: use Eq. 7; ``False`` gives ``p(y_t) ~ exp(W h_t)``.
        deep_output_activation: ``"tanh"`` (authors' code) or ``"identity"`` (literal Eq. 7).
        init_from_mean: initialise ``h_0, c_0`` from the mean annotation (paper) or zeros.
        init_summary: what the initial-state MLPs read: ``"mean"`` (Xu et al.: the mean
            annotation, masked) or ``"first_backward"`` (Bahdanau et al.: ``<-h_1``, the
            second half of the first annotation; needs an even ``D``).
        init_layers: layers of each initial-state MLP: ``init_layers - 1`` shared ``D -> D``
            ReLU layers (with dropout) before the ``tanh`` heads ``f_init,h``, ``f_init,c``;
            1 (default) is one linear layer each, 2 the authors' COCO setting.
        pad_id: index of ``<pad>`` in the vocabulary (its embedding row stays zero).
        attention_mode: ``"soft"`` (Section 4.2) or ``"hard"`` (stochastic, Section 4.1).
        hard_expectation_prob: hard attention: probability of using the expected context
            instead of a sample in training (0.5 in the paper).
        hard_expectation_per: hard attention: draw that choice per image (``"sequence"``, the
            paper) or per ``"step"``.
        hard_test: hard attention in evaluation mode: ``"argmax"`` location or
            ``"expectation"``.

    Raises:
        ValueError: for ``NoAttention`` without ``init_from_mean`` (the image would never
            enter), or ``NoAttention`` with hard attention; for ``init_layers < 1``, or
            ``init_layers > 1`` without ``init_from_mean`` (the layers would be unused);
            for ``init_summary="first_backward"`` without ``init_from_mean`` or with an odd
            ``D``.
    """

    #: the unroll applies ``[W_z, U]`` in one matmul per step with one weight-gradient GEMM
    #: (:mod:`captioner.unrolled_linear`); ``False`` restores the per-step slices of the LSTM
    #: weights (same numerics; kept so that ``scripts/benchmark.py`` measures the gain).
    fused_recurrent: bool = True

    #: ``lstm.weight_ih`` in the autocast dtype inside :meth:`frozen_weights`, else ``None``
    #: (a plain attribute, not part of the state dict)
    _autocast_weight: torch.Tensor | None = None

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 512,
        hidden_dim: int = 512,
        attention: Callable[[int, int], Attention] = AdditiveAttention,
        dropout: float = 0.5,
        gate: Literal["scalar", "vector", "none"] = "scalar",
        deep_output: bool = True,
        deep_output_activation: Literal["tanh", "identity"] = "tanh",
        init_from_mean: bool = True,
        init_layers: int = 1,
        init_summary: Literal["mean", "first_backward"] = "mean",
        pad_id: int = 0,
        attention_mode: Literal["soft", "hard"] = "soft",
        hard_expectation_prob: float = 0.5,
        hard_expectation_per: Literal["sequence", "step"] = "sequence",
        hard_test: Literal["argmax", "expectation"] = "argmax",
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size, self.encoder_dim = vocab_size, encoder_dim
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim
        self.gate, self.deep_output = gate, deep_output
        self.deep_output_activation = deep_output_activation
        self.init_from_mean = init_from_mean
        if isinstance(init_layers, bool) or not isinstance(init_layers, int) or init_layers < 1:
            raise ValueError(f"init_layers must be an integer >= 1 (1: one linear layer per "
                             f"initial state), got {init_layers!r}")
        if init_layers > 1 and not init_from_mean:
            raise ValueError(f"init_layers={init_layers} needs init_from_mean=True: with zero "
                             "initial states the initial-state MLP is never used")
        self.init_layers = init_layers
        if init_summary not in ("mean", "first_backward"):
            raise ValueError(f"init_summary must be 'mean' or 'first_backward', got {init_summary!r}")
        if init_summary == "first_backward" and (not init_from_mean or encoder_dim % 2):
            raise ValueError("init_summary='first_backward' reads the backward half of a "
                             "bidirectional encoder's first annotation: it needs "
                             f"init_from_mean=True and an even encoder_dim, got {encoder_dim}")
        self.init_summary = init_summary
        summary_dim = encoder_dim // 2 if init_summary == "first_backward" else encoder_dim
        if attention_mode not in ("soft", "hard"):
            raise ValueError(f"attention_mode must be 'soft' or 'hard', got {attention_mode!r}")
        self.attention_mode = attention_mode

        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)  # E
        self.attention = attention(hidden_dim, encoder_dim)  # f_att
        self.use_context = getattr(self.attention, "provides_context", True)
        if not self.use_context and not init_from_mean:
            raise ValueError("NoAttention needs init_from_mean=True: without attention the image "
                             "enters the decoder only through the initial state")
        if not self.use_context and attention_mode == "hard":
            raise ValueError("hard attention needs an attention module, not NoAttention")
        context_dim = encoder_dim if self.use_context else 0  # no z_t without attention
        if gate != "none" and self.use_context:
            self.f_beta = nn.Linear(hidden_dim, 1 if gate == "scalar" else encoder_dim)
        # the init MLPs' shared hidden layers (none by default: the state dict keeps its keys),
        # W_k: D -> D (D/2 -> D/2 from the first backward state)
        self.init_hidden = nn.ModuleList(
            nn.Linear(summary_dim, summary_dim) for _ in range(init_layers - 1))
        self.init_h = nn.Linear(summary_dim, hidden_dim)  # f_init,h (Bahdanau's W_s)
        self.init_c = nn.Linear(summary_dim, hidden_dim)  # f_init,c
        self.lstm = nn.LSTMCell(embed_dim + context_dim, hidden_dim)  # T_{D+m+n,n}
        self.dropout = nn.Dropout(dropout)
        if deep_output:
            self.L_h = nn.Linear(hidden_dim, embed_dim)
            if self.use_context:
                self.L_z = nn.Linear(encoder_dim, embed_dim, bias=False)
            self.L_o = nn.Linear(embed_dim, vocab_size)
        else:
            self.L_o = nn.Linear(hidden_dim, vocab_size)
        self.hard: HardAttention | None = None
        if attention_mode == "hard":
            self.hard = HardAttention(hard_expectation_prob, hard_expectation_per, hard_test)

    # ------------------------------------------------------------------ state
    def use_grid(self, grid_size: tuple[int, int]) -> None:
        """Give an attention that reads the grid's layout (one with a ``grid_size``:
        :class:`~captioner.attention.LocalAttention2d`) the encoder's ``(H, W)`` when it has none,
        and refuse another: ``L = H W`` alone cannot tell a 4 x 9 grid from a 6 x 6 one, or
        ``(3, 5)`` from ``(5, 3)``, and a window laid on the wrong grid is scattered cells.

        An attention with a fixed number of positions (``num_positions``:
        :class:`~captioner.attention.LocationAttention`) is checked against ``H W`` here, when
        the model is built, rather than at its first step.

        Raises:
            ValueError: the attention was built for another grid.
        """
        positions = getattr(self.attention, "num_positions", None)
        if positions is not None and positions != grid_size[0] * grid_size[1]:
            raise ValueError(f"{type(self.attention).__name__}(num_positions={positions}) but the "
                             f"encoder's grid is {grid_size[0]} x {grid_size[1]} = "
                             f"{grid_size[0] * grid_size[1]} positions: set num_positions to "
                             f"{grid_size[0] * grid_size[1]}")
        attention_grid = getattr(self.attention, "grid_size", False)
        if attention_grid is False:
            return  # the attention does not read the layout
        if attention_grid is None:
            self.attention.grid_size = tuple(grid_size)
        elif tuple(attention_grid) != tuple(grid_size):
            raise ValueError(f"{type(self.attention).__name__}(grid_size={tuple(attention_grid)}) "
                             f"but the encoder's grid is {tuple(grid_size)}: give the attention "
                             "the encoder's grid_size, or none")

    def init_state(self, annotations: torch.Tensor, mask: torch.Tensor | None = None) -> DecoderState:
        """Initial state from the annotations.

        Args:
            annotations: ``(B, L, D)``.
            mask: ``(B, L)`` bool, ``True`` where valid (text); ``None`` for image grids.
        """
        if self.init_summary == "first_backward":  # right padding: position 0 is a real word
            if mask is None:
                raise ValueError("init_summary='first_backward' reads a bidirectional text "
                                 "encoder's annotations (given with their key mask); an image "
                                 "grid has no backward state: use 'mean'")
            summary = annotations[:, 0, self.encoder_dim // 2:]  # (B, D / 2): <-h_1
        elif mask is None:
            summary = annotations.mean(dim=1)  # (B, D)
        else:
            m = mask.unsqueeze(-1).to(annotations.dtype)  # (B, L, 1)
            summary = (annotations * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        if self.init_from_mean:
            u = summary  # (B, D), or (B, D / 2)
            for layer in self.init_hidden:  # the authors' n_layers_init - 1 shared layers
                u = self.dropout(torch.relu(layer(u)))  # (B, D), or (B, D / 2)
            h, c = torch.tanh(self.init_h(u)), torch.tanh(self.init_c(u))  # (B, N)
        else:
            h = c = summary.new_zeros(summary.shape[0], self.hidden_dim)  # (B, N)
        keys, dtype = annotations, autocast_dtype(annotations)
        records_grad = torch.is_grad_enabled() and annotations.requires_grad
        if dtype is not None and not records_grad and self._keys_feed_context_only():
            # every step's context would cast the (B, L, D) keys to the autocast dtype again.
            # Not when the annotations get a gradient (a trained encoder): the steps' gradients
            # would then be summed in the autocast dtype, instead of in float32 through the
            # per-step casts (relative error 7.6e-3 against 3.6e-3 at T = 50 in bf16)
            keys = annotations.to(dtype)  # (B, L, D), cast once
        return DecoderState(h, c, keys, self.attention.project_keys(annotations), mask)

    def _keys_feed_context_only(self) -> bool:
        """Whether the annotations, once projected, are read only by the context ``z_t``
        (soft attention whose module scores from the projected keys alone)."""
        return (self.use_context and self.hard is None
                and not getattr(self.attention, "reads_keys", True))

    def expand_beams(self, state: DecoderState, k: int) -> DecoderState:
        """The state of ``k`` hypotheses per image, image-major (what beam search starts from).

        The annotations are shared by an image's hypotheses (not copied ``k`` times: 257 MB at
        ``B = 32``, ``K = 5`` and a 14 x 14 x 2048 grid) when only the context reads them: soft
        attention whose module scores from the projected keys alone
        (:attr:`captioner.attention.Attention.reads_keys` false, e.g. the paper's additive
        attention). Otherwise every row gets its own copy."""
        share = k > 1 and state.proj_keys is not None and self._keys_feed_context_only()
        return state.repeat_rows(k, share_keys=share)

    # ------------------------------------------------------------------ one step
    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """A block in which the weights do not change (one search: :mod:`captioner.search`
        runs in one). Under autocast every trainable weight is cast to the autocast dtype once
        for the whole block instead of at every step: autocast's cache holds casts of leaf
        parameters only, and Lightning's ``bf16-mixed`` switches it off, so each step would
        cast the output layer (``V x E``), ``L_z`` and the views of ``lstm.weight_ih``
        (4N x (E + D), 2048 x 2560 at COCO scale) again. (``lstm.weight_ih`` is cast here
        whatever its ``requires_grad``; the other weights through autocast's cache, which skips
        parameters with ``requires_grad`` off: those are cast at every step, as without the
        block.) Outside autocast, or for a float64 decoder (which autocast leaves alone), it
        does nothing.

        The casts are dropped when the block ends (and autocast's cache cleared), so a weight
        updated afterwards, in place or by a fused optimiser that does not bump the tensor's
        version, is cast afresh by the next block.
        """
        device, dtype = self.lstm.weight_ih.device.type, autocast_dtype(self.lstm.weight_ih)
        if dtype is None:
            yield
            return
        self._autocast_weight = self.lstm.weight_ih.to(dtype)  # (4N, E + D)
        try:
            with torch.autocast(device, dtype=dtype, cache_enabled=True):
                yield
        finally:
            self._autocast_weight = None
            torch.clear_autocast_cache()

    def _input_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_e (4N, E), W_z (4N, D))``: the word and context parts of ``lstm.weight_ih``
        (views of its cast inside :meth:`frozen_weights` under autocast)."""
        w = self.lstm.weight_ih  # (4N, E + D)
        cast = self._autocast_weight
        if cast is not None and cast.dtype == autocast_dtype(w):
            w = cast
        return w[:, : self.embed_dim], w[:, self.embed_dim :]

    def _input_gates_from_words(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding part of the LSTM input transform ``W_e E y + b`` (any leading dims)."""
        return F.linear(emb, self._input_weights()[0], self.lstm.bias_ih + self.lstm.bias_hh)

    def _attend(self, state: DecoderState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context ``z_t`` ``(B, D)``, ``alpha_t`` ``(B, L)`` and gate ``beta_t`` ``(B, 1|D)``
        (hard attention: the test-time location)."""
        return self._attend_select(state)[:3]

    def _attend_select(self, state: DecoderState, sample: bool = False,
                       use_expectation: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, HardSelection | None]:
        """:meth:`_attend` plus, for hard attention, the selection (``sample``: draw ``s_t``,
        with ``use_expectation`` ``(B,)`` rows using the expectation). ``z_t`` is ``(B, 0)``
        without attention."""
        alpha = self.attention(state.h, state.keys, state.proj_keys, state.mask,
                               step=state.step)  # (B, L)
        selection = None
        if not self.use_context:
            z = state.h.new_zeros(state.h.shape[0], 0)  # (B, 0): no context (Show and Tell)
        elif self.hard is not None:
            selection = self.hard(alpha, state.keys, sample, use_expectation)
            z = selection.context  # (B, D)
        else:
            z = state.context(alpha)  # (B, D)
        if self.gate == "none" or not self.use_context:
            beta = z.new_ones(z.shape[0], 1)
        else:
            beta = torch.sigmoid(self.f_beta(state.h))  # (B, 1) or (B, D)
            z = beta * z
        return z, alpha, beta, selection

    def _recurrent_weight(self) -> torch.Tensor:
        """``[W_z, U]`` ``(4N, D + N)``, contiguous: the part of the LSTM transform applied to
        ``[z_t; h_{t-1}]`` (``W_z`` is ``lstm.weight_ih[:, E:]``, ``U`` is ``lstm.weight_hh``)."""
        return torch.cat([self.lstm.weight_ih[:, self.embed_dim :], self.lstm.weight_hh], dim=1)

    def _lstm(self, word_gates: torch.Tensor, z: torch.Tensor, state: DecoderState,
              recurrent: UnrolledLinear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM cell (Eqs. 1-3) given the precomputed word part of the input transform.

        ``recurrent`` (the unroll) applies ``[W_z, U]`` to ``[z_t; h_{t-1}]`` in one matmul
        (:mod:`captioner.unrolled_linear`); without it (one step, search) the two parts are
        applied to views of the LSTM's weights, which avoids copying them at every step.
        """
        if recurrent is not None:
            gates = word_gates + recurrent(torch.cat([z, state.h], dim=1))  # (B, 4N)
        else:
            w_z = self._input_weights()[1]  # (4N, D)
            gates = (word_gates + F.linear(z, w_z)
                     + F.linear(state.h, self.lstm.weight_hh))  # (B, 4N)
        i, f, g, o = gates.chunk(4, dim=1)  # torch.nn.LSTMCell gate order
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def output_logits(self, emb: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Eq. 7 over any leading dims: ``(..., E), (..., N), (..., D) -> (..., V)``."""
        if not self.deep_output:
            return self.L_o(self.dropout(h))
        out = emb + self.L_h(self.dropout(h))  # (..., E)
        if self.use_context:
            out = out + self.L_z(z)
        if self.deep_output_activation == "tanh":
            out = torch.tanh(out)
        return self.L_o(self.dropout(out))

    def step(self, prev_tokens: torch.Tensor, state: DecoderState
             ) -> tuple[torch.Tensor, DecoderState, torch.Tensor, torch.Tensor]:
        """One decoding step (used by search).

        Args:
            prev_tokens: ``(B,)`` previous words ``y_{t-1}``.
            state: the state after step ``t-1``.

        Hard attention never samples here (search is deterministic): the location follows
        ``hard_test`` and the ``alpha`` returned is the weights used (one-hot for ``"argmax"``).

        Returns:
            ``(log_probs (B, V), new state, alpha (B, L), beta (B,))``.
        """
        emb = self.embedding(prev_tokens)  # (B, E)
        z, alpha, beta, selection = self._attend_select(state)
        h, c = self._lstm(self._input_gates_from_words(emb), z, state)
        new_state = replace(state, h=h, c=c, step=state.step + 1)
        logits = self.output_logits(emb, h, z)  # (B, V)
        if selection is not None:
            alpha = selection.weights
        return torch.log_softmax(at_least_float32(logits), dim=-1), new_state, alpha, beta.mean(-1)

    # ------------------------------------------------------------------ unroll
    def forward(self, annotations: torch.Tensor, captions: torch.Tensor,
                mask: torch.Tensor | None = None, skip_padding: bool = False) -> DecoderOutput:
        """Teacher-forced unroll over a batch of captions.

        Args:
            annotations: ``(B, L, D)``.
            captions: ``(B, T + 1)`` token ids ``<start> w_1 .. w_n <end> <pad>..``; step ``t``
                reads ``captions[:, t]`` and predicts ``captions[:, t + 1]``.
            mask: ``(B, L)`` bool key mask, or ``None``.
            skip_padding: compute each caption's steps only up to its last non-padding target
                (what a loss over the real tokens needs; training uses it). The batch is
                ordered by caption length inside the unroll, so the captions still running at
                step ``t`` are a prefix of it; the recurrence then runs on views of that prefix,
                which shrink only when a caption ends (no gathering at every step), and the
                output layer runs on the computed positions only. The real positions get the
                full unroll's values up to float rounding (in training mode the dropout masks
                are drawn in another layout); the skipped positions get ``logits``, ``alphas``
                and ``betas`` 0. ``token_logits`` then holds the computed rows only, with
                their ``positions``, for a loss that scores them directly.
                ``False`` (the default) computes every position, padding included.

        Hard attention samples the locations in training mode (``self.training``) and applies
        ``hard_test`` in evaluation mode; ``alphas`` are always the distributions ``alpha_t``
        and ``locations`` the ``s_t`` used.

        Returns:
            :class:`DecoderOutput` with ``T`` steps.
        """
        if captions.dim() != 2 or captions.shape[1] < 2:
            raise ValueError("captions must be (B, T + 1) token ids with T >= 1 steps "
                             f"(<start> and at least one target), got shape "
                             f"{tuple(captions.shape)}")
        inputs = captions[:, :-1]  # (B, T)
        B, T = inputs.shape
        emb = self.embedding(inputs)  # (B, T, E)
        word_gates = self._input_gates_from_words(emb)  # (B, T, 4N): one matmul for all steps
        sample = self.hard is not None and self.training
        per_sequence = sample and self.hard.expectation_per == "sequence"
        use_expectation = (self.hard.draw_expectation(B, annotations.device) if per_sequence
                           else None)  # (B,): the paper's per-image choice
        alive, order = [B] * T, None  # rows computed at each step; the batch order used
        if skip_padding:
            alive, order = self._rows_alive(captions[:, 1:])
            if order is not None:  # longest captions first
                def first_longest(x: torch.Tensor | None) -> torch.Tensor | None:
                    return None if x is None else x.index_select(0, order)

                annotations, word_gates = first_longest(annotations), first_longest(word_gates)
                mask, use_expectation = first_longest(mask), first_longest(use_expectation)
        state = self.init_state(annotations, mask)
        recurrent = UnrolledLinear(self._recurrent_weight()) if self.fused_recurrent else None
        hs, zs, alphas, betas, selections = [], [], [], [], []
        for t, n in enumerate(alive):
            if n < state.h.shape[0]:
                state = state.head(n)  # the captions still running: a prefix, as views
                use_expectation = None if use_expectation is None else use_expectation[:n]
            z, alpha, beta, selection = self._attend_select(state, sample, use_expectation)
            h, c = self._lstm(word_gates[:n, t], z, state, recurrent)
            state = DecoderState(h, c, state.keys, state.proj_keys, state.mask, t + 1)
            hs.append(h)
            zs.append(z)
            alphas.append(alpha)
            betas.append(beta.mean(-1))
            selections.append(selection)
        inverse = None if order is None else torch.argsort(order)

        def stacked(xs: list[torch.Tensor]) -> torch.Tensor:  # (n_t, ...) per step -> (B, T, ...)
            return _stack_steps(xs, B, T, inverse)

        if skip_padding:  # the output layer at the computed positions only
            logits, positions = self._computed_logits(emb, hs, zs, order)  # (M, V), (M,)
        else:
            h_all, z_all = stacked(hs), stacked(zs)  # (B, T, N), (B, T, D)
            logits = self.output_logits(emb, h_all, z_all).flatten(0, 1)  # (B T, V): one matmul
            positions = None
        out = DecoderOutput(logits, stacked(alphas), stacked(betas), positions)
        if self.hard is not None:
            out.locations = stacked([s.locations for s in selections])  # (B, T)
            if sample:
                out.location_log_probs = stacked([s.log_probs for s in selections])
                out.sampled = stacked([s.sampled for s in selections])  # (B, T)
        return out

    def _computed_logits(self, emb: torch.Tensor, hs: list[torch.Tensor], zs: list[torch.Tensor],
                         order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 at the positions the unroll computed, in one matmul.

        Args:
            emb: ``(B, T, E)`` embedded inputs, in the caller's order.
            hs, zs: per step ``t``, ``h_t`` ``(n_t, N)`` and ``z_t`` ``(n_t, D)`` of the first
                ``n_t`` captions of the batch reordered by ``order`` (``None``: not reordered).

        Returns:
            ``(M, V)`` logits, ``M = sum_t n_t``, and their flat positions ``b T + t`` ``(M,)``.
        """
        B, T, _ = emb.shape
        rows = torch.arange(B, device=emb.device) if order is None else order  # (B,)
        positions = torch.cat([rows[: h.shape[0]] * T + t for t, h in enumerate(hs)])  # (M,)
        flat = emb.reshape(B * T, -1)  # (B T, E)
        logits = self.output_logits(flat.index_select(0, positions), torch.cat(hs),
                                    torch.cat(zs))  # (M, V)
        return logits, positions

    def _rows_alive(self, targets: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The step schedule of ``forward(skip_padding=True)``.

        Args:
            targets: ``(B, T)`` ids; a caption's steps run up to its last non-padding target
                (at least one step).

        Returns:
            ``alive``: for each step ``t`` that some caption needs, the number of captions that
            need it (non-increasing); ``order`` ``(B,)``: the batch sorted by decreasing length
            (stable), or ``None`` when it already is.
        """
        B, T = targets.shape
        t = torch.arange(T, device=targets.device)  # (T,)
        real = targets != self.embedding.padding_idx  # (B, T)
        steps = torch.where(real, t + 1, 0).amax(1).clamp_min(1)  # (B,) steps each caption needs
        sorted_steps, order = torch.sort(steps, descending=True, stable=True)
        alive = (sorted_steps.unsqueeze(0) > t.unsqueeze(1)).sum(1)  # (T,)
        alive = [n for n in alive.tolist() if n > 0]
        in_order = bool((order == torch.arange(B, device=order.device)).all())
        return alive, None if in_order else order


def _stack_steps(xs: list[torch.Tensor], B: int, T: int,
                 inverse: torch.Tensor | None) -> torch.Tensor:
    """Stack per-step tensors ``(n_t, ...)`` (``n_t <= B``, the first ``n_t`` rows of the sorted
    batch) into ``(B, T, ...)``: zeros where a row or a step was not computed, rows put back in
    the caller's order by ``inverse`` (``None``: already in order)."""
    rows = [x if x.shape[0] == B else torch.cat([x, x.new_zeros(B - x.shape[0], *x.shape[1:])])
            for x in xs]
    out = torch.stack(rows, 1)  # (B, T', ...)
    if out.shape[1] < T:
        out = torch.cat([out, out.new_zeros(B, T - out.shape[1], *out.shape[2:])], 1)
    return out if inverse is None else out.index_select(0, inverse)
