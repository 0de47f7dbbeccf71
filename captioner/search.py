"""Decoding: greedy search and beam search batched across images.

Both work with any decoder exposing ``init_state(annotations, mask) -> state`` and
``step(prev_tokens (B,), state) -> (log_probs (B, V), state, alpha (B, L), beta (B,))``, and
a state with ``select(index)`` / ``select_recurrent(index)`` (see :mod:`captioner.decoder`);
beam search runs step 0 once per image (an image's ``K`` hypotheses all read ``<start>`` from
the same state) and then goes on from ``decoder.expand_beams(state, K)`` where the decoder has it
(the library's shares each image's annotations among its ``K`` hypotheses), else from
``state.select`` of each row ``K`` times. A search runs inside ``decoder.frozen_weights()`` where
the decoder has it (:meth:`captioner.decoder.AttentionDecoder.frozen_weights`: under autocast,
each weight cast once per search). No Lightning here.

Length conventions: a *step* emits one token; ``<end>`` counts as a token. ``<end>`` is forbidden
while fewer than ``min_length`` tokens (``<end>`` included) would result, and decoding stops after
``max_length`` steps. A hypothesis that never emits ``<end>`` is returned as it stands.

Beam bookkeeping, worked for ``B = 2`` images and ``K = 3``: the ``B * K = 6`` rows are image-major
(rows 0-2 are image 0's beams). At each step the ``K * V`` candidate scores of an image are
flattened and the best ``2K`` kept; candidate index ``j`` came from beam ``j // V`` with token
``j % V``, i.e. from row ``b * K + j // V``. A candidate ending in ``<end>`` that ranks among the
first ``K`` joins the image's pool of finished hypotheses (kept, never recomputed); the best ``K``
others continue.

Equal scores are ranked by index (:func:`_best`: the lower candidate index ``j`` first, i.e. the
lower beam, then the lower token id), the rule of greedy search's ``max``: with ties, which
low-precision (bf16, fp16) log-probabilities often have, ``K = 1`` still decodes as greedy.

When an image is done (``stop``):

* ``"k_finished"`` (the default, as in most captioning and NMT code): once it has ``K`` finished
  hypotheses, so ``K = 1`` is exactly greedy search. A beam still alive might then have gone on
  to outrank them.
* ``"exact"``: once no beam still alive can outrank its best finished hypothesis. A log-probability
  only falls as a hypothesis grows, so an alive beam of score ``s <= 0`` after ``t + 1`` tokens
  can at best finish with rank ``max(s / (t + 2)^p, s / max_length^p)`` (``p`` the length
  penalty; ``s`` itself for ``p = 0``). The returned hypothesis is then the best that the beam
  ever held, whatever its length; with ``p = 0`` this also stops an image as soon as a finished
  hypothesis beats every alive beam, often before ``K`` have finished. With ``p > 0`` the bound is
  loose and images tend to run to ``max_length``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch


@dataclass
class SearchResult:
    """Decoded hypotheses, one per image.

    Attributes:
        tokens: ``(B, T)`` generated ids (no ``<start>``; ``<end>`` included when emitted), padded
            with ``pad_id``.
        lengths: ``(B,)`` number of generated tokens, ``<end>`` included.
        scores: ``(B,)`` total log-probability of the tokens.
        alphas: ``(B, T, L)`` attention weights of each step (zeros after ``lengths``).
        betas: ``(B, T)`` gate values of each step.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor


def _check_settings(max_length: int, beam_size: int = 1) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (decoding steps), got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")


def _best(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` largest entries of each row of ``values`` ``(R, n_cols)``, largest first, equal
    ones in the order of their column: the first ``n`` of a stable descending sort, from
    ``topk``.

    ``topk`` neither orders nor chooses among equal values by column; here one more than ``n``
    is asked for, and only where a row's ``n``-th and ``(n+1)``-th finite values are equal (a
    tie across the cut: which equal ones are kept matters) are its entries chosen again by one
    more ``topk``, of a key that puts the values above the cut first and the ones equal to it
    in column order (no sort of the ``n_cols`` columns: with bf16 log-probabilities a sixth of the
    rows may tie). Ties at ``-inf`` (dead beams, banned tokens) are not resolved: nothing ranks
    them.

    Returns:
        ``(R, n)`` values and ``(R, n)`` column indices.
    """
    n_cols = values.shape[1]
    top, index = values.topk(min(n + 1, n_cols), dim=1)  # (R, n + 1), or (R, n_cols)
    if top.shape[1] > n:
        cut = (top[:, n] == top[:, n - 1]) & torch.isfinite(top[:, n])  # (R,)
        top, index = top[:, :n], index[:, :n]
        if bool(cut.any()):
            rows = cut.nonzero().squeeze(1)
            tied = values[rows]  # (r, n_cols)
            level = top[rows, n - 1 : n]  # (r, 1) the value at the cut
            column = torch.arange(n_cols, device=values.device).expand_as(tied)  # (r, n_cols)
            # above the cut: below 0, any order; at the cut: the column; under it: last
            key = torch.where(tied > level, column - n_cols,
                              torch.where(tied == level, column,
                                          torch.full_like(column, 2 * n_cols)))
            chosen = key.topk(n, dim=1, largest=False).indices  # (r, n)
            top, index = top.clone(), index.clone()
            top[rows], index[rows] = tied.gather(1, chosen), chosen
    index, by_column = index.sort(dim=1)  # (R, n)
    top, by_value = top.gather(1, by_column).sort(dim=1, descending=True, stable=True)
    return top, index.gather(1, by_value)


def _constrain(log_probs: torch.Tensor, step: int, min_length: int, end_id: int,
               banned: tuple[int, ...]) -> torch.Tensor:
    """Never emit ``<pad>`` / ``<start>``; no ``<end>`` before ``min_length``."""
    log_probs = log_probs.clone()
    for token in banned:  # column by column: no index tensor copied to the device per step
        log_probs[:, token].fill_(float("-inf"))
    if step + 1 < min_length:
        log_probs[:, end_id].fill_(float("-inf"))
    return log_probs


def _frozen_decoder_weights(search: Callable[..., SearchResult]) -> Callable[..., SearchResult]:
    """Run ``search`` inside ``decoder.frozen_weights()`` where the decoder has it (under
    autocast the library's decoder then casts each weight once per search, not per step)."""

    @functools.wraps(search)
    def run(decoder, *args, **kwargs) -> SearchResult:
        scope = getattr(decoder, "frozen_weights", contextlib.nullcontext)
        with scope():
            return search(decoder, *args, **kwargs)

    return run


@torch.no_grad()
@_frozen_decoder_weights
def greedy_search(
    decoder,
    annotations: torch.Tensor,
    *,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_length: int = 20,
    min_length: int = 1,
    mask: torch.Tensor | None = None,
) -> SearchResult:
    """Pick the most probable word at every step.

    Args:
        decoder: see module docstring.
        annotations: ``(B, L, D)``.
        start_id: ``<start>`` id; end_id: ``<end>`` id; pad_id: padding id.
        max_length: maximum number of steps; min_length: minimum tokens incl. ``<end>``.
        mask: ``(B, L)`` key mask or ``None``.
    """
    _check_settings(max_length)
    B, L, _ = annotations.shape
    state = decoder.init_state(annotations, mask)
    prev = annotations.new_full((B,), start_id, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=annotations.device)
    scores = annotations.new_zeros(B, dtype=torch.promote_types(annotations.dtype, torch.float))
    lengths = torch.zeros(B, dtype=torch.long, device=annotations.device)
    tokens, alphas, betas = [], [], []
    if B == 0:  # no step to take: (0, 0) results, as beam search gives
        empty = torch.zeros(0, 0, dtype=torch.long, device=annotations.device)
        return SearchResult(empty, lengths, scores, annotations.new_zeros(0, 0, L),
                            scores.new_zeros(0, 0))
    for t in range(max_length):
        log_probs, state, alpha, beta = decoder.step(prev, state)
        log_probs = _constrain(log_probs, t, min_length, end_id, (pad_id, start_id))
        best, token = log_probs.max(dim=-1)  # (B,), (B,)
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        scores += torch.where(alive, best, torch.zeros_like(best))
        lengths += alive.long()
        tokens.append(token)
        alphas.append(alpha * alive.unsqueeze(1))
        betas.append(beta * alive)
        finished |= token == end_id
        if bool(finished.all()):
            break
        prev = token
    return SearchResult(torch.stack(tokens, 1), lengths, scores, torch.stack(alphas, 1),
                        torch.stack(betas, 1))


@torch.no_grad()
@_frozen_decoder_weights
def beam_search(
    decoder,
    annotations: torch.Tensor,
    *,
    beam_size: int,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_length: int = 20,
    min_length: int = 1,
    length_penalty: float = 0.0,
    mask: torch.Tensor | None = None,
    stop: Literal["k_finished", "exact"] = "k_finished",
) -> SearchResult:
    """Beam search over all images of the batch at once.

    Hypotheses are ranked by ``score / length ** length_penalty`` (``0``: raw log-probability,
    ``1``: mean per-token log-probability); an image stops as ``stop`` says (module docstring).

    Args:
        decoder: see module docstring.
        annotations: ``(B, L, D)``.
        beam_size: ``K``.
        start_id, end_id, pad_id: special token ids.
        max_length: maximum number of steps; min_length: minimum tokens incl. ``<end>``.
        length_penalty: exponent of the length normalisation.
        mask: ``(B, L)`` key mask or ``None``.
        stop: ``"k_finished"`` or ``"exact"`` (module docstring).
    """
    _check_settings(max_length, beam_size)
    if stop not in ("k_finished", "exact"):
        raise ValueError(f"stop must be 'k_finished' or 'exact', got {stop!r}")
    B, L, _ = annotations.shape
    K = beam_size
    dev = annotations.device
    neg_inf = float("-inf")

    # step 0 runs once per image: its K hypotheses all read <start> from the same state, and the
    # K-fold rows are made only afterwards (a K-th of step 0's cost; identical results)
    state = decoder.init_state(annotations, mask)
    first = decoder.step(torch.full((B,), start_id, dtype=torch.long, device=dev), state)
    rows = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,): row b*K+k <- image b
    log_probs, state, alpha, beta = first[0][rows], first[1], first[2][rows], first[3][rows]
    if hasattr(decoder, "expand_beams"):  # may share an image's annotations among its beams
        state = decoder.expand_beams(state, K)
    else:
        state = state.select(rows)  # (B*K,) rows
    prev = None  # the tokens read at step t >= 1
    beam_scores = torch.full((B, K), neg_inf, device=dev)
    beam_scores[:, 0] = 0.0  # only the first beam is alive at t = 0
    tok_hist = torch.full((B * K, max_length), pad_id, dtype=torch.long, device=dev)
    alpha_hist = annotations.new_zeros(B * K, max_length, L)
    beta_hist = annotations.new_zeros(B * K, max_length)

    # pool of finished hypotheses per image
    fin_rank = torch.full((B, K), neg_inf, device=dev)  # ranking score
    fin_score = torch.full((B, K), neg_inf, device=dev)  # raw log-probability
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_tok = torch.full((B, K, max_length), pad_id, dtype=torch.long, device=dev)
    fin_alpha = annotations.new_zeros(B, K, max_length, L)
    fin_beta = annotations.new_zeros(B, K, max_length)
    n_fin = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)  # images that stopped searching
    offsets = (torch.arange(B, device=dev) * K).unsqueeze(1)  # (B, 1)

    def merge(cand_rank, cand_score, cand_len, cand_tok, cand_alpha, cand_beta):
        """Keep the K best of (pool, candidates) per image."""
        nonlocal fin_rank, fin_score, fin_len, fin_tok, fin_alpha, fin_beta
        all_rank = torch.cat([fin_rank, cand_rank], 1)  # (B, K + 2K)
        top_rank, top = all_rank.sort(dim=1, descending=True, stable=True)  # (B, K + 2K)
        top_rank, top = top_rank[:, :K], top[:, :K]  # (B, K): equal ranks, the pool's first

        def pick(pool, cand):
            both = torch.cat([pool, cand], 1)
            idx = top.view(B, K, *([1] * (both.dim() - 2))).expand(B, K, *both.shape[2:])
            return both.gather(1, idx)

        fin_rank = top_rank
        fin_score, fin_len = pick(fin_score, cand_score), pick(fin_len, cand_len)
        fin_tok, fin_alpha, fin_beta = pick(fin_tok, cand_tok), pick(fin_alpha, cand_alpha), pick(
            fin_beta, cand_beta)

    for t in range(max_length):
        if t > 0:  # (B*K, V), state, (B*K, L), (B*K,)
            log_probs, state, alpha, beta = decoder.step(prev, state)
        log_probs = _constrain(log_probs, t, min_length, end_id, (pad_id, start_id))
        V = log_probs.shape[-1]
        cand = (beam_scores.view(B * K, 1) + log_probs).view(B, K * V)  # (B, K*V)
        n_cand = min(2 * K, K * V)
        top_scores, top_idx = _best(cand, n_cand)  # (B, 2K), equal scores by index
        src = top_idx // V + offsets  # (B, 2K) rows of B*K
        token = top_idx % V  # (B, 2K)
        is_end = token == end_id

        # histories of all 2K candidates (cheap gathers, no recomputation)
        flat_src = src.reshape(-1)
        c_tok = tok_hist[flat_src].view(B, n_cand, max_length)  # (B, 2K, max_length)
        c_tok[:, :, t] = token
        c_alpha = alpha_hist[flat_src].view(B, n_cand, max_length, L)  # (B, 2K, max_length, L)
        c_alpha[:, :, t] = alpha[flat_src].view(B, n_cand, L)
        c_beta = beta_hist[flat_src].view(B, n_cand, max_length)  # (B, 2K, max_length)
        c_beta[:, :, t] = beta[flat_src].view(B, n_cand)

        # finished: <end> candidates ranked among the first K, for images still searching
        rank_pos = torch.arange(n_cand, device=dev).unsqueeze(0)  # (1, 2K)
        accept = is_end & (rank_pos < K) & ~done.unsqueeze(1) & torch.isfinite(top_scores)
        if bool(accept.any()):
            length = t + 1
            rank = top_scores / (float(length) ** length_penalty)
            merge(torch.where(accept, rank, torch.full_like(rank, neg_inf)),
                  torch.where(accept, top_scores, torch.full_like(top_scores, neg_inf)),
                  torch.full_like(token, length), c_tok, c_alpha, c_beta)
            n_fin = n_fin + accept.sum(1)

        # the K best non-<end> candidates would continue
        cont_scores, cont = torch.where(is_end, torch.full_like(top_scores, neg_inf),
                                        top_scores).sort(dim=1, descending=True, stable=True)
        cont_scores, cont = cont_scores[:, :K], cont[:, :K]  # (B, K), best first
        if stop == "k_finished":
            done = n_fin >= K
        else:  # the best rank an alive beam could still finish with (module docstring)
            best_alive = cont_scores[:, 0].masked_fill(done, neg_inf)  # (B,)
            bound = torch.maximum(best_alive / (float(t + 2) ** length_penalty),
                                  best_alive / (float(max_length) ** length_penalty))
            done = done | (fin_rank.max(dim=1).values >= bound)
        if bool(done.all()) or t == max_length - 1:
            break
        cont_scores = cont_scores.masked_fill(done.unsqueeze(1), neg_inf)
        sel = cont + torch.arange(B, device=dev).unsqueeze(1) * n_cand  # (B, K) rows of B*2K
        sel = sel.reshape(-1)  # (B*K,)
        beam_scores = cont_scores
        tok_hist = c_tok.reshape(B * n_cand, max_length)[sel]  # (B*K, max_length)
        alpha_hist = c_alpha.reshape(B * n_cand, max_length, L)[sel]  # (B*K, max_length, L)
        beta_hist = c_beta.reshape(B * n_cand, max_length)[sel]  # (B*K, max_length)
        prev = token.reshape(-1)[sel]  # (B*K,)
        state = state.select_recurrent(src.reshape(-1)[sel])

    # images still searching after the last step: the alive beams compete as they stand
    if t == max_length - 1 and not bool(done.all()):
        steps = t + 1
        # last step: the non-<end> candidates of this step are the alive hypotheses
        alive_scores = torch.where(is_end, torch.full_like(top_scores, neg_inf), top_scores)
        alive_scores = alive_scores.masked_fill(done.unsqueeze(1), neg_inf)
        merge(alive_scores / (float(steps) ** length_penalty), alive_scores,
              torch.full_like(token, steps), c_tok, c_alpha, c_beta)

    best = fin_rank.argmax(dim=1)  # (B,)
    ar = torch.arange(B, device=dev)
    lengths = fin_len[ar, best]
    T = int(lengths.max().item()) if B else 0
    return SearchResult(fin_tok[ar, best, :T], lengths, fin_score[ar, best],
                        fin_alpha[ar, best, :T], fin_beta[ar, best, :T])
