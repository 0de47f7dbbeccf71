#!/usr/bin/env python
r"""Throughput benchmark of captioner on fixed work (issue 7), as one JSON object.

The work is fixed so that figures compare across implementations and machines:

* the decoder at COCO scale on pre-computed features: ``B = 32`` captions, a ``14 x 14`` grid of
  ``D = 2048`` annotations, ``E = A = N = 512``, ``V = 9490``, dropout 0.5, doubly stochastic
  regularisation (``lambda = 1``), Adam; caption lengths (tokens, ``<start>``/``<end>``
  included) drawn with a fixed seed from :data:`LENGTH_DISTRIBUTION`;
* decoding 32 images for exactly 20 steps (``min_length = max_length = 20``, so random weights
  decode as long as trained ones): beam search ``K = 3``, ``K = 5`` and greedy;
* the frozen CNN forward (no grad, batch 32): ResNet-101 at 256 x 256, EfficientNet-Lite0 at
  224 x 224;
* image loading through the real pipeline (:class:`captioner.data.datasets.ImageEvalDataset`
  and a DataLoader with the data module's default workers) on ``../shared/data/flickr8k_subset``
  (relative to the repository root) when present, else on generated JPEGs.

Every figure is a median over repeats after warm-up. Implementations compared in one run
(``--baseline``, ``--ablations``) are measured *interleaved* (round robin, one repeat of each in
turn), so that load from other processes on a shared machine hits them alike and their ratios
stay meaningful.

* ``--baseline`` adds a faithful re-implementation of the widely used tutorial decoder
  (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py`` / ``train.py`` /
  ``caption.py``): the encoder output is re-projected by the attention at every step, the batch
  is sorted by length and shrunk step by step, and beam search decodes one image at a time
  (greedy = its beam search with ``k = 1``). It lives here, as a reference, not in the library.
* ``--ablations`` measures the library with one of its optimisations removed (the "before" of
  each): keys re-projected at every step, the recurrent matmul through per-step weight slices
  (before :mod:`captioner.unrolled_linear`), the attention hidden layer through ``tanh`` instead
  of ``2 sigmoid(2x) - 1``, the unroll computing the padding's steps (``skip_padding`` off),
  the loss scoring the ``(B, T, V)`` grid instead of the computed rows (``grid_loss``),
  ``torch.optim.Adam``'s per-tensor loop instead of its fused kernel, search forming the
  attention hidden layer of all hypotheses at once instead of a few rows at a time, beam
  search copying an image's annotations for each hypothesis instead of sharing them
  (``copied_beam_keys``), search on one image at a time; and one opt-in option measured the
  same way, ``compiled_score`` (``AdditiveAttention(compile_search=True)``: the search's
  energies from one ``torch.compile``\ d loop; its ``ours_speedup`` below 1 is its gain).
* ``--ab ABLATION`` measures training of ours against one training ablation alone, interleaved
  in alternating order, and reports the ratio of every round: for effects of a few per cent,
  which the shared machine's noise hides in a three-repeat run, give it many ``--repeats``.
* ``--bf16`` adds bf16 autocast throughput (CPU, or CUDA with ``--device cuda``) of training,
  beam search and greedy decoding (and of the encoders), each measured in the same rounds as fp32, with the loss parity against
  fp32 on the same batch (dropout off), and search under Lightning's ``bf16-mixed`` autocast
  (cache off) with and without ``AttentionDecoder.frozen_weights``.

Usage::

    python scripts/benchmark.py --quick --baseline --json bench.json
    python scripts/benchmark.py --baseline --ablations --bf16 --json bench.json   # full, minutes
    python scripts/benchmark.py --ab grid_loss --repeats 20 --skip decoders,encode,load
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.attention import AdditiveAttention
from captioner.decoder import AttentionDecoder, DecoderOutput, DecoderState
from captioner.lit.optim import adam
from captioner.losses import doubly_stochastic_penalty, masked_nll
from captioner.search import beam_search, greedy_search

REPO = Path(__file__).resolve().parents[1]
FLICKR8K_SUBSET = REPO / ".." / "shared" / "data" / "flickr8k_subset"

#: Caption length in tokens (``<start>`` and ``<end>`` included) -> probability (issue 7).
LENGTH_DISTRIBUTION: dict[int, float] = {
    10: 0.07, 11: 0.22, 12: 0.23, 13: 0.16, 14: 0.10, 15: 0.07, 16: 0.05, 17: 0.035,
    18: 0.025, 19: 0.015, 20: 0.01, 21: 0.008, 22: 0.007,
}
PAD_ID, START_ID, END_ID = 0, 1, 2  # captioner.data.vocabulary.SPECIALS order
SEED = 0
#: the decoding keys (``{key}_fixed20_images_per_s``) and their beam sizes (1: greedy)
DECODE_KEYS = {"beam_k3": 3, "beam_k5": 5, "greedy_b32": 1}


@dataclass(frozen=True)
class Sizes:
    """The fixed work (``B, H, D, E, A, N, V``) and how long to measure it."""

    batch: int = 32  # B, captions per training step and images per decoding call
    grid: int = 14  # H = W, L = H * W annotations
    encoder_dim: int = 2048  # D
    embed_dim: int = 512  # E
    attention_dim: int = 512  # A
    hidden_dim: int = 512  # N
    vocab_size: int = 9490  # V
    steps: int = 20  # decoding steps (min = max length)
    train_batches: int = 3  # distinct caption batches in one training "pass"
    warmup: int = 1
    repeats: int = 3
    baseline_images: int = 8  # images per call of the per-image tutorial search (its cost
    #                            per image does not depend on the number of images)
    encode_batch: int = 32
    encode_repeats: int = 3
    resnet_size: int = 256
    efficientnet_size: int = 224
    load_images: int = 256
    load_repeats: int = 3
    matmul_size: int = 1024
    epoch_images: int | None = None  # --cached-epochs: images per split (None: all)
    epoch_image_size: int = 224


FULL = Sizes(train_batches=3, warmup=1, repeats=3, baseline_images=8)
QUICK = Sizes(train_batches=1, warmup=1, repeats=2, baseline_images=2, encode_repeats=1,
              load_images=64, load_repeats=1, epoch_images=64)
TINY = Sizes(batch=3, grid=3, encoder_dim=16, embed_dim=8, attention_dim=8, hidden_dim=12,
             vocab_size=50, train_batches=2, warmup=1, repeats=2, baseline_images=2,
             encode_batch=2, encode_repeats=1, resnet_size=32, efficientnet_size=32,
             load_images=4, load_repeats=1, matmul_size=64, epoch_images=6,
             epoch_image_size=32)


# ============================================================================ timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(tasks: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                device: torch.device, alternate: bool = True) -> dict[str, list[float]]:
    """Seconds of each repeat of each task, the tasks run round robin after ``warmup`` rounds
    (``alternate``: every other round in reverse order, so that no task always runs first or
    last; the default since ``--ab`` was added, earlier runs used a fixed order)."""
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(repeats):
        names = list(tasks) if not (alternate and r % 2) else list(reversed(tasks))
        for name in names:
            fn = tasks[name]
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def rate(items: int, seconds: list[float]) -> float:
    """Items per second of the median repeat."""
    return items / statistics.median(seconds)


def bf16_autocast(device: torch.device, enabled: bool = True,
                  cache_enabled: bool = True) -> torch.autocast:
    """bf16 autocast on ``device``'s type (``cpu`` or ``cuda``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled,
                          cache_enabled=cache_enabled)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int, device: torch.device, dtype: torch.dtype = torch.float32,
                  repeats: int = 10) -> float:
    """Measured GFLOP/s of an ``n x n`` by ``n x n`` matmul (median of ``repeats``)."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    times = interleaved({"mm": lambda: a @ b}, warmup=2, repeats=repeats, device=device)["mm"]
    return 2 * n**3 / statistics.median(times) / 1e9


def cpu_model() -> str:
    """``lscpu``'s model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ============================================================================ the fixed work
def sample_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` caption lengths (tokens incl. ``<start>``/``<end>``) from the fixed distribution."""
    values = np.array(list(LENGTH_DISTRIBUTION))
    probs = np.array(list(LENGTH_DISTRIBUTION.values()))
    return rng.choice(values, size=n, p=probs / probs.sum())


def make_captions(lengths: np.ndarray, vocab_size: int, rng: np.random.Generator,
                  pad_to: int | None = None) -> torch.Tensor:
    """``(B, T + 1)`` ids ``<start> w .. w <end> <pad>..`` with random words (ids >= 4)."""
    T1 = int(pad_to or lengths.max())
    captions = torch.full((len(lengths), T1), PAD_ID, dtype=torch.long)
    for b, n in enumerate(lengths):
        captions[b, 0] = START_ID
        captions[b, 1 : n - 1] = torch.from_numpy(rng.integers(4, vocab_size, n - 2))
        captions[b, n - 1] = END_ID
    return captions


@dataclass
class Work:
    """Annotations ``(B, L, D)`` and a list of caption batches ``(B, T + 1)`` with lengths."""

    annotations: torch.Tensor
    captions: list[torch.Tensor]
    lengths: list[torch.Tensor]


def make_work(s: Sizes, device: torch.device) -> Work:
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    annotations = torch.randn(s.batch, s.grid * s.grid, s.encoder_dim, generator=gen).relu()
    lengths = [sample_lengths(s.batch, rng) for _ in range(s.train_batches)]
    captions = [make_captions(n, s.vocab_size, rng).to(device) for n in lengths]
    return Work(annotations.to(device), captions,
                [torch.as_tensor(n, device=device) for n in lengths])


def additive_attention(attention_dim: int, tanh_via_sigmoid: bool = True,
                       **kwargs: Any) -> Callable[[int, int], AdditiveAttention]:
    """The decoder's ``attention`` factory: the library's additive attention of size ``A``."""
    return functools.partial(AdditiveAttention, attention_dim=attention_dim,
                             tanh_via_sigmoid=tanh_via_sigmoid, **kwargs)


def build_decoder(s: Sizes) -> AttentionDecoder:
    """The library decoder at the benchmark's sizes (the paper's soft attention, scalar gate)."""
    torch.manual_seed(SEED)
    return AttentionDecoder(
        s.vocab_size, s.encoder_dim, embed_dim=s.embed_dim, hidden_dim=s.hidden_dim,
        attention=additive_attention(s.attention_dim),
        dropout=0.5)


def library_loss(decoder: AttentionDecoder, annotations: torch.Tensor,
                 captions: torch.Tensor) -> torch.Tensor:
    """The training objective of :class:`captioner.lit.captioning.CaptioningModule` (Eq. 14),
    computed as it does (``skip_padding``: the steps after each caption's end are not run, and
    the loss scores the computed rows where they are)."""
    out = decoder(annotations, captions, skip_padding=True)
    targets = captions[:, 1:]  # (B, T)
    nll = masked_nll(out.token_logits, targets, PAD_ID, positions=out.positions)  # (M, V) rows
    return nll + doubly_stochastic_penalty(out.alphas, targets != PAD_ID)


def library_adam(params: Iterable[nn.Parameter], fused: bool = True) -> torch.optim.Adam:
    """Adam (lr 4e-4) as the library's training modules build it (:mod:`captioner.lit.optim`)."""
    return adam(params, lr=4e-4, fused=fused)


def train_pass(decoder: nn.Module, optimizer: torch.optim.Optimizer, work: Work,
               loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                                 torch.Tensor],
               autocast: bool = False) -> None:
    """One optimiser step (forward + loss + backward + Adam) per caption batch of ``work``."""
    decoder.train()
    for captions, lengths in zip(work.captions, work.lengths):
        with bf16_autocast(work.annotations.device, enabled=autocast):
            loss = loss_fn(decoder, work.annotations, captions, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def ours_loss(decoder, annotations, captions, lengths) -> torch.Tensor:
    return library_loss(decoder, annotations, captions)


def decode_library(decoder: AttentionDecoder, annotations: torch.Tensor, beam: int,
                   steps: int) -> torch.Tensor:
    """Tokens ``(B, steps)`` from :mod:`captioner.search` with ``min = max length = steps``."""
    decoder.eval()
    kw = dict(start_id=START_ID, end_id=END_ID, pad_id=PAD_ID, max_length=steps,
              min_length=steps)
    if beam == 1:
        return greedy_search(decoder, annotations, **kw).tokens
    return beam_search(decoder, annotations, beam_size=beam, **kw).tokens


# ============================================================================ tutorial baseline
class TutorialAttention(nn.Module):
    """``models.Attention`` of the tutorial: the encoder output is projected on every call."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out: torch.Tensor, decoder_hidden: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        att1 = self.encoder_att(encoder_out)  # (B, L, A): recomputed at every step
        att2 = self.decoder_att(decoder_hidden)  # (B, A)
        att = self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2)  # (B, L)
        alpha = self.softmax(att)  # (B, L)
        context = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (B, D)
        return context, alpha


class TutorialDecoder(nn.Module):
    """``models.DecoderWithAttention`` of the tutorial (vector gate, single output layer)."""

    def __init__(self, attention_dim: int, embed_dim: int, decoder_dim: int, vocab_size: int,
                 encoder_dim: int = 2048, dropout: float = 0.5) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.attention = TutorialAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean_encoder_out = encoder_out.mean(dim=1)
        return self.init_h(mean_encoder_out), self.init_c(mean_encoder_out)

    def forward(self, encoder_out: torch.Tensor, encoded_captions: torch.Tensor,
                caption_lengths: torch.Tensor):
        batch_size = encoder_out.size(0)
        encoder_dim = encoder_out.size(-1)
        encoder_out = encoder_out.view(batch_size, -1, encoder_dim)
        num_pixels = encoder_out.size(1)
        caption_lengths, sort_ind = caption_lengths.sort(dim=0, descending=True)
        encoder_out = encoder_out[sort_ind]
        encoded_captions = encoded_captions[sort_ind]
        embeddings = self.embedding(encoded_captions)
        h, c = self.init_hidden_state(encoder_out)
        decode_lengths = (caption_lengths - 1).tolist()
        predictions = torch.zeros(batch_size, max(decode_lengths), self.vocab_size,
                                  device=encoder_out.device)
        alphas = torch.zeros(batch_size, max(decode_lengths), num_pixels,
                             device=encoder_out.device)
        for t in range(max(decode_lengths)):
            batch_size_t = sum([n > t for n in decode_lengths])
            awe, alpha = self.attention(encoder_out[:batch_size_t], h[:batch_size_t])
            gate = self.sigmoid(self.f_beta(h[:batch_size_t]))
            awe = gate * awe
            h, c = self.decode_step(
                torch.cat([embeddings[:batch_size_t, t, :], awe], dim=1),
                (h[:batch_size_t], c[:batch_size_t]))
            preds = self.fc(self.dropout(h))
            predictions[:batch_size_t, t, :] = preds
            alphas[:batch_size_t, t, :] = alpha
        return predictions, encoded_captions, decode_lengths, alphas, sort_ind


def tutorial_loss(decoder: TutorialDecoder, annotations: torch.Tensor, captions: torch.Tensor,
                  lengths: torch.Tensor, alpha_c: float = 1.0) -> torch.Tensor:
    """``train.py``: packed cross-entropy plus ``alpha_c * ((1 - sum_t alpha) ** 2).mean()``.

    The tutorial's captions are padded to 52 tokens; its loop still stops at the longest.
    """
    padded = F.pad(captions, (0, max(0, 52 - captions.shape[1])), value=PAD_ID)
    scores, caps_sorted, decode_lengths, alphas, _ = decoder(annotations, padded, lengths)
    targets = caps_sorted[:, 1:]
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets)
    return loss + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()


@torch.no_grad()
def tutorial_beam_search(decoder: TutorialDecoder, encoder_out: torch.Tensor, beam_size: int,
                         steps: int) -> list[int]:
    """``caption.caption_image_beam_search`` for one image ``(1, L, D)``, with ``<end>`` banned
    before ``steps`` tokens and the search stopped after ``steps`` (the fixed-length work)."""
    k = beam_size
    vocab_size = decoder.vocab_size
    num_pixels, encoder_dim = encoder_out.shape[1:]
    encoder_out = encoder_out.expand(k, num_pixels, encoder_dim)
    k_prev_words = torch.full((k, 1), START_ID, dtype=torch.long, device=encoder_out.device)
    seqs = k_prev_words
    top_k_scores = torch.zeros(k, 1, device=encoder_out.device)
    seqs_alpha = torch.ones(k, 1, num_pixels, device=encoder_out.device)
    complete_seqs, complete_seqs_scores = [], []
    step = 1
    h, c = decoder.init_hidden_state(encoder_out)
    while True:
        embeddings = decoder.embedding(k_prev_words).squeeze(1)
        awe, alpha = decoder.attention(encoder_out, h)
        gate = decoder.sigmoid(decoder.f_beta(h))
        awe = gate * awe
        h, c = decoder.decode_step(torch.cat([embeddings, awe], dim=1), (h, c))
        scores = F.log_softmax(decoder.fc(h), dim=1)
        if step < steps:  # fixed-length work: no <end> before the last step
            scores[:, END_ID] = float("-inf")
        scores = top_k_scores.expand_as(scores) + scores
        if step == 1:
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
        prev_word_inds = torch.div(top_k_words, vocab_size, rounding_mode="floor")
        next_word_inds = top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
        seqs_alpha = torch.cat([seqs_alpha[prev_word_inds], alpha[prev_word_inds].unsqueeze(1)],
                               dim=1)
        incomplete_inds = [i for i, w in enumerate(next_word_inds) if w != END_ID]
        complete_inds = list(set(range(len(next_word_inds))) - set(incomplete_inds))
        if step >= steps:  # the last step: every beam is complete
            complete_inds, incomplete_inds = list(range(len(next_word_inds))), []
        if len(complete_inds) > 0:
            complete_seqs.extend(seqs[complete_inds].tolist())
            complete_seqs_scores.extend(top_k_scores[complete_inds].tolist())
        k -= len(complete_inds)
        if k == 0:
            break
        seqs = seqs[incomplete_inds]
        seqs_alpha = seqs_alpha[incomplete_inds]
        h = h[prev_word_inds[incomplete_inds]]
        c = c[prev_word_inds[incomplete_inds]]
        encoder_out = encoder_out[prev_word_inds[incomplete_inds]]
        top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete_inds].unsqueeze(1)
        step += 1
    best = complete_seqs_scores.index(max(complete_seqs_scores))
    return complete_seqs[best]


def decode_tutorial(decoder: TutorialDecoder, annotations: torch.Tensor, beam: int,
                    steps: int) -> list[list[int]]:
    """The tutorial decodes one image at a time."""
    decoder.eval()
    return [tutorial_beam_search(decoder, annotations[i : i + 1], beam, steps)
            for i in range(annotations.shape[0])]


# ============================================================================ ablations
class ReprojectingDecoder(AttentionDecoder):
    """Ablation: the library decoder without its cached key projection. ``proj_keys`` is left
    out of the state, so the attention projects the ``(B, L, D)`` annotations again at every
    step (as the tutorial does; ``K`` times per image in beam search)."""

    def init_state(self, annotations: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> DecoderState:
        state = super().init_state(annotations, mask)
        state.proj_keys = None
        return state


class SlicedRecurrentDecoder(AttentionDecoder):
    """Ablation: the unroll applies ``W_z`` and ``U`` through per-step views of the LSTM's
    weights (two matmuls per step, the weight gradient one outer product per step and a copy
    into the strided layout) instead of :mod:`captioner.unrolled_linear`."""

    fused_recurrent = False


class PaddedStepsDecoder(AttentionDecoder):
    """Ablation: the unroll runs every caption for the batch's longest length (``skip_padding``
    ignored), the padding's steps computed and then masked by the loss."""

    def forward(self, annotations: torch.Tensor, captions: torch.Tensor,
                mask: torch.Tensor | None = None, skip_padding: bool = False) -> DecoderOutput:
        return super().forward(annotations, captions, mask, skip_padding=False)


class CopiedBeamKeysDecoder(AttentionDecoder):
    """Ablation: beam search gives each of an image's ``K`` hypotheses its own copy of the
    annotations (``(B K, L, D)``) instead of sharing them (``DecoderState.group``)."""

    def expand_beams(self, state: DecoderState, k: int) -> DecoderState:
        return state.repeat_rows(k, share_keys=False)


def tanh_attention(attention_dim: int) -> Callable[[int, int], AdditiveAttention]:
    """Ablation: additive attention whose hidden layer calls ``tanh`` itself instead of
    ``2 sigmoid(2x) - 1`` (``AdditiveAttention(tanh_via_sigmoid=False)``)."""
    return additive_attention(attention_dim, tanh_via_sigmoid=False)


def whole_hidden_layer_attention(attention_dim: int) -> Callable[[int, int], AdditiveAttention]:
    """Ablation: additive attention that forms the search's ``(B K, L, A)`` hidden layer whole
    instead of a few rows at a time (``chunk_elements=0``)."""
    return additive_attention(attention_dim, chunk_elements=0)


def compiled_score_attention(attention_dim: int) -> Callable[[int, int], AdditiveAttention]:
    """Not an ablation but the opt-in option (``compile_search=True``): the search's energies
    from one ``torch.compile``\ d loop. Its ``ours_speedup`` below 1 is the option's gain."""
    return additive_attention(attention_dim, compile_search=True)


def grid_loss(decoder, annotations, captions, lengths) -> torch.Tensor:
    """Ablation: the objective of :func:`library_loss` scored on the ``(B, T, V)`` grid
    (:attr:`DecoderOutput.logits`: the computed rows scattered among zeros, ``log_softmax`` over
    every ``B T`` row) instead of on the computed rows where they are."""
    out = decoder(annotations, captions, skip_padding=True)
    targets = captions[:, 1:]  # (B, T)
    return masked_nll(out.logits, targets, PAD_ID) + doubly_stochastic_penalty(
        out.alphas, targets != PAD_ID)


@dataclass(frozen=True)
class Ablation:
    """The library with one optimisation removed.

    Attributes:
        decoder: the decoder class.
        attention: factory of the attention of size ``A``.
        fused_adam: Adam's fused kernel (``False``: ``torch.optim.Adam``'s per-tensor loop).
        loss: the training objective ``(decoder, annotations, captions, lengths) -> scalar``.
        trains, decodes: whether its training / its decoding differ from ours (only those are
            measured).
    """

    decoder: type[AttentionDecoder] = AttentionDecoder
    attention: Callable[[int], Callable] = additive_attention
    fused_adam: bool = True
    loss: Callable[..., torch.Tensor] = ours_loss
    trains: bool = True
    decodes: bool = True


ABLATIONS: dict[str, Ablation] = {
    "reproject_keys": Ablation(ReprojectingDecoder),
    "sliced_recurrent": Ablation(SlicedRecurrentDecoder, decodes=False),
    "tanh_hidden": Ablation(attention=tanh_attention),
    "padded_steps": Ablation(PaddedStepsDecoder, decodes=False),
    "grid_loss": Ablation(loss=grid_loss, decodes=False),
    "loop_adam": Ablation(fused_adam=False, decodes=False),  # torch.optim.Adam's default
    "whole_hidden_layer": Ablation(attention=whole_hidden_layer_attention, trains=False),
    "copied_beam_keys": Ablation(CopiedBeamKeysDecoder, trains=False),
    "compiled_score": Ablation(attention=compiled_score_attention, trains=False),  # opt-in
}
#: ablations that change decoding only (training is the same code as ours)
DECODE_ABLATIONS = ("per_image_decoding",
                    *(name for name, a in ABLATIONS.items() if not a.trains))
#: ablations that change training only (decoding is the same code as ours)
TRAIN_ABLATIONS = tuple(name for name, a in ABLATIONS.items() if not a.decodes)


def ablated_decoder(s: Sizes, name: str, ours: AttentionDecoder, device: torch.device
                    ) -> tuple[AttentionDecoder, torch.optim.Optimizer]:
    """Ablation ``name`` with the weights of ``ours``, and its optimiser."""
    a = ABLATIONS[name]
    dec = a.decoder(s.vocab_size, s.encoder_dim, embed_dim=s.embed_dim, hidden_dim=s.hidden_dim,
                    dropout=0.5, attention=a.attention(s.attention_dim)).to(device)
    dec.load_state_dict(ours.state_dict())
    return dec, library_adam(dec.parameters(), a.fused_adam)


def decode_one_by_one(decoder: AttentionDecoder, annotations: torch.Tensor, beam: int,
                      steps: int) -> list[torch.Tensor]:
    """Ablation: the library search called on one image at a time (no batching)."""
    return [decode_library(decoder, annotations[i : i + 1], beam, steps)
            for i in range(annotations.shape[0])]


def decode_parity(s: Sizes, ours: AttentionDecoder, other: AttentionDecoder, work: Work
                  ) -> dict[str, float | bool]:
    """``other`` against ``ours`` (dropout off): decoded tokens and scores, greedy and beam 3."""
    out: dict[str, float | bool] = {}
    ann = work.annotations
    kw = dict(start_id=START_ID, end_id=END_ID, pad_id=PAD_ID, max_length=s.steps,
              min_length=s.steps)
    for k, beam in (("greedy", 1), ("beam3", 3)):
        ref, got = (beam_search(dec.eval(), ann, beam_size=beam, **kw) if beam > 1
                    else greedy_search(dec.eval(), ann, **kw) for dec in (ours, other))
        out[f"{k}_tokens_equal"] = bool(torch.equal(got.tokens, ref.tokens))
        out[f"{k}_score_max_abs_diff"] = float((got.scores - ref.scores).abs().max())
    return out


def training_parity(ours: AttentionDecoder, other: AttentionDecoder, work: Work,
                    other_loss: Callable[..., torch.Tensor] = ours_loss) -> dict[str, float]:
    """Loss and gradients of ``other`` (trained with ``other_loss``) against ``ours`` on the same
    batch (dropout off)."""
    grads, losses = [], []
    for dec, loss_fn in ((ours, ours_loss), (other, other_loss)):
        dec.eval().zero_grad(set_to_none=True)
        loss = loss_fn(dec, work.annotations, work.captions[0], work.lengths[0])
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters()
                      if p.grad is not None})
        dec.zero_grad(set_to_none=True)
    ref, got = grads
    return {"loss_abs_diff": abs(losses[0] - losses[1]),
            "grad_max_rel_diff": max(
                float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                for n, g in ref.items())}


# ============================================================================ sections
def bench_decoders(s: Sizes, device: torch.device, baseline: bool,
                   log: Callable[[str], None], ablations: bool = False) -> dict[str, Any]:
    """Training and decoding throughput of ours (and the baseline, the
    ablations of the library's own optimisations)."""
    work = make_work(s, device)
    ours = build_decoder(s).to(device)
    impls: dict[str, tuple[nn.Module, Callable]] = {"ours": (ours, ours_loss)}
    captions_per_pass = s.batch * s.train_batches
    result: dict[str, Any] = {}

    # ours alone first: its own peak memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # not the matmul's 8192^2 matrices
    opt_ours = library_adam(ours.parameters())
    train_pass(ours, opt_ours, work, ours_loss)
    for beam in (3, 5, 1):
        decode_library(ours, work.annotations, beam, s.steps)
    result["decoder_peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":  # ours alone: its work, weights, Adam state and activations
        result["decoder_cuda_peak_memory_mb"] = round(
            torch.cuda.max_memory_allocated(device) / 2**20, 1)

    optimizers = {"ours": opt_ours}
    if baseline:
        torch.manual_seed(SEED)
        tut = TutorialDecoder(s.attention_dim, s.embed_dim, s.hidden_dim, s.vocab_size,
                              s.encoder_dim).to(device)
        impls["baseline"] = (tut, tutorial_loss)
        optimizers["baseline"] = torch.optim.Adam(tut.parameters(), lr=4e-4)  # the tutorial's
    if ablations:
        for name, ablation in ABLATIONS.items():
            dec, optimizers[name] = ablated_decoder(s, name, ours, device)
            impls[name] = (dec, ablation.loss)
        for name in ("sliced_recurrent", "tanh_hidden", "padded_steps", "grid_loss"):
            other, loss_fn = impls[name]
            result[f"{name}_parity"] = training_parity(ours, other, work, loss_fn)
        result["tanh_hidden_parity"].update(decode_parity(s, ours, impls["tanh_hidden"][0],
                                                          work))
        for name in ("whole_hidden_layer", "copied_beam_keys", "compiled_score"):
            result[f"{name}_parity"] = decode_parity(s, ours, impls[name][0], work)
        impls["per_image_decoding"] = (ours, ours_loss)

    train_impls = {k: v for k, v in impls.items()
                   if k not in DECODE_ABLATIONS}
    log(f"training: {', '.join(train_impls)} ({s.train_batches} batches x {s.repeats} repeats)")
    tasks = {name: functools.partial(train_pass, dec, optimizers[name], work, loss_fn)
             for name, (dec, loss_fn) in train_impls.items()}
    times = interleaved(tasks, s.warmup, s.repeats, device)
    train = {name: rate(captions_per_pass, t) for name, t in times.items()}

    # decoding: 32 images, exactly `steps` steps
    decode: dict[str, dict[str, float]] = {name: {} for name in impls}
    for key, beam in DECODE_KEYS.items():
        tasks, items = {}, {}
        for name, (dec, _) in impls.items():
            if name in TRAIN_ABLATIONS:
                continue  # same decoding code as ours
            if name in ("baseline", "per_image_decoding"):
                ann = work.annotations[: s.baseline_images]
                decode_fn = decode_tutorial if name == "baseline" else decode_one_by_one
                tasks[name] = functools.partial(decode_fn, dec, ann, beam, s.steps)
                items[name] = ann.shape[0]
            else:
                tasks[name] = functools.partial(decode_library, dec, work.annotations, beam,
                                                s.steps)
                items[name] = s.batch
        log(f"decoding {key}: {', '.join(tasks)}")
        times = interleaved(tasks, s.warmup, s.repeats, device)
        for name, t in times.items():
            decode[name][f"{key}_fixed20_images_per_s"] = rate(items[name], t)

    result.update({"train_captions_per_s": train["ours"], **decode["ours"]})
    if baseline:
        result["baseline"] = {"train_captions_per_s": train["baseline"], **decode["baseline"]}
        result["speedup_vs_baseline"] = {
            k: result[k] / v for k, v in result["baseline"].items()}
    if ablations:
        result["ablations"] = {}
        for name in (*ABLATIONS, "per_image_decoding"):
            entry = dict(decode[name])
            if name in train:
                entry["train_captions_per_s"] = train[name]
            entry["ours_speedup"] = {k: result[k] / v for k, v in entry.items()}
            result["ablations"][name] = entry
    return result


def _ab_rounds(times: dict[str, list[float]], name: str, items: int) -> dict[str, Any]:
    """Per-round ratios (ablated seconds / ours) of an interleaved A/B and the two rates."""
    speedups = [a / o for o, a in zip(times["ours"], times[name])]
    return {"ours_per_s": rate(items, times["ours"]), "ablated_per_s": rate(items, times[name]),
            "ours_speedup_median": statistics.median(speedups),
            "ours_speedup_per_round": [round(x, 3) for x in speedups],
            "rounds_ours_faster": sum(x > 1 for x in speedups)}


def bench_ab(s: Sizes, device: torch.device, name: str, log: Callable[[str], None]
             ) -> dict[str, Any]:
    """Ours against one ablation alone, for effects of a few per cent: many repeats, interleaved
    in alternating order, with the ratio of each round (ablated seconds / ours). Training when
    the ablation changes training, and beam 3, beam 5 and greedy decoding when it changes
    decoding (``decode``)."""
    if name not in ABLATIONS:
        raise SystemExit(f"benchmark: --ab {name!r} is not an ablation ({', '.join(ABLATIONS)})")
    ablation = ABLATIONS[name]
    work = make_work(s, device)
    ours = build_decoder(s).to(device)
    dec, opt = ablated_decoder(s, name, ours, device)
    result: dict[str, Any] = {"ablation": name, "repeats": s.repeats}
    if ablation.trains:
        tasks = {"ours": functools.partial(train_pass, ours, library_adam(ours.parameters()),
                                           work, ours_loss),
                 name: functools.partial(train_pass, dec, opt, work, ablation.loss)}
        log(f"A/B training: ours against {name} ({s.train_batches} batches x {s.repeats} "
            "repeats)")
        train = _ab_rounds(interleaved(tasks, s.warmup, s.repeats, device), name,
                           s.batch * s.train_batches)
        result.update({"ours_train_captions_per_s": train.pop("ours_per_s"),
                       "ablated_train_captions_per_s": train.pop("ablated_per_s"), **train})
    if ablation.decodes:
        result["decode"] = {}
        for key, beam in DECODE_KEYS.items():
            tasks = {impl: functools.partial(decode_library, d, work.annotations, beam, s.steps)
                     for impl, d in (("ours", ours), (name, dec))}
            log(f"A/B decoding {key}: ours against {name} ({s.repeats} repeats)")
            result["decode"][key] = _ab_rounds(interleaved(tasks, s.warmup, s.repeats, device),
                                               name, s.batch)
    return result


def bench_batching(s: Sizes, device: torch.device, log: Callable[[str], None]
                   ) -> dict[str, Any]:
    """Training throughput with batches of ``B`` captions of mixed lengths (the fixed work's
    batching) against the paper's batches of one length (Xu et al. 2015, Sec. 4.3;
    ``same_length_batches`` in the data modules), on the same length distribution.

    At data-set scale the paper's batches are full (one short batch per length and epoch), and
    the length of each is a draw from the distribution, so a step's expected time is
    ``sum_l p_l t(l)``, ``t(l)`` the median step on ``B`` captions of length ``l``; mixed
    batches' expected time is the mean of the median steps of one mixed batch per length
    value (drawn as the fixed work draws them). All batches are timed in the same
    interleaved rounds. Captions per second = ``B`` / expected step time."""
    rng = np.random.default_rng(SEED + 1)
    gen = torch.Generator().manual_seed(SEED)
    annotations = torch.randn(s.batch, s.grid * s.grid, s.encoder_dim,
                              generator=gen).relu().to(device)
    dec = build_decoder(s).to(device)
    opt = library_adam(dec.parameters())
    batches: dict[str, Work] = {}
    for length in LENGTH_DISTRIBUTION:
        same = np.full(s.batch, length)
        mixed = sample_lengths(s.batch, rng)
        for name, lengths in ((f"same_{length}", same), (f"mixed_{length}", mixed)):
            batches[name] = Work(annotations, [make_captions(lengths, s.vocab_size,
                                                             rng).to(device)],
                                 [torch.as_tensor(lengths, device=device)])
    log(f"batching: {len(batches)} batches x {s.repeats} repeats")
    tasks = {name: functools.partial(train_pass, dec, opt, work, ours_loss)
             for name, work in batches.items()}
    times = {name: statistics.median(t)
             for name, t in interleaved(tasks, s.warmup, s.repeats, device).items()}
    probs = np.array(list(LENGTH_DISTRIBUTION.values()))
    probs = probs / probs.sum()
    same_time = sum(p * times[f"same_{n}"] for n, p in zip(LENGTH_DISTRIBUTION, probs))
    mixed_time = statistics.mean(times[f"mixed_{n}"] for n in LENGTH_DISTRIBUTION)
    mixed_tokens = statistics.mean(float(batches[f"mixed_{n}"].lengths[0].float().mean())
                                   for n in LENGTH_DISTRIBUTION)
    mean_tokens = float((np.array(list(LENGTH_DISTRIBUTION)) * probs).sum())
    return {"mixed_train_captions_per_s": s.batch / mixed_time,
            "same_length_train_captions_per_s": s.batch / same_time,
            # tokens per caption: the distribution's mean, and the mixed batches' sample mean
            "mean_caption_tokens": mean_tokens,
            "mixed_batches_mean_caption_tokens": mixed_tokens,
            # seconds per token, mixed / same (corrects the mixed draws' sample mean)
            "same_length_speedup_per_token": (mixed_time / mixed_tokens)
            / (same_time / mean_tokens),
            "step_seconds": {name: round(t, 4) for name, t in times.items()}}


def bench_bf16(s: Sizes, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """bf16 autocast on ``device``: loss parity with fp32 (dropout off) and training/greedy throughput,
    with fp32 measured in the same interleaved rounds (the same eval-mode decoder) for the ratio;
    where the CPU has no native bf16 matmul, one timed round each after one warm-up."""
    work = make_work(s, device)
    dec = build_decoder(s).to(device).eval()
    ann, cap = work.annotations, work.captions[0]
    with torch.no_grad():
        loss32 = float(library_loss(dec, ann, cap))
        with bf16_autocast(device):
            loss16 = float(library_loss(dec, ann, cap))
    out: dict[str, Any] = {
        "bf16_matmul_gflops": matmul_gflops(s.matmul_size, device, torch.bfloat16, repeats=3),
        "loss_fp32": loss32, "loss_bf16": loss16,
        "loss_rel_diff": abs(loss16 - loss32) / abs(loss32),
    }
    fp32 = matmul_gflops(s.matmul_size, device)
    warmup, repeats = s.warmup, s.repeats
    if out["bf16_matmul_gflops"] < 0.25 * fp32:  # no native bf16: one round is minutes
        warmup, repeats = min(warmup, 1), 1
        out["note"] = (
            f"bf16 matmul runs at {out['bf16_matmul_gflops']:.1f} GFLOP/s against "
            f"{fp32:.1f} in fp32 on this CPU (no native bf16 matmul: no AMX / AVX512-BF16); "
            f"one timed round each after {warmup} warm-up")
    opt = library_adam(dec.parameters())
    log(f"bf16: training and decoding, against fp32 in the same rounds ({repeats})")
    tasks: dict[str, Callable[[], Any]] = {
        "train_fp32": functools.partial(train_pass, dec, opt, work, ours_loss, False),
        "train_bf16": functools.partial(train_pass, dec, opt, work, ours_loss, True)}
    for key, beam in DECODE_KEYS.items():
        tasks[f"{key}_fp32"] = functools.partial(decode_library, dec, ann, beam, s.steps)
        tasks[f"{key}_bf16"] = functools.partial(_autocast_decode, dec, ann, beam, s.steps)
    times = interleaved(tasks, warmup, repeats, device)
    figures = {"train_captions_per_s": ("train", s.batch * s.train_batches)}
    figures.update({f"{key}_fixed20_images_per_s": (key, s.batch) for key in DECODE_KEYS})
    for name, (task, items) in figures.items():
        out[name] = rate(items, times[f"{task}_bf16"])
        out[f"fp32_{name}"] = rate(items, times[f"{task}_fp32"])
        out[f"{task}_bf16_over_fp32_time"] = out[f"fp32_{name}"] / out[name]
    out["lightning_autocast"] = bench_lightning_autocast(s, dec, ann, warmup, repeats, device, log)
    return out


def _autocast_decode(dec: AttentionDecoder, ann: torch.Tensor, beam: int, steps: int,
                     cache_enabled: bool = True) -> None:
    with bf16_autocast(ann.device, cache_enabled=cache_enabled):
        decode_library(dec, ann, beam, steps)


def bench_lightning_autocast(s: Sizes, dec: AttentionDecoder, ann: torch.Tensor, warmup: int,
                             repeats: int, device: torch.device, log: Callable[[str], None]
                             ) -> dict[str, dict[str, float]]:
    """Greedy and beam 3 under Lightning's ``bf16-mixed`` autocast (its cache switched off, as
    in validation), with the search's :meth:`AttentionDecoder.frozen_weights` block (each weight
    cast once per search) against a copy of the decoder without it (every weight cast at every
    step), interleaved: images per second and the block's speed-up."""
    per_step = copy.deepcopy(dec)
    per_step.frozen_weights = contextlib.nullcontext  # the ablation: no block
    log(f"bf16 under Lightning's autocast (no cache): search with and without its block "
        f"({repeats})")
    tasks = {}
    for key in ("greedy_b32", "beam_k3"):
        for name, d in (("frozen_weights", dec), ("per_step_casts", per_step)):
            tasks[f"{key}/{name}"] = functools.partial(_autocast_decode, d, ann, DECODE_KEYS[key],
                                                       s.steps, False)
    times = interleaved(tasks, warmup, repeats, device)
    out: dict[str, dict[str, float]] = {}
    for key in ("greedy_b32", "beam_k3"):
        fast, slow = (rate(s.batch, times[f"{key}/{n}"])
                      for n in ("frozen_weights", "per_step_casts"))
        out[key] = {"frozen_weights_images_per_s": fast, "per_step_casts_images_per_s": slow,
                    "speedup": fast / slow}
    return out


def bench_encoders(s: Sizes, device: torch.device, log: Callable[[str], None],
                   bf16: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Frozen CNN forward (no grad), batch ``encode_batch``: images per second in fp32, and with
    ``bf16`` under bf16 autocast too, measured in the same rounds (else ``{}``)."""
    from captioner.encoders.encoder import ImageEncoder

    out: dict[str, float] = {}
    out_bf16: dict[str, float] = {}
    for name, size, grid in (("resnet101", s.resnet_size, 14),
                             ("efficientnet_lite0", s.efficientnet_size, 7)):
        log(f"encoder {name} at {size} x {size}" + (", fp32 and bf16" if bf16 else ""))
        enc = ImageEncoder(name, weights=None, grid_size=grid).to(device).eval()
        images = torch.rand(s.encode_batch, 3, size, size,
                            generator=torch.Generator().manual_seed(SEED)).to(device)

        @torch.no_grad()
        def forward(autocast: bool = False, enc: nn.Module = enc,
                    images: torch.Tensor = images) -> None:
            with bf16_autocast(images.device, enabled=autocast):
                enc(images)

        tasks = {"fp32": forward}
        if bf16:
            tasks["bf16"] = functools.partial(forward, True)
        times = interleaved(tasks, 1, s.encode_repeats, device)
        out[f"{name}_{size}"] = rate(s.encode_batch, times["fp32"])
        if bf16:
            out_bf16[f"{name}_{size}"] = rate(s.encode_batch, times["bf16"])
        del enc
    return out, out_bf16


def _generated_jpegs(folder: Path, n: int, tiny: bool) -> list[Path]:
    """``n`` random JPEGs of Flickr8k's typical size (500 x 375)."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    w, h = (40, 30) if tiny else (500, 375)
    paths = []
    for i in range(n):
        noise = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = Image.fromarray(noise).resize((w, h), Image.Resampling.BILINEAR)
        path = folder / f"img{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def bench_loading(s: Sizes, data_dir: Path | None, log: Callable[[str], None]
                  ) -> tuple[float, dict[str, Any]]:
    """JPEG decode + resize + to-tensor through ImageEvalDataset and the default DataLoader."""
    from torch.utils.data import DataLoader

    from captioner.data.datamodule import CaptionDataModule
    from captioner.data.datasets import ImageEvalDataset, collate_images
    from captioner.data.formats import ImageRecord

    workers = inspect.signature(CaptionDataModule.__init__).parameters["num_workers"].default
    size = 224
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is not None and (data_dir / "captions.txt").is_file():
            dm = CaptionDataModule("flickr8k_csv", str(data_dir / "captions.txt"),
                                   str(data_dir / "images"), val_fraction=0.0, test_fraction=0.0)
            records = dm.records("train")[: s.load_images]
            source = str(data_dir.resolve())
        else:
            paths = _generated_jpegs(Path(tmp), s.load_images, tiny=s.batch < 8)
            records = [ImageRecord(image_id=i, path=p, captions=["a picture"])
                       for i, p in enumerate(paths)]
            from PIL import Image

            with Image.open(paths[0]) as first:
                source = f"generated JPEGs ({first.width} x {first.height})"
        log(f"loading {len(records)} images from {source} with {workers} workers")
        loader = DataLoader(ImageEvalDataset(records, size), batch_size=32, shuffle=False,
                            num_workers=workers, collate_fn=collate_images,
                            persistent_workers=workers > 0,
                            pin_memory=torch.cuda.is_available())  # as the data modules do

        def one_pass() -> None:
            for _ in loader:
                pass

        times = interleaved({"load": one_pass}, 1, s.load_repeats, torch.device("cpu"))["load"]
        info = {"source": source, "images": len(records), "num_workers": workers,
                "image_size": size}
        return rate(len(records), times), info


def bench_cached_epochs(s: Sizes, data_dir: Path, device: torch.device,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """One training epoch from raw images against one from cached features (issue 7).

    The model is ``configs/model/efficientnet_lite0_soft.yaml`` (frozen ImageNet
    EfficientNet-Lite0, 7 x 7 x 1280 annotations), the data the Flickr8k subset as in
    ``configs/data/flickr8k_subset.yaml``; both runs start from the same weights and use the
    same Lightning trainer settings (no validation). The cache is extracted first (timed).
    """
    import lightning as L
    import yaml

    from captioner.data.cached import CachedFeaturesDataModule
    from captioner.data.datamodule import CaptionDataModule
    from captioner.features import extract_features
    from captioner.lit.captioning import CaptioningModule

    data = yaml.safe_load((REPO / "configs" / "data" / "flickr8k_subset.yaml").read_text())
    data_args = {**data["data"]["init_args"], "annotations": str(data_dir / "captions.txt"),
                 "image_root": str(data_dir / "images"), "image_size": s.epoch_image_size,
                 "max_images": s.epoch_images}
    model = yaml.safe_load(
        (REPO / "configs" / "model" / "efficientnet_lite0_soft.yaml").read_text())
    model_args = model["model"]["init_args"]
    raw_dm = CaptionDataModule(**data_args)
    torch.manual_seed(SEED)
    raw_module = CaptioningModule.from_config({**model_args, "vocab_size": raw_dm.vocab_size})
    cached_module = CaptioningModule.from_config({**model_args,
                                                  "vocab_size": raw_dm.vocab_size})
    cached_module.load_state_dict(raw_module.state_dict())
    images = [r.path for split in ("train", "val", "test") for r in raw_dm.records(split)]
    with tempfile.TemporaryDirectory() as cache_dir:
        log(f"cached epochs: extracting {len(images)} images")
        start = time.perf_counter()
        extract_features(raw_module.encoder, images, cache_dir, image_size=s.epoch_image_size,
                         batch_size=32, shard_size=256, num_workers=raw_dm.num_workers,
                         device=device)
        extraction = time.perf_counter() - start
        cached_dm = CachedFeaturesDataModule(features_dir=cache_dir, **data_args)
        seconds = {}
        for name, module, dm in (("raw", raw_module, raw_dm),
                                 ("cached", cached_module, cached_dm)):
            log(f"cached epochs: one epoch from {name}")
            trainer = L.Trainer(accelerator=device.type, devices=1, max_epochs=1,
                                limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, gradient_clip_val=5.0)
            start = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            seconds[name] = time.perf_counter() - start
        pairs = len(raw_dm._dataset("train"))
    return {"raw_epoch_s": seconds["raw"], "cached_epoch_s": seconds["cached"],
            "speedup": seconds["raw"] / seconds["cached"], "extraction_s": extraction,
            "train_pairs": pairs, "images_extracted": len(images),
            "raw_captions_per_s": pairs / seconds["raw"],
            "cached_captions_per_s": pairs / seconds["cached"],
            "image_size": s.epoch_image_size, "batch_size": raw_dm.batch_size,
            "num_workers": raw_dm.num_workers}


# ============================================================================ main
#: the parts ``--skip`` can leave out
SECTIONS = ("decoders", "encode", "load")


def _sections(text: str) -> frozenset[str]:
    """``--skip``'s comma list, each name one of :data:`SECTIONS` (a misspelt one ran that
    part anyway, silently)."""
    names = frozenset(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(names - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose among "
                                         f"{', '.join(SECTIONS)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="fewer repeats: about a minute")
    p.add_argument("--json", default=None, metavar="OUT", help="write the JSON object here")
    p.add_argument("--bf16", action="store_true",
                   help="add bf16 autocast figures (CPU, or CUDA with --device cuda)")
    p.add_argument("--baseline", action="store_true",
                   help="add the tutorial implementation, measured interleaved with ours")
    p.add_argument("--ablations", action="store_true",
                   help="add the library with each of its optimisations removed in turn: "
                        f"{', '.join([*ABLATIONS, *DECODE_ABLATIONS[:1]])}")
    p.add_argument("--ab", default=None, metavar="ABLATION",
                   help="add ours against this one ablation alone (e.g. grid_loss, loop_adam, "
                        "copied_beam_keys), training and/or decoding as the ablation changes "
                        "them, interleaved in alternating order, with per-round ratios; for "
                        "small effects use many --repeats")
    p.add_argument("--batching", action="store_true",
                   help="add training with the paper's batches of one caption length against "
                        "mixed-length batches (Xu et al. 2015, Sec. 4.3)")
    p.add_argument("--cached-epochs", action="store_true",
                   help="add one training epoch from raw images against one from cached "
                        "features (Flickr8k subset, frozen EfficientNet-Lite0; minutes)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats of each decoder measurement (default: 3, quick: 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="captions (training) and images (decoding) per batch; default 32, the "
                        "fixed work whose figures compare across machines (others: e.g. a GPU "
                        "at a batch that fills it, reported with its size under sizes.batch)")
    p.add_argument("--skip", type=_sections, default=frozenset(),
                   help=f"comma list among: {','.join(SECTIONS)}")
    p.add_argument("--data", default=str(FLICKR8K_SUBSET), help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke tests
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda but no GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = TINY if args.tiny else QUICK if args.quick else FULL
    if args.repeats:
        s = replace(s, repeats=args.repeats)
    if args.batch:
        s = replace(s, batch=args.batch)
    if device.type == "cuda" and not args.tiny:  # 1024^3 is a few microseconds on a GPU
        s = replace(s, matmul_size=8192)
    skip = args.skip
    if "decoders" in skip and (args.baseline or args.ablations):
        print("benchmark: --skip decoders: --baseline and --ablations are measured with the "
              "decoders and are not run", file=sys.stderr)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {}
    log(f"matmul {s.matmul_size}^3 fp32")
    result["matmul_gflops"] = matmul_gflops(s.matmul_size, device)
    if "decoders" not in skip:
        result.update(bench_decoders(s, device, args.baseline, log,
                                     args.ablations))
    if args.ab:
        result["ab"] = bench_ab(s, device, args.ab, log)
    if args.bf16:
        result["bf16"] = bench_bf16(s, device, log)
    if args.batching:
        result["batching"] = bench_batching(s, device, log)
    if "encode" not in skip:
        result["encode_images_per_s"], encode_bf16 = bench_encoders(s, device, log, args.bf16)
        if args.bf16:
            result["bf16"]["encode_images_per_s"] = encode_bf16
    if "load" not in skip:
        data = Path(args.data) if args.data else None
        result["load_images_per_s"], result["load_settings"] = bench_loading(s, data, log)
    if args.cached_epochs:
        data = Path(args.data)
        if not (data / "captions.txt").is_file():
            raise SystemExit(f"benchmark: --cached-epochs needs the Flickr8k subset at {data}")
        result["cached_epochs"] = bench_cached_epochs(s, data, device, log)
    result.update({
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        # the whole run's peak (from the decoders on, when they run): every arm, not ours alone
        **({"cuda_peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "cuda_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32_convolutions": torch.backends.cudnn.allow_tf32,
            "cuda_version": torch.version.cuda} if device.type == "cuda" else {}),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                    "load_average_1m": os.getloadavg()[0]},
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "sizes": asdict(s),
        "seconds": round(time.perf_counter() - started, 1),
    })
    result = _rounded(result)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.json)
    print(text)
    return result


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) or obj == 0 else float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


if __name__ == "__main__":
    main()
