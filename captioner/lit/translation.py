r"""LightningModule for attention NMT (Bahdanau, Cho and Bengio 2015) with the shared decoder.

The source sentence is encoded by :class:`~captioner.encoders.text.TextEncoder` into annotations
``(B, S, D)`` with a key mask ``(B, S)``; the target side is the *same*
:class:`~captioner.decoder.AttentionDecoder` that captions images, so the attention variants of
:mod:`captioner.attention` translate too, except those made for a fixed set of positions
(``location``) or an image grid (``local_2d``), which are refused. Shared with captioning, not
copied: the loss (:func:`captioner.losses.masked_nll`, optionally the doubly stochastic
penalty), the search (:mod:`captioner.search` through :func:`captioner.translate.decode`), the
vocabulary, and the training machinery of :class:`captioner.lit.base.CaptionerModule`
(construction from a config, checkpoint metadata carrying the model config and vocabularies,
random-state checkpointing, gathering decoded outputs across ranks).

Training minimises ``-log p(y | x)`` with teacher forcing (Section 3.1: the conditional
log-likelihood of the target given the source), averaged per target token by default.
Validation reports

* ``val/ppl``: perplexity ``exp(sum NLL / number of target tokens)`` under teacher forcing
  (``<end>`` counted, ``<start>`` and padding not);
* ``val/bleu``: sacreBLEU corpus BLEU of the detokenised greedy (or beam) output against the raw
  reference lines (:func:`captioner.translate.sacrebleu_score`; its detail and signature are
  printed with the run's other information).

Test logs ``test/bleu`` and ``test/ppl`` and writes ``test_translations.txt`` and
``test_metrics.json`` (with the sacreBLEU signature) to the run's log folder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from captioner.atomic import atomic_write
from captioner.data.tokenize import MT_TOKENIZER_VERSION, detokenize_mt
from captioner.data.vocabulary import UNK, Vocabulary
from captioner.decoder import AttentionDecoder
from captioner.encoders.text import TextEncoder
from captioner.inference import CheckpointError
from captioner.config import ConfigError, plain
from captioner.lit.base import CaptionerModule, datamodule_record
from captioner.lit.optim import adam
from captioner.metrics import json_safe
from captioner.losses import doubly_stochastic_penalty, masked_nll, sentence_log_likelihood
from captioner.search import SearchResult
from captioner.translate import (TASK, UNK_FOR_BLEU, BleuScore, check_tokenizer_version,
                                 decode, sacrebleu_score)

log = logging.getLogger(__name__)


class TranslationModule(CaptionerModule):
    """Bidirectional-RNN encoder + the captioning attention decoder, trained through Lightning.

    Args:
        encoder: callable ``(src_vocab_size) -> TextEncoder``; in YAML
            ``class_path: captioner.encoders.text.TextEncoder`` with its ``init_args``.
        decoder: callable ``(vocab_size V, encoder_dim D) -> AttentionDecoder``; in YAML
            ``class_path: captioner.decoder.AttentionDecoder`` with its ``init_args``.
        vocab_size: target ``V``, linked from the data module by the CLI.
        src_vocab_size: source vocabulary size, linked from the data module by the CLI.
        doubly_stochastic: ``lambda`` of the doubly stochastic penalty of Xu et al. (Eq. 14)
            over real source words; ``0`` (default) for text, where a target sentence need not
            attend to every source word equally.
        loss_reduction: ``"token"`` (mean NLL per target token, default; the penalty and
            hard attention's REINFORCE terms are divided by the same token count:
            :meth:`~captioner.lit.base.CaptionerModule.caption_term_scale`) or ``"sentence"``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        fused_adam: Adam's fused kernel (:mod:`captioner.lit.optim`; ``False``: its per-tensor loop).
        lr_scheduler: ``"none"`` or ``"plateau"`` (reduce on a ``val/bleu`` plateau).
        plateau_patience: epoch-end validations without improvement before the LR is reduced
            (with ``check_val_every_n_epoch: k`` each counts ``k`` epochs).
        plateau_factor: LR multiplier on a plateau.
        beam_size: beam size at validation / test (``1``: greedy).
        max_length: most target tokens when decoding, ``<end>`` included.
        min_length: fewest target tokens when decoding, ``<end>`` included.
        length_penalty: beam ranking ``score / length ** length_penalty`` (``1``: per-token
            log-probability, the usual length normalisation).
        beam_stop: when beam search stops a sentence: ``"k_finished"`` or ``"exact"``
            (:mod:`captioner.search`).
        hard_lambda_r: hard attention (``decoder.attention_mode: hard``): weight ``lambda_r`` of
            the REINFORCE term of Xu et al.'s Eq. 12, as in captioning.
        hard_lambda_e: hard attention: weight ``lambda_e`` of the entropy term.
        hard_num_samples: hard attention: location sequences sampled per sentence pair (``M``
            of :mod:`captioner.hard_attention`, the paper's ``N`` in Eq. 12); the batch is
            repeated that many times.
    """

    task = TASK
    validation_metrics = ("bleu", "ppl")

    def __init__(
        self,
        encoder: Callable[[int], TextEncoder] = TextEncoder,
        decoder: Callable[[int, int], AttentionDecoder] = AttentionDecoder,
        vocab_size: int = 0,
        src_vocab_size: int = 0,
        doubly_stochastic: float = 0.0,
        loss_reduction: Literal["sentence", "token"] = "token",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        fused_adam: bool = True,
        lr_scheduler: Literal["none", "plateau"] = "none",
        plateau_patience: int = 1,
        plateau_factor: float = 0.5,
        beam_size: int = 1,
        max_length: int = 50,
        min_length: int = 1,
        length_penalty: float = 1.0,
        beam_stop: Literal["k_finished", "exact"] = "k_finished",
        hard_lambda_r: float = 0.1,
        hard_lambda_e: float = 0.002,
        hard_num_samples: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        self.check_options()
        if vocab_size <= 0 or src_vocab_size <= 0:
            raise ConfigError(
                "vocab_size and src_vocab_size must be positive: the CLI links them from the "
                "data module; when building the module by hand pass len(tgt_vocab), "
                "len(src_vocab)")
        self.encoder = encoder(src_vocab_size)
        self.decoder = decoder(vocab_size, self.encoder.out_channels)
        from captioner.attention import LocalAttention2d, LocationAttention

        if isinstance(self.decoder.attention, (LocationAttention, LocalAttention2d)):
            raise ConfigError(
                f"{type(self.decoder.attention).__name__} cannot attend over sentences: "
                "location attention is built for a fixed number of positions, local_2d for an "
                "image grid; use a score over the annotations (additive, dot, general, "
                "scaled_dot, cosine) or local_m / local_p")
        self.vocab: Vocabulary | None = None  # target (the name captioning uses)
        self.src_vocab: Vocabulary | None = None
        self.last_bleu: BleuScore | None = None

    # ---------------------------------------------------------------- vocabularies
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        stored = (self.data_config.get("datamodule") or {}).get("init_args")
        if stored and hasattr(dm, "check_trained_with"):  # loaded from a checkpoint
            dm.check_trained_with(stored, "the checkpoint")
        if self.vocab is None or self.src_vocab is None:
            self.src_vocab, self.vocab = dm.src_vocab, dm.tgt_vocab
        elif (self.src_vocab, self.vocab) != (dm.src_vocab, dm.tgt_vocab):
            dm.set_vocabs(self.src_vocab, self.vocab)  # decode with the checkpoint's vocabularies
        self._check_vocabs()
        self.data_config = {
            "lowercase": bool(getattr(dm, "lowercase", True)),
            "tokenizer_version": MT_TOKENIZER_VERSION,  # how the vocabularies' words were cut
            "datamodule": datamodule_record(dm),
        }

    def _check_vocabs(self) -> None:
        h = self.hparams
        for name, vocab, size in (("target", self.vocab, h.vocab_size),
                                  ("source", self.src_vocab, h.src_vocab_size)):
            if vocab is not None and len(vocab) != size:
                raise CheckpointError(f"{name} vocabulary mismatch: the model was built for "
                                      f"{size} words but the vocabulary has {len(vocab)}")

    # ---------------------------------------------------------------- training
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Annotations ``(B, S, D)`` and key mask ``(B, S)`` of ``batch["src"]``."""
        return self.encoder(batch["src"], batch.get("src_lengths"))

    def loss(self, batch: dict[str, torch.Tensor],
             encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """NLL (plus ``lambda`` times the doubly stochastic penalty) of a batch
        ``{src (B, S), src_lengths (B,), tgt (B, T + 1)}``; also ``tokens``, the number of
        target tokens scored.

        With hard attention in training mode the pairs are repeated ``hard_num_samples`` times
        and the loss adds the REINFORCE terms of Eq. 12, exactly as in captioning
        (:meth:`~captioner.lit.base.CaptionerModule.add_hard_attention_loss`; extra entries
        ``reinforce``, ``reward``, ``baseline``, ``entropy``).
        """
        annotations, mask = self.encode(batch) if encoded is None else encoded
        tgt = batch["tgt"]
        samples = self.hard_samples()
        if samples > 1:
            annotations = annotations.repeat_interleave(samples, 0)  # (B * n, S, D)
            mask = mask.repeat_interleave(samples, 0)  # (B * n, S)
            tgt = tgt.repeat_interleave(samples, 0)  # (B * n, T + 1)
        out = self.decoder(annotations, tgt, mask, skip_padding=True)  # only real tokens are scored
        targets = tgt[:, 1:]  # (B, T)
        pad = self.vocab.pad_id if self.vocab is not None else 0
        steps = targets != pad  # (B, T)
        nll = masked_nll(out.token_logits, targets, pad, self.hparams.loss_reduction,
                         out.positions)  # the computed rows, where they are
        losses = {"loss": nll, "nll": nll, "tokens": steps.sum()}
        if self.hparams.doubly_stochastic > 0:
            # padded source positions get exactly zero weight, so each adds exactly
            # (1 - 0)^2 = 1 to the shared penalty: remove that constant
            dsr = doubly_stochastic_penalty(out.alphas, steps) - (~mask).sum(1).to(out.alphas.dtype).mean()
            losses["dsr"] = dsr
            scale = self.caption_term_scale(targets, pad)  # 1, or B / tokens with "token"
            losses["loss"] = nll + self.hparams.doubly_stochastic * scale * dsr
        self.add_hard_attention_loss(losses, out, targets, pad)
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.loss(batch)
        bs = batch["tgt"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/nll", losses["nll"], batch_size=bs)
        if "dsr" in losses:
            self.log("train/dsr", losses["dsr"], batch_size=bs)
        self.log_hard_attention(losses, bs)
        return losses["loss"]

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, annotations: torch.Tensor, mask: torch.Tensor,
                 beam_size: int | None = None, max_length: int | None = None) -> SearchResult:
        """Decode ``(B, S, D)`` annotations with the module's search settings."""
        h = self.hparams
        return decode(self.decoder, annotations, mask,
                      beam_size=h.beam_size if beam_size is None else beam_size,
                      max_length=h.max_length if max_length is None else max_length,
                      min_length=h.min_length, length_penalty=h.length_penalty,
                      beam_stop=h.get("beam_stop", "k_finished"))

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Decode the batch and score its references under teacher forcing; per pair, kept
        with its ``index`` so that a pair a distributed sampler repeats counts once."""
        annotations, mask = self.encode(batch)
        tgt = batch["tgt"]
        targets = tgt[:, 1:]  # (B, T)
        out = self.decoder(annotations, tgt, mask, skip_padding=True)
        pad = self.vocab.pad_id if self.vocab is not None else 0
        nll = -sentence_log_likelihood(out.token_logits, targets, pad, out.positions)  # (B,)
        tokens = (targets != pad).sum(1)  # (B,)
        result = self.generate(annotations, mask)
        for i, index in enumerate(batch["index"].tolist()):
            n = int(result.lengths[i])
            self._eval_outputs.append({"index": index, "tokens": result.tokens[i, :n].tolist(),
                                       "nll": float(nll[i]), "target_tokens": int(tokens[i])})

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    @staticmethod
    def _perplexity(outputs: list[dict[str, Any]]) -> float:
        """``exp(sum NLL / number of target tokens)`` over the (gathered, unique) pairs."""
        nll = sum(o["nll"] for o in outputs)
        tokens = sum(o["target_tokens"] for o in outputs)
        mean = nll / max(tokens, 1)
        return math.exp(mean) if mean < 700 else math.inf  # a diverged model: inf, not a crash

    def _score(self, stage: str) -> tuple[dict[str, float], list[dict[str, Any]], list[str]]:
        dm = self.trainer.datamodule
        outputs = self._gather_outputs()
        hyps = [detokenize_mt(self.vocab.decode(o["tokens"])) for o in outputs]
        refs = dm.references(stage)
        bleu = sacrebleu_score(hyps, [refs[o["index"]] for o in outputs],
                               lowercase=bool(getattr(dm, "lowercase", True)))
        self.last_bleu = bleu
        # through Lightning's logger, which a run prints (captioner's own is not configured)
        rank_zero_info(f"{stage} {bleu.detail} ({bleu.signature})")
        return {"bleu": bleu.score, "ppl": self._perplexity(outputs)}, outputs, hyps

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._eval_outputs = []
            return
        scores, _, _ = self._score("val")
        for k, v in scores.items():
            self.log(f"val/{k}", float(v), prog_bar=k == "bleu", rank_zero_only=False)
        self.step_plateau(float(scores["bleu"]))
        self._eval_outputs = []

    def on_test_epoch_end(self) -> None:
        scores, outputs, hyps = self._score("test")
        for k, v in scores.items():
            self.log(f"test/{k}", float(v), rank_zero_only=False)
        out_dir = self.results_dir()  # on every rank: log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            self._write_results(out_dir, outputs, hyps, scores)
        self._eval_outputs = []

    def _write_results(self, out_dir: Path, outputs: list[dict[str, Any]], hyps: list[str],
                       scores: dict[str, float]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.keep_earlier_results(out_dir, ("test_translations.txt",
                                                         "test_metrics.json"))
        with atomic_write(out_dir / "test_translations.txt") as f:
            f.write("".join(f"{h}\n" for h in hyps))
        h = self.hparams
        metrics = {**scores, "checkpoint": checkpoint, "signature": self.last_bleu.signature,
                   # the signature cannot say it: the sacrebleu CLI on test_translations.txt
                   # scores <unk> as three tokens ("< unk >"), so it gives a lower BLEU
                   "unk_scored_as": f"{UNK_FOR_BLEU} (one token: replace {UNK} by "
                                    f"{UNK_FOR_BLEU} in test_translations.txt and in the "
                                    "references to reproduce test/bleu with the sacrebleu CLI)",
                   "detail": self.last_bleu.detail, "beam_size": h.beam_size,
                   "length_penalty": h.length_penalty,
                   "beam_stop": h.get("beam_stop", "k_finished"), "sentences": len(outputs)}
        with atomic_write(out_dir / "test_metrics.json") as f:
            json.dump(json_safe(metrics), f, indent=2, allow_nan=False)
        rank_zero_info(f"test translations and metrics written to {out_dir}")

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        optimizer = adam([p for p in self.parameters() if p.requires_grad], h.lr, h.weight_decay,
                         h.get("fused_adam", True), getattr(self, "_trainer", None))
        if h.lr_scheduler == "plateau":
            return self.plateau_scheduler(optimizer, "val/bleu")
        return optimizer

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        config = self.model_config
        if config is not None:  # the CLI records vocab_size only: add the source size
            config = {**config, "init_args": {**config.get("init_args", {}),
                                              "vocab_size": int(self.hparams.vocab_size),
                                              "src_vocab_size": int(self.hparams.src_vocab_size)}}
        return {"model_config": plain(config),
                "vocab": self.vocab.to_dict() if self.vocab is not None else None,
                "src_vocab": self.src_vocab.to_dict() if self.src_vocab is not None else None}

    def resumed_data_config(self, stored: dict[str, Any]) -> dict[str, Any]:
        """As the base class's, but a resumed fit keeps the checkpoint's vocabularies, so the
        record of how their words were cut (``tokenizer_version``) stays the stored one."""
        kept = super().resumed_data_config(stored)
        if kept is stored:
            return kept
        return {**kept, "tokenizer_version": int(stored.get("tokenizer_version", 1))}

    def restore_meta(self, meta: dict[str, Any]) -> None:
        check_tokenizer_version(meta.get("data") or {}, "the checkpoint")
        if meta.get("vocab") is not None and meta.get("src_vocab") is not None:
            self.vocab = Vocabulary.from_dict(meta["vocab"])
            self.src_vocab = Vocabulary.from_dict(meta["src_vocab"])
            self._check_vocabs()
