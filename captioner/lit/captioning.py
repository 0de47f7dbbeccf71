"""LightningModule for image captioning: wraps a plain encoder and decoder.

Training minimises the penalised likelihood of :mod:`captioner.losses` with teacher forcing;
validation and test decode every image exactly once (greedy or beam search) and score the
captions against all references of the image. Metrics are logged as ``train/loss``,
``val/bleu4``, ``test/CIDEr``...
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from captioner.atomic import atomic_write
from captioner.config import ConfigError
from captioner.data.vocabulary import END, PAD, SPECIALS, START, Vocabulary
from captioner.decoder import AttentionDecoder
from captioner.encoders.encoder import ImageEncoder
from captioner.evaluation import empty_captions_warning, image_size_warning, same_image_size
from captioner.inference import CheckpointError
from captioner.lit.base import CaptionerModule, datamodule_record
from captioner.lit.optim import adam, rmsprop
from captioner.losses import doubly_stochastic_penalty, masked_nll
from captioner.search import SearchResult, beam_search, greedy_search

log = logging.getLogger(__name__)


class CaptioningModule(CaptionerModule):
    """Show, Attend and Tell trained through Lightning.

    Args:
        encoder: the image encoder (``class_path: captioner.encoders.ImageEncoder`` in YAML).
        decoder: callable ``(vocab_size V, encoder_dim D) -> decoder``; in YAML
            ``class_path: captioner.decoder.AttentionDecoder`` with its ``init_args``.
        vocab_size: ``V``, linked from the data module by the CLI.
        doubly_stochastic: ``lambda`` of the doubly stochastic regularisation (Eq. 14).
            ``None`` (the default) takes the paper's: 1 under soft attention (Section 4.2.1,
            where Eq. 14 is introduced) and 0 under hard attention (Section 4.1 trains the bound
            ``L_s`` alone; in the authors' code the penalty has no effect there either:
            :mod:`captioner.hard_attention`). The value used is stored in the hyperparameters;
            a fit resumed without the option keeps its checkpoint's.
        loss_reduction: ``"sentence"`` (paper: ``-log P(y|x)`` per caption) or ``"token"``
            (every term of the loss, the penalty and hard attention's REINFORCE terms too,
            divided by the number of target tokens instead of captions:
            :meth:`~captioner.lit.base.CaptionerModule.caption_term_scale`).
        lr: learning rate of the decoder (and encoder stages).
        encoder_lr: learning rate of every trained backbone parameter: the blocks
            ``finetune_blocks`` unfreezes in a pretrained backbone, or the whole backbone
            with ``freeze: false`` (a CNN trained from scratch, as the shapes configs do; they
            set it explicitly). Encoder stages (Spatial Transformer, Non-local) train at ``lr``.
        weight_decay: Adam weight decay.
        fused_adam: Adam's fused kernel (:mod:`captioner.lit.optim`; ``False``: its per-tensor loop).
        optimizer: ``"adam"`` (the paper's choice for Flickr30k / COCO) or ``"rmsprop"`` (its
            choice for Flickr8k, as in the authors' code: :func:`captioner.lit.optim.rmsprop`).
        lr_scheduler: ``"none"`` or ``"plateau"`` (reduce on a ``val/bleu4`` plateau).
        plateau_patience: epoch-end validations without improvement before the LR is reduced
            (with ``check_val_every_n_epoch: k`` each counts ``k`` epochs).
        plateau_factor: LR multiplier on a plateau.
        beam_size: beam size at validation / test (``1``: greedy).
        max_length: maximum caption length (steps) when decoding.
        min_length: minimum caption length (tokens incl. ``<end>``) when decoding.
        length_penalty: exponent of beam search length normalisation.
        beam_stop: when beam search stops an image: ``"k_finished"`` (``K`` hypotheses ended)
            or ``"exact"`` (no alive beam can outrank the best ended one; see
            :mod:`captioner.search`).
        hard_lambda_r: hard attention (``decoder.attention_mode: hard``): weight ``lambda_r`` of
            the REINFORCE term of Eq. 12 (default 0.1, the number of arctic-captions' ``1/10``;
            as we read their code, their reward was averaged per time step and their gradients
            summed over the batch, so it weighs the term differently there).
        hard_lambda_e: hard attention: weight ``lambda_e`` of the entropy term (default 0.002,
            the number of arctic-captions' ``alpha_entropy_c``, on the same terms).
        hard_num_samples: hard attention: location sequences sampled per caption (``M`` of
            :mod:`captioner.hard_attention`, the paper's ``N`` in Eq. 12); the batch is
            repeated that many times.
    """

    task = "captioning"
    validation_metrics = ("bleu1", "bleu2", "bleu3", "bleu4", "attention_correctness",
                          "attention_chance")

    def __init__(
        self,
        encoder: ImageEncoder,
        decoder: Callable[[int, int], AttentionDecoder] = AttentionDecoder,
        vocab_size: int = 0,
        doubly_stochastic: float | None = None,
        loss_reduction: Literal["sentence", "token"] = "sentence",
        lr: float = 4e-4,
        encoder_lr: float = 1e-4,
        weight_decay: float = 0.0,
        fused_adam: bool = True,
        optimizer: Literal["adam", "rmsprop"] = "adam",
        lr_scheduler: Literal["none", "plateau"] = "none",
        plateau_patience: int = 2,
        plateau_factor: float = 0.5,
        beam_size: int = 1,
        max_length: int = 20,
        min_length: int = 1,
        length_penalty: float = 0.0,
        beam_stop: Literal["k_finished", "exact"] = "k_finished",
        hard_lambda_r: float = 0.1,
        hard_lambda_e: float = 0.002,
        hard_num_samples: int = 1,
    ) -> None:
        super().__init__()
        if vocab_size <= 0:
            raise ConfigError(
                "vocab_size must be positive: it is linked from the data module by the CLI; "
                "when building the module by hand pass len(vocab)"
            )
        self.encoder = encoder
        self.decoder = decoder(vocab_size, encoder.out_channels)
        if getattr(encoder, "grid_size", None) is not None:
            self.decoder.use_grid(encoder.grid_size)
        self._paper_doubly_stochastic = doubly_stochastic is None
        if doubly_stochastic is None:  # the paper's: Eq. 14 belongs to soft attention
            doubly_stochastic = 0.0 if self.decoder.hard is not None else 1.0
        self.save_hyperparameters(ignore=["encoder", "decoder"])
        # the value used, also where LightningCLI's instantiation gave the config's (None) to
        # save_hyperparameters, and in hparams_initial (what hparams.yaml shows)
        self.hparams.doubly_stochastic = doubly_stochastic
        if isinstance(getattr(self, "_hparams_initial", None), dict):
            self._hparams_initial["doubly_stochastic"] = doubly_stochastic
        self.check_options()
        self.vocab: Vocabulary | None = None

    # ---------------------------------------------------------------- vocabulary
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        if self.vocab is None:
            self.vocab = dm.vocab
        elif self.vocab != dm.vocab and hasattr(dm, "set_vocab"):
            dm.set_vocab(self.vocab)  # decode with the checkpoint's vocabulary
        self._check_vocab()
        trainable = [n for n, p in self.encoder.named_parameters() if p.requires_grad]
        if getattr(dm, "features_dir", None) is not None and trainable and stage == "fit":
            raise ConfigError(
                f"the data module serves cached encoder features ({dm.features_dir}), but the "
                f"encoder has {len(trainable)} trainable parameter tensors (e.g. {trainable[0]}: "
                "freeze: false, finetune_blocks or encoder stages), which would never train; "
                "use freeze: true and finetune_blocks: 0 without stages, or train from images")
        record = datamodule_record(dm)
        self.data_config = {"image_size": record["init_args"].get("image_size"),
                            "datamodule": record}

    def resumed_data_config(self, stored: dict[str, Any]) -> dict[str, Any]:
        """As the base class's, warning where this run reads the images at another size than
        the checkpoint was trained at (``captioner test --ckpt_path`` with a data config of
        another ``image_size`` scored another input resolution, silently)."""
        kept = super().resumed_data_config(stored)
        trained, used = stored.get("image_size"), kept.get("image_size")
        if trained and used and not same_image_size(trained, used):
            trainer = self._trainer
            if trainer is not None and trainer.state.fn == "fit":  # may be meant: said plainly
                rank_zero_warn(f"{self._checkpoint_file()}the resumed fit reads the images at "
                               f"image_size {used}; the checkpoint was trained at {trained}")
            else:
                rank_zero_warn(f"{self._checkpoint_file()}{image_size_warning(trained, used)}")
        return kept

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.check_feature_cache()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.trainer.state.fn != TrainerFn.FITTING:  # fit checked once at its start
            self.check_feature_cache()

    def on_test_start(self) -> None:
        super().on_test_start()
        self.check_feature_cache()

    def check_feature_cache(self) -> None:
        """Features from a cache must be those of this model's encoder (its fingerprint: weights,
        buffers and input size; and its grid): checked at the start of fit, validate and test,
        once the weights are final (after a checkpoint is restored).

        Raises:
            captioner.config.ConfigError: the cache was made by another encoder or grid.
        """
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "features_dir", None) is None:
            return
        from captioner.features import encoder_fingerprint

        if tuple(dm.cache.grid_size) != tuple(self.encoder.grid_size):
            (h, w), (h_c, w_c) = self.encoder.grid_size, dm.cache.grid_size
            raise ConfigError(
                f"the feature cache {dm.features_dir} holds {h_c} x {w_c} grids, but this "
                f"model's encoder pools to {h} x {w} (its grid_size): the checkpoint would "
                "describe another model than the one trained. Set the encoder's grid_size to "
                f"[{h_c}, {w_c}] or extract the cache with this model")
        cached = dm.cache.index.get("fingerprint")
        dtypes = {p.dtype for p in self.encoder.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:  # bf16-true / 16-true: the fingerprint of the cast weights
            name = str(next(iter(dtypes - {torch.float32}))).removeprefix("torch.")
            cached = (dm.cache.index.get("fingerprints") or {}).get(name)
            if cached is None:
                log.warning("the encoder runs in %s (true half precision) and the feature cache "
                            "%s, extracted before such fingerprints were kept, has none to "
                            "compare with; make sure the cache was extracted with this "
                            "encoder (running its extract-features again adds them)",
                            name, dm.features_dir)
                return
        if dm.cache.index.get("precision", "32") != "32":
            log.info("the feature cache %s was extracted in %s: its grids differ from what "
                     "this encoder computes in float32 by the network's %s error",
                     dm.features_dir, dm.cache.index["precision"], dm.cache.index["precision"])
        mine = encoder_fingerprint(self.encoder, dm.image_size,
                                   version=int(dm.cache.index.get("fingerprint_version", 1)))
        if mine != cached:
            raise ConfigError(
                f"the feature cache {dm.features_dir} was extracted with another encoder "
                f"(fingerprint {cached}; this model's is {mine}): its grids are not what this "
                "model's encoder computes. Extract it with this model's encoder (captioner "
                "extract-features --config <data and model configs> or --ckpt <checkpoint>)")

    def _check_vocab(self) -> None:
        if self.vocab is not None and len(self.vocab) != self.hparams.vocab_size:
            raise CheckpointError(
                f"vocabulary mismatch: the model was built for {self.hparams.vocab_size} words "
                f"but the vocabulary has {len(self.vocab)}"
            )

    # ---------------------------------------------------------------- training
    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Annotations ``(B, L, D)`` from ``batch["features"]`` (cached) or ``batch["images"]``."""
        if "features" in batch:
            return batch["features"].to(self.dtype if self.dtype.is_floating_point else torch.float)
        return self.encoder(batch["images"])

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Penalised NLL of a batch ``{images (B, 3, H, W), captions (B, T + 1)}``.

        With hard attention in training mode (Section 4.1) the captions are repeated
        ``hard_num_samples`` times, the NLL is that of the sampled locations and the loss adds
        the REINFORCE surrogate (:func:`captioner.losses.reinforce_surrogate`); the baseline
        ``b`` is then updated. Extra entries: ``reward`` (mean ``log p(y | s~, a)`` of the
        sampled captions), ``baseline`` (``b`` used), ``entropy`` (mean ``H[s]``).
        """
        captions = batch["captions"]
        annotations = self.encode(batch)
        samples = self.hard_samples()
        if samples > 1:
            annotations = annotations.repeat_interleave(samples, 0)  # (B * M, L, D)
            captions = captions.repeat_interleave(samples, 0)  # (B * M, T + 1)
        out = self.decoder(annotations, captions, skip_padding=True)  # only real tokens are scored
        targets = captions[:, 1:]  # (B, T)
        pad = self.vocab.pad_id if self.vocab is not None else 0
        nll = masked_nll(out.token_logits, targets, pad, self.hparams.loss_reduction,
                         out.positions)  # the computed rows, where they are
        dsr = doubly_stochastic_penalty(out.alphas, targets != pad)
        scale = self.caption_term_scale(targets, pad)  # 1, or B / tokens with "token"
        losses = {"loss": nll + self.hparams.doubly_stochastic * scale * dsr, "nll": nll,
                  "dsr": dsr}
        self.add_hard_attention_loss(losses, out, targets, pad)
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.loss(batch)
        bs = batch["captions"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/nll", losses["nll"], batch_size=bs)
        self.log("train/dsr", losses["dsr"], batch_size=bs)
        self.log_hard_attention(losses, bs)
        return losses["loss"]

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, annotations: torch.Tensor, beam_size: int | None = None,
                 max_length: int | None = None, min_length: int | None = None) -> SearchResult:
        """Decode ``(B, L, D)`` annotations with the module's search settings."""
        h = self.hparams
        k = h.beam_size if beam_size is None else beam_size
        kw = dict(start_id=SPECIALS.index(START), end_id=SPECIALS.index(END), pad_id=SPECIALS.index(PAD),
                  max_length=h.max_length if max_length is None else max_length,
                  min_length=h.min_length if min_length is None else min_length)
        if k <= 1:
            return greedy_search(self.decoder, annotations, **kw)
        return beam_search(self.decoder, annotations, beam_size=k,
                           length_penalty=h.length_penalty,
                           stop=h.get("beam_stop", "k_finished"), **kw)

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        from captioner.grid_frame import encoder_thetas

        annotations = self.encode(batch)
        # where each image's grid looked (a Spatial Transformer moved the view), else None
        thetas = None if "features" in batch else encoder_thetas(self.encoder)
        result = self.generate(annotations)
        for i, index in enumerate(batch["index"].tolist()):
            n = int(result.lengths[i])
            self._eval_outputs.append({
                "index": index,
                "tokens": result.tokens[i, :n].tolist(),
                "alphas": result.alphas[i, :n].float().cpu(),
                "theta": None if thetas is None else thetas[i],  # (2, 3)
            })

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def _score(self, split: str) -> dict[str, float]:
        from captioner.metrics import corpus_bleu

        dm = self.trainer.datamodule
        outputs = self._gather_outputs()
        refs = dm.references(split)
        hyps = [self.vocab.decode(o["tokens"]) for o in outputs]
        warning = empty_captions_warning(hyps, split)
        if warning:
            log.warning(warning)
        scores = corpus_bleu(hyps, [refs[o["index"]] for o in outputs])
        records = dm.records(split)
        if any(records[o["index"]].boxes for o in outputs):
            scores.update(self._attention_correctness(outputs, hyps, records))
        self._last_outputs = (outputs, hyps)
        return scores

    def _attention_correctness(self, outputs, hyps, records) -> dict[str, float]:
        from captioner.evaluation import upright_boxes
        from captioner.metrics import attention_correctness

        alphas, words, boxes, sizes, thetas = [], [], [], [], []
        for o, hyp in zip(outputs, hyps):
            rec_boxes, size = upright_boxes(records[o["index"]])  # size: (H_img, W_img)
            alphas.append(o["alphas"][: len(hyp)].numpy())
            words.append(hyp)
            boxes.append(rec_boxes)
            sizes.append(size)
            thetas.append(o.get("theta"))
        res = attention_correctness(alphas, words, boxes, self.encoder.grid_size, sizes,
                                    thetas=thetas)
        return {"attention_correctness": res["attention_correctness"],
                "attention_chance": res["chance"]}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._eval_outputs = []
            return
        scores = self._score("val")
        for k, v in scores.items():
            self.log(f"val/{k}", float(v), prog_bar=k == "bleu4", sync_dist=False,
                     rank_zero_only=False)
        self.step_plateau(float(scores["bleu4"]))
        self._eval_outputs = []

    def on_test_epoch_end(self) -> None:
        scores = self._score("test")
        outputs, hyps = self._last_outputs
        records = self.trainer.datamodule.records("test")
        coco, protocol = self._coco_scores(records, outputs, hyps)
        scores.update(coco)
        for k, v in scores.items():
            self.log(f"test/{k}", float(v), sync_dist=False, rank_zero_only=False)
        out_dir = self.results_dir()  # on every rank: log_dir is a collective under DDP
        if self.trainer.is_global_zero:
            self._write_results(out_dir, records, outputs, hyps, scores, protocol)
        self._eval_outputs = []

    def _coco_scores(self, records, outputs, hyps) -> tuple[dict[str, float], dict[str, Any]]:
        """The COCO metrics, and how they were obtained (``tokenizer``; ``skipped`` parts with
        the reason, e.g. SPICE without its jars), as ``captioner evaluate`` records them."""
        from captioner.metrics import coco_caption_scores

        refs = {records[o["index"]].image_id: list(records[o["index"]].captions) for o in outputs}
        res = {records[o["index"]].image_id: " ".join(h) for o, h in zip(outputs, hyps)}
        result = coco_caption_scores(refs, res)
        return dict(result.scores), {"tokenizer": result.tokenizer,
                                     "skipped": dict(result.skipped)}

    def _write_results(self, out_dir, records, outputs, hyps, scores, protocol) -> None:
        from captioner.metrics import json_safe, write_coco_results

        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.keep_earlier_results(out_dir, ("test_captions.json",
                                                         "test_metrics.json"))
        write_coco_results({records[o["index"]].image_id: " ".join(h)
                            for o, h in zip(outputs, hyps)}, out_dir / "test_captions.json",
                           files={records[o["index"]].image_id: records[o["index"]].path
                                  for o in outputs})
        h = self.hparams
        n_refs = [len(records[o["index"]].captions) for o in outputs]
        search = {"checkpoint": checkpoint,  # None: the model of the fit just run
                  "beam_size": int(h.beam_size), "max_length": int(h.max_length),
                  "min_length": int(h.get("min_length", 1)),
                  "length_penalty": float(h.length_penalty),
                  "beam_stop": h.get("beam_stop", "k_finished"),  # how the captions were decoded
                  "precision": str(self.trainer.precision),  # bf16 moves the scores a little
                  "images": len(outputs),
                  "image_size": (self.data_config or {}).get("image_size"),
                  "references_per_image": {"min": min(n_refs), "mean": sum(n_refs) / len(n_refs),
                                           "max": max(n_refs)}}
        overlap = getattr(self, "training_images_in_split", None)  # set by the CLI
        if overlap is not None:
            search["training_images_in_split"] = overlap
        with atomic_write(out_dir / "test_metrics.json") as f:
            json.dump(json_safe({**{k: float(v) for k, v in scores.items()}, **search,
                                 **protocol}),
                      f, indent=2, allow_nan=False)  # an undefined score is null, not NaN
        rank_zero_info(f"test captions and metrics written to {out_dir}")

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        backbone = [p for p in self.encoder.body.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": h.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": h.encoder_lr})
        if h.get("optimizer", "adam") == "rmsprop":
            optimizer = rmsprop(groups, h.lr, h.weight_decay)
        else:
            optimizer = adam(groups, h.lr, h.weight_decay, h.get("fused_adam", True),
                             getattr(self, "_trainer", None))
        if h.lr_scheduler == "plateau":
            return self.plateau_scheduler(optimizer, "val/bleu4")
        return optimizer

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"vocab": self.vocab.to_dict() if self.vocab is not None else None,
                "grid_size": list(self.encoder.grid_size)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """As :meth:`CaptionerModule.on_load_checkpoint`; a fit resumed without an explicit
        ``doubly_stochastic`` keeps the value the checkpoint was trained with (hard-attention
        checkpoints from before the default became 0 under hard attention trained with 1)."""
        super().on_load_checkpoint(checkpoint)
        trained = (checkpoint.get("hyper_parameters") or {}).get("doubly_stochastic")
        if self._paper_doubly_stochastic and isinstance(trained, (int, float)):
            self.hparams.doubly_stochastic = float(trained)

    def restore_meta(self, meta: dict[str, Any]) -> None:
        if meta.get("vocab") is not None:
            self.vocab = Vocabulary.from_dict(meta["vocab"])
            self._check_vocab()
