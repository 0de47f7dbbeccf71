"""Lightning data modules: annotation files -> records -> vocabulary -> DataLoaders.

:class:`CaptionDataModule` reads one of the supported formats (COCO, Karpathy JSON, Kaggle
Flickr8k CSV), fixes the train/val/test splits, builds the vocabulary from the *training*
captions and serves

* ``train_dataloader``: shuffled (image, caption) pairs, :func:`collate_captions` batches
  (with ``same_length_batches``, the paper's batches of one caption length);
* ``val/test/predict_dataloader``: each image once, :func:`collate_images` batches, whose
  ``index`` selects the image's references in :meth:`CaptionDataModule.references`.

Everything is lazy and cached: annotation files are parsed once, on the first access to
:meth:`~CaptionDataModule.records`, :attr:`~CaptionDataModule.vocab` or
:attr:`~CaptionDataModule.vocab_size`. ``vocab_size`` works right after construction, so a
LightningCLI config can link it to the model::

    parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

The vocabulary is part of the module's ``state_dict`` and therefore of every checkpoint.

:class:`ShapesDataModule` generates the synthetic shapes set (:mod:`captioner.data.shapes`) on
first use and reads it as COCO with boxes.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.config import NON_NEGATIVE, POSITIVE, ConfigError, check_ranges
from captioner.data.datasets import (
    CaptionTrainDataset,
    ImageEvalDataset,
    collate_captions,
    collate_images,
)
from captioner.data.formats import (
    SPLITS,
    AnnotationError,
    AnnotationWarning,
    ImageRecord,
    assign_splits,
    drop_unreadable,
    load_coco,
    load_kaggle_flickr8k,
    load_karpathy,
)
from captioner.data.samplers import (SameLengthBatchSampler, batch_sampler_order, epoch_sampler,
                                     loader_generator, run_seed, trainer_epoch)
from captioner.data.tokenize import tokenize
from captioner.data.vocabulary import (MORE_THAN_SPECIALS, Vocabulary, check_coverage,
                                        count_tokens)

__all__ = ["CaptionDataModule", "ShapesDataModule"]

DataFormat = Literal["coco", "karpathy", "flickr8k_csv", "custom"]


class CaptionDataModule(L.LightningDataModule):
    """Image-caption data from annotation files.

    Args:
        format: ``"coco"`` (captions JSON, optional instances JSON), ``"karpathy"`` (one split
            JSON such as ``dataset_coco.json``), ``"flickr8k_csv"`` (Kaggle ``captions.txt``) or
            ``"custom"``: read by a subclass's :meth:`parse_records` (see below).
        annotations: The annotation file; for ``coco`` also a mapping split -> captions JSON
            (keys among ``train``/``val``/``test``; a split left out is empty).
        image_root: Image folder (Karpathy: the root its ``filepath`` is relative to); for
            ``coco`` with per-split annotations also a mapping split -> folder.
        instances: ``coco`` only: instances JSON (or mapping split -> JSON) whose boxes fill
            ``ImageRecord.boxes``.
        image_size: Images are resized to ``image_size x image_size``.
        batch_size: Training batch size (caption pairs).
        eval_batch_size: Batch size (images) of val/test/predict; default ``batch_size``.
        num_workers: DataLoader worker processes (persistent when > 0).
        min_freq: A training word seen fewer times becomes ``<unk>``.
        max_vocab_size: Largest vocabulary, the 4 specials included (``None``: no limit).
        max_caption_length: Longest training caption in tokens, ``<start>``/``<end>`` included.
        val_fraction: Share of unsplit images (single COCO file, Flickr8k CSV) for validation.
        test_fraction: Share of unsplit images for test.
        split_seed: Seed of the deterministic split of unsplit images.
        split_method: ``"rank"`` (exact counts; adding or removing images moves a few others
            between splits) or ``"hash"`` (each image's split from its own hash: stable as
            the data set grows, counts approximate); :func:`~captioner.data.formats.assign_splits`.
        skip_bad: Skip bad annotation entries (empty captions, missing or unreadable images)
            with one warning per file, instead of failing. Images are decoded once for this
            (only the ``max_images`` kept, if set), after the splits are drawn, so that an
            unreadable one never moves another image to another split (a missing file, left
            out as the annotations are read, still can).
        max_images: Keep only the first ``max_images`` images of *each* split (quick runs).
        vocab_file: Load the vocabulary from this JSON (:meth:`Vocabulary.save`) instead of
            building it from the training captions.
        same_length_batches: Training batches hold captions of one length, as in the paper
            (Xu et al. 2015, Sec. 4.3; :class:`~captioner.data.samplers.SameLengthBatchSampler`):
            no padded steps, and up to one smaller batch per distinct length per epoch. Off:
            batches of ``batch_size`` random captions (padded steps are skipped, not computed).
        max_captions_per_image: Keep only the first ``max_captions_per_image`` captions of each
            image, in file order, for training, the vocabulary and the references alike. The
            paper discards MS COCO's captions in excess of 5, for consistency across its data
            sets (Xu et al. 2015, Sec. 5.1): ``5`` reproduces that; ``None`` keeps all (COCO
            has 5-7 per image).

    Attributes:
        decode_images: whether ``skip_bad`` decodes the images (``False`` in the cached-feature
            data modules, which never read them).

    A new annotation format is a subclass that overrides :meth:`parse_records` and is given
    ``format: custom`` (in YAML: ``data: {class_path: mypackage.MyData, init_args: {format:
    custom, annotations: ..., image_root: ...}}``); splitting, ``max_images``, the vocabulary,
    ``skip_bad``'s image check and the loaders are this class's.
    """

    decode_images: bool = True
    #: the training order is a function of the run's seed and the epoch (:func:`run_seed`):
    #: a resumed fit keeps the checkpoint's seed (:class:`captioner.lit.base.CaptionerModule`)
    order_from_run_seed: bool = True

    def __init__(
        self,
        format: DataFormat,
        annotations: str | dict[str, str],
        image_root: str | dict[str, str],
        instances: str | dict[str, str] | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        min_freq: int = 5,
        max_vocab_size: int | None = None,
        max_caption_length: int = 50,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        skip_bad: bool = False,
        max_images: int | None = None,
        vocab_file: str | None = None,
        split_method: Literal["rank", "hash"] = "rank",
        same_length_batches: bool = False,
        max_captions_per_image: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in ("coco", "karpathy", "flickr8k_csv", "custom"):
            raise ConfigError(f"unknown data format {format!r}")
        if format == "custom" and type(self).parse_records is CaptionDataModule.parse_records:
            raise ConfigError(f"{type(self).__name__}: format 'custom' is for a subclass that "
                              "overrides parse_records()")
        per_split = isinstance(annotations, Mapping) or isinstance(image_root, Mapping)
        if format not in ("coco", "custom") and per_split:
            raise ConfigError(f"format {format!r} takes a single annotation file and image folder")
        if format not in ("coco", "custom") and instances is not None:
            raise ConfigError("instances (object boxes) are only read for format 'coco'")
        if isinstance(annotations, Mapping):
            _check_split_keys(annotations, "annotations")
            for name, value in (("image_root", image_root), ("instances", instances)):
                if isinstance(value, Mapping):
                    _check_split_keys(value, name)
        elif isinstance(image_root, Mapping) or isinstance(instances, Mapping):
            raise ConfigError("per-split image_root/instances need per-split annotations too")
        if max_images is not None and max_images < 1:
            raise ConfigError(f"max_images must be >= 1 (images per split) or null, got "
                              f"{max_images}")
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be >= 0 with a sum < 1 (the "
                              f"rest trains), got {val_fraction} and {test_fraction}")
        if max_caption_length < 3:  # 2 would cut every caption to <start> <end>
            raise ConfigError(f"max_caption_length must be >= 3 (<start>, a word, <end>), got "
                              f"{max_caption_length}")
        check_ranges(type(self).__name__, "data", dict(
            image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, min_freq=min_freq, max_vocab_size=max_vocab_size,
            max_captions_per_image=max_captions_per_image), {
            "image_size": POSITIVE, "batch_size": POSITIVE, "eval_batch_size": POSITIVE,
            "num_workers": NON_NEGATIVE, "min_freq": POSITIVE, "max_vocab_size": MORE_THAN_SPECIALS,
            "max_captions_per_image": POSITIVE})
        self.format = format
        self.annotations = annotations
        self.image_root = image_root
        self.instances = instances
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.min_freq = min_freq
        self.max_vocab_size = max_vocab_size
        self.max_caption_length = max_caption_length
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        if split_method not in ("rank", "hash"):
            raise ConfigError(f"split_method must be 'rank' or 'hash', got {split_method!r}")
        self.split_method = split_method
        self.same_length_batches = same_length_batches
        self.skip_bad = skip_bad
        self.max_images = max_images
        self.max_captions_per_image = max_captions_per_image
        self.vocab_file = vocab_file
        self._records: dict[str, list[ImageRecord]] | None = None
        self._vocab: Vocabulary | None = None
        self._references: dict[str, list[list[list[str]]]] = {}
        self._datasets: dict[str, Dataset[dict[str, Any]]] = {}

    # ------------------------------------------------------------------ records
    def records(self, split: str) -> list[ImageRecord]:
        """The images of a split (annotation files are parsed on the first call only).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            The split's records; eval batches' ``index`` points into this list.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self._records is None:
            self._records = self._load_records()
        return self._records[split]

    def _load_records(self) -> dict[str, list[ImageRecord]]:
        """Parse the annotations, split unsplit images, apply ``max_images``, then (``skip_bad``)
        leave out each split's unreadable images. Splitting comes first, so the splits do not
        depend on which images turn out unreadable (corrupt, truncated; missing files are left
        out by the loaders, before), and are the same for the raw-image and cached-feature
        modules, with or without ``max_images``."""
        by_split = self.split_records(warn=True)
        if self.skip_bad:  # decode only the images kept
            by_split = {split: self._readable(rs, split) for split, rs in by_split.items()}
        return by_split

    def split_records(self, warn: bool = False) -> dict[str, list[ImageRecord]]:
        """The splits as drawn: the annotations parsed (``max_captions_per_image`` applied),
        unsplit images split, ``max_images`` applied, before ``skip_bad`` leaves out unreadable
        images (no image is decoded here; :meth:`records` is what training and evaluation
        read).

        Args:
            warn: warn of images that are in more than one split.
        """
        records = self.parse_records()
        if self.max_captions_per_image is not None:
            cap = self.max_captions_per_image
            records = [r if len(r.captions) <= cap else replace(r, captions=r.captions[:cap])
                       for r in records]
        records = assign_splits(records, self.val_fraction, self.test_fraction, self.split_seed,
                                self.split_method)
        by_split: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
        for record in records:
            by_split[record.split or "train"].append(record)
        if warn:
            _warn_of_shared_images(by_split, self.annotations)
        if self.max_images is not None:
            by_split = {split: rs[: self.max_images] for split, rs in by_split.items()}
        return by_split

    def _readable(self, records: list[ImageRecord], split: str) -> list[ImageRecord]:
        """With ``skip_bad``, the records of ``split`` whose image decodes (each decoded once
        here; none when ``decode_images`` is off). The cached-feature modules leave out instead
        the images their extraction found unreadable."""
        if not self.decode_images:
            return records
        return drop_unreadable(records, str(self._source(split)))

    def _source(self, split: str) -> Any:
        """The annotation file ``split`` comes from (its own of per-split files, if it has one)."""
        return (self.annotations.get(split, self.annotations)
                if isinstance(self.annotations, Mapping) else self.annotations)

    def parse_records(self) -> list[ImageRecord]:
        """Read the annotation files into records (``split`` set where the data defines it,
        ``None`` for images that :func:`~captioner.data.formats.assign_splits` should split).

        The hook for a new annotation format: a subclass reads ``self.annotations`` and
        ``self.image_root`` (and its own arguments) and returns
        :class:`~captioner.data.formats.ImageRecord` s. Raise
        :class:`~captioner.data.formats.AnnotationError` naming the file and line for bad
        entries (or skip them when ``self.skip_bad``); with ``skip_bad`` the images are then
        decoded once and the unreadable ones dropped for it.
        """
        if self.format != "coco":
            load = load_karpathy if self.format == "karpathy" else load_kaggle_flickr8k
            return load(self.annotations, self.image_root, skip_bad=self.skip_bad,  # type: ignore[arg-type]
                        check_images=False,  # decoded after the split
                        image_exists=self._image_exists)
        if not isinstance(self.annotations, Mapping):
            return load_coco(
                self.annotations,
                self.image_root,  # type: ignore[arg-type]
                split=None,
                instances_file=self.instances,  # type: ignore[arg-type]
                skip_bad=self.skip_bad,
                check_images=False,  # decoded after the split (_load_records)
                image_exists=self._image_exists,
            )
        records: list[ImageRecord] = []
        for split, file in self.annotations.items():
            records += load_coco(
                file,
                _per_split(self.image_root, split, "image_root"),
                split=split,
                instances_file=_per_split(self.instances, split, "instances", optional=True),
                skip_bad=self.skip_bad,
                check_images=False,  # decoded after the split (_load_records)
                image_exists=self._image_exists,
            )
        return records

    def _image_exists(self, path: Path) -> bool:
        """Whether the image of an annotation is there: its file (the parsers' test)."""
        return path.is_file()

    def references(self, split: str) -> list[list[list[str]]]:
        """Tokenised reference captions, ``references(split)[index]`` for eval image ``index``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            Per image, its captions as token lists.
        """
        if split not in self._references:
            self._references[split] = [
                [tokenize(caption) for caption in record.captions] for record in self.records(split)
            ]
        return self._references[split]

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary: imposed (:meth:`set_vocab`, checkpoint), loaded from ``vocab_file``,
        or built from the training captions with ``min_freq`` / ``max_vocab_size``."""
        if self._vocab is None and self.vocab_file is None:
            self._vocab = self.built_vocabulary()[0]
        elif self._vocab is None:
            vocab = Vocabulary.load(self.vocab_file)
            if self.records("train"):  # none: a data config to evaluate on
                check_coverage(vocab, self._training_counts(), "the training captions",
                               loaded_from=f"vocab_file {self.vocab_file}")
            self._vocab = vocab
        return self._vocab

    def built_vocabulary(self, check: bool = True) -> tuple[Vocabulary, Counter[str]]:
        """The vocabulary the training captions give with ``min_freq`` / ``max_vocab_size``
        (whatever :meth:`set_vocab` imposed or ``vocab_file`` names; nothing is stored), and
        their token counts.

        Args:
            check: refuse a vocabulary that covers too little of the captions
                (:func:`~captioner.data.vocabulary.check_coverage`).
        """
        train = self.records("train")
        if not train:
            raise ConfigError("cannot build a vocabulary: the training split is empty "
                              "(check the annotations' splits, val_fraction and "
                              "test_fraction, or give vocab_file)")
        counts = self._training_counts()
        vocab = Vocabulary.from_counts(counts, min_freq=self.min_freq,
                                       max_size=self.max_vocab_size)
        if check:
            check_coverage(vocab, counts, f"the training captions (min_freq {self.min_freq}, "
                                          f"max_vocab_size {self.max_vocab_size})")
        return vocab, counts

    def _training_counts(self) -> Counter[str]:
        """Token -> occurrences in the training captions (as tokenised for the vocabulary)."""
        return count_tokens(tokenize(c) for record in self.records("train")
                            for c in record.captions)

    @property
    def vocab_size(self) -> int:
        """``V``, the vocabulary size (parses the annotations if not done yet)."""
        return len(self.vocab)

    def set_vocab(self, vocab: Vocabulary) -> None:
        """Impose a vocabulary (e.g. a checkpoint's); datasets encoded with another are dropped.

        Args:
            vocab: The vocabulary to use from now on.
        """
        if self._vocab != vocab:
            self._datasets.pop("train", None)
        self._vocab = vocab

    def state_dict(self) -> dict[str, Any]:
        """``{"vocab": vocab.to_dict()}``: saved into checkpoints by Lightning."""
        return {"vocab": self.vocab.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the vocabulary stored by :meth:`state_dict`.

        Args:
            state_dict: The dict :meth:`state_dict` returned.
        """
        if "vocab" in state_dict:
            self.set_vocab(Vocabulary.from_dict(state_dict["vocab"]))

    # ------------------------------------------------------------------ datasets and loaders
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (``fit``: train + val; ``validate``: val;
        ``test``/``predict``: test; ``None``: all)."""
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", SPLITS)
        for split in needed:
            self._dataset(split)

    def _dataset(self, split: str) -> Dataset[dict[str, Any]]:
        """The (cached) training pairs for ``train``, images-once datasets otherwise."""
        if split not in self._datasets:
            if split == "train":
                self._datasets[split] = CaptionTrainDataset(
                    self.records("train"), self.vocab, self.image_size, self.max_caption_length
                )
            else:
                self._datasets[split] = ImageEvalDataset(self.records(split), self.image_size)
        return self._datasets[split]

    def _collate(self, split: str) -> Any:
        """The batch function of ``split``'s loader."""
        if split == "train":
            return functools.partial(collate_captions, pad_id=self.vocab.pad_id)
        return collate_images

    def _loader(self, split: str, shuffle: bool) -> DataLoader[dict[str, Any]]:
        dataset = self._dataset(split)
        if split == "train" and len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the training split has no images")
        if split != "train" and len(dataset) == 0:  # type: ignore[arg-type]
            self._empty_eval_split(split)
        collate = self._collate(split)
        seed = run_seed()  # the order is a function of (seed, epoch): resuming repeats it
        batching: dict[str, Any]
        if split != "train" or not self.same_length_batches:
            batching = {
                "batch_size": self.batch_size if split == "train" else self.eval_batch_size,
                "sampler": epoch_sampler(dataset, seed, self.trainer) if shuffle else None}
        else:
            # Lightning rebuilds it under DDP with these arguments, `epoch` included
            batching = {"batch_sampler": SameLengthBatchSampler(
                batch_sampler_order(dataset, seed, self.trainer), self.batch_size, keys=dataset.lengths.tolist(),  # type: ignore[attr-defined]
                seed=seed, epoch=trainer_epoch(self.trainer))}
        return DataLoader(
            dataset,
            **batching,
            generator=loader_generator(seed),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _empty_eval_split(self, split: str) -> None:
        """An empty ``val`` / ``test`` split: Lightning ran no loop over it and said only that
        a loader has no length ("Total length of DataLoader across ranks is zero"), so that
        ``test`` exited 0 without scores. Refused, naming the annotations; while fitting, an
        empty ``val`` is warned of (the fit runs without validation).

        Raises:
            captioner.data.formats.AnnotationError: outside a fit, or for ``test``.
        """
        if isinstance(self.annotations, Mapping) and split not in self.annotations:
            said = (f"the {split} split has no images: the per-split annotations give "
                    f"{', '.join(map(str, self.annotations))} only (data.init_args.annotations)")
        else:
            said = (f"{self._source(split)}: the {split} split has no images (check the "
                    "annotations' splits, val_fraction and test_fraction)")
        fitting = getattr(getattr(self.trainer, "state", None), "fn", None) == "fit"
        if split == "val" and fitting:
            warnings.warn(f"{said}: the fit runs without validation, and checkpoints that "
                          "monitor a val/ metric are never written", AnnotationWarning,
                          stacklevel=3)
            return
        raise AnnotationError(said)

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled caption batches: ``images (B, 3, H, W)``, ``captions (B, T + 1)``, ``lengths
        (B,)``, ``index (B,)``."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Validation images once each, in order: ``images (B, 3, H, W)``, ``index (B,)``."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Test images once each, in order: ``images (B, 3, H, W)``, ``index (B,)``."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """The test images once each, in order (as :meth:`test_dataloader`)."""
        return self._loader("test", shuffle=False)


def _warn_of_shared_images(by_split: Mapping[str, list[ImageRecord]], source: Any) -> None:
    """One :class:`AnnotationWarning` if an image file is in more than one split (per-split
    annotation files that share images, or one file listing an image under two ids): the
    scores of one split would then be measured on images of another; and one if a file is
    listed twice within a split (two ids, or two spellings of its name)."""
    first_split: dict[Path, str] = {}
    shared: list[tuple[Path, str, str]] = []
    repeated: list[tuple[Path, str]] = []  # the same file twice within one split
    for split, records in by_split.items():
        counts = Counter(Path(os.path.normpath(r.path)) for r in records)  # ./a.jpg is a.jpg
        repeated.extend((path, split) for path, n in counts.items() if n > 1)
        for path in counts:
            seen = first_split.setdefault(path, split)
            if seen != split:
                shared.append((path, seen, split))
    if shared:
        path, a, b = shared[0]
        warnings.warn(f"{source}: {len(shared)} images are in more than one split (first: "
                      f"{path}, in {a} and {b}); the scores of one split would be measured on "
                      "images of another", AnnotationWarning, stacklevel=3)
    if repeated:
        path, split = repeated[0]
        warnings.warn(f"{source}: {len(repeated)} image files are listed more than once within "
                      f"a split (first: {path}, in {split}), under two ids or spellings: each "
                      "copy is trained or scored on its own share of the captions",
                      AnnotationWarning, stacklevel=3)


def _check_split_keys(mapping: Mapping[str, str], name: str) -> None:
    """Per-split mappings may only use the split names."""
    unknown = set(mapping) - set(SPLITS)
    if unknown:
        raise ConfigError(f"{name}: unknown split names {sorted(unknown)}, expected {list(SPLITS)}")


def _per_split(
    value: str | Mapping[str, str] | None, split: str, name: str, optional: bool = False
) -> str | None:
    """The entry of a per-split option for ``split`` (a plain string applies to all splits)."""
    if value is None or isinstance(value, str):
        return value
    if split in value:
        return value[split]
    if optional:
        return None
    raise ValueError(f"{name} has no entry for split {split!r}")


class ShapesDataModule(CaptionDataModule):
    """The synthetic shapes set (:func:`captioner.data.shapes.make_shapes_dataset`), with boxes.

    The set is generated under ``root`` by :meth:`prepare_data`, or on the first access to the
    records or the vocabulary; generation is skipped when ``root`` already holds a set made with
    the same parameters.

    Args:
        root: Folder of the generated set.
        num_train: Training images.
        num_val: Validation images.
        num_test: Test images.
        image_size: Side of the generated (and model input) images.
        seed: Generator seed.
        clutter: Add distracting grey specks and lines.
        distort: Randomly rotate, scale and translate each scene.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size; default ``batch_size``.
        num_workers: DataLoader worker processes.
        min_freq: Vocabulary frequency threshold.
        max_caption_length: Longest training caption, ``<start>``/``<end>`` included.
        same_length_batches: Training batches of one caption length (as
            :class:`CaptionDataModule`).
    """

    def __init__(
        self,
        root: str = "data/shapes",
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        image_size: int = 64,
        seed: int = 0,
        clutter: bool = False,
        distort: bool = False,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        min_freq: int = 1,
        max_caption_length: int = 30,
        same_length_batches: bool = False,
    ) -> None:
        annotations_dir = Path(root) / "annotations"
        super().__init__(
            format="coco",
            annotations={s: str(annotations_dir / f"captions_{s}.json") for s in SPLITS},
            image_root={s: str(Path(root) / s / "images") for s in SPLITS},
            instances={s: str(annotations_dir / f"instances_{s}.json") for s in SPLITS},
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            min_freq=min_freq,
            max_caption_length=max_caption_length,
            same_length_batches=same_length_batches,
        )
        # Keep only this signature's arguments (the parent saved its own, e.g. ``format``).
        parent_only = set(inspect.signature(CaptionDataModule.__init__).parameters) - set(
            inspect.signature(ShapesDataModule.__init__).parameters
        )
        self.save_hyperparameters(ignore=sorted(parent_only))
        self.root = root
        self.shapes_options: dict[str, Any] = {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "image_size": image_size,
            "seed": seed,
            "clutter": clutter,
            "distort": distort,
        }

    def prepare_data(self) -> None:
        """Generate the set under ``root`` (a no-op when it already exists with these options)."""
        self._generate()

    def _generate(self) -> None:
        """Run the generator and point the COCO options at the files it reports."""
        from captioner.data.shapes import make_shapes_dataset

        paths = make_shapes_dataset(self.root, **self.shapes_options)
        self.annotations = {split: str(p[0]) for split, p in paths.items()}
        self.instances = {split: str(p[1]) for split, p in paths.items()}
        self.image_root = {split: str(p[2]) for split, p in paths.items()}

    def parse_records(self) -> list[ImageRecord]:
        self._generate()
        return super().parse_records()
