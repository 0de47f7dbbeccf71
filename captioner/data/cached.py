"""Training and evaluation from cached annotation grids instead of raw images.

:class:`CachedFeaturesDataModule` is :class:`~captioner.data.datamodule.CaptionDataModule` (same
annotation formats, splits, vocabulary, references) whose batches carry ``features``
``(B, L, D)`` (float16, from a :class:`~captioner.features.FeatureCache` written by ``captioner
extract-features``) in place of ``images``; :meth:`CaptioningModule.encode
<captioner.lit.captioning.CaptioningModule.encode>` then skips the encoder. Valid only for a
frozen encoder, the one the cache was extracted with (:class:`CachedShapesDataModule` does the
same for :class:`~captioner.data.datamodule.ShapesDataModule`); their datasets are plain
PyTorch, in :mod:`captioner.data.cached_datasets` (re-exported here). In YAML::

    data:
      class_path: captioner.data.cached.CachedFeaturesDataModule
      init_args:
        features_dir: cache/flickr8k_lite0     # captioner extract-features --out
        format: flickr8k_csv                   # ... the CaptionDataModule arguments
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from captioner.data.cached_datasets import (CachedCaptionDataset, CachedImageDataset,
                                            collate_cached_captions, collate_cached_images)
from captioner.data.datamodule import CaptionDataModule, DataFormat, ShapesDataModule
from captioner.data.formats import AnnotationWarning, ImageRecord
from captioner.features import FeatureCache, FeatureCacheError, NotInCache

__all__ = ["CachedCaptionDataset", "CachedImageDataset", "CachedFeaturesDataModule",
           "CachedShapesDataModule", "collate_cached_captions", "collate_cached_images"]


class _CachedFeatures:
    """Mixin for a :class:`CaptionDataModule` subclass: datasets and loaders from the cache."""

    features_dir: str
    verify_cache: bool
    _cache: FeatureCache | None
    decode_images = False  # skip_bad: the images are never read, only their cached grids

    @property
    def cache(self) -> FeatureCache:
        """The feature cache (opened on first use)."""
        if self._cache is None:
            cache = FeatureCache(self.features_dir)
            size = self.image_size
            expected = [size, size] if isinstance(size, int) else [int(v) for v in size]
            if cache.index.get("image_size") != expected:  # inference would resize otherwise
                raise FeatureCacheError(
                    f"the feature cache {self.features_dir} was extracted at image_size "
                    f"{cache.index.get('image_size')}, but the data config says {expected}: "
                    "extract it again with this data config, or set image_size to match")
            if self.verify_cache:
                self._verify(cache)
            self._cache = cache
        return self._cache

    def _verify(self, cache: FeatureCache) -> None:
        """``verify_cache``: every shard read and compared with its checksum, once per process
        that opens the cache (DataLoader workers are handed the checked cache)."""
        from captioner.features import REPAIR

        damaged = cache.verify()
        if damaged:
            name, problem = next(iter(damaged.items()))
            raise FeatureCacheError(
                f"{Path(self.features_dir) / name}: damaged ({problem}; {len(damaged)} damaged "
                f"shards in the cache); {REPAIR}")
        unchecked = cache.unchecked_shards
        if unchecked:
            warnings.warn(f"{self.features_dir}: {len(unchecked)} shards were written before "
                          "checksums were kept, so verify_cache checked only their shapes; "
                          "`captioner extract-features --verify` records them", stacklevel=2)

    #: an image whose grid the cache holds needs no file (:meth:`_image_exists`); a tool that
    #: reads the pixels (``captioner evaluate``) turns it off
    cache_replaces_images: bool = True

    def _image_exists(self, path: Path) -> bool:
        """An image whose grid the cache holds is there, its file deleted or not: the cache
        may be the only copy left (the raw images removed to free the disk). Without a
        readable cache (before an extraction; a damaged one is reported where it is read),
        the file must be there; the cache is tried once."""
        if path.is_file():
            return True
        if not self.cache_replaces_images or getattr(self, "_cache_unreadable", False):
            return False
        try:
            return path in self.cache
        except FeatureCacheError:
            self._cache_unreadable = True  # not parsed again for every missing file
            return False

    def _readable(self, records: list[ImageRecord], split: str) -> list[ImageRecord]:
        """With ``skip_bad``, a split's records without those whose image the extraction found
        unreadable (``captioner extract-features`` with a ``skip_bad`` data config), as the
        raw-image module leaves them out after decoding them: both paths then train on the same
        images and splits."""
        from captioner.features import INDEX_FILE, image_key

        if not (Path(self.features_dir) / INDEX_FILE).is_file():
            return records  # no cache yet: reading it (when a batch is made) will say so
        # an unfinished cache too: `captioner extract-features` reads these records to resume
        # it (opening it for batches refuses it, saying so)
        cache = self._cache or FeatureCache(self.features_dir, require_complete=False)
        unreadable = cache.unreadable
        kept = [r for r in records if image_key(r.path) not in unreadable]
        if len(kept) < len(records):
            warnings.warn(f"{self.features_dir}: left out {len(records) - len(kept)} images the "
                          "feature extraction could not read", AnnotationWarning, stacklevel=2)
        return kept

    def _dataset(self, split: str) -> Dataset[dict[str, Any]]:
        if split not in self._datasets:
            records = self.records(split)
            try:  # the datasets locate every image once (each path resolved once)
                if split == "train":
                    self._datasets[split] = CachedCaptionDataset(
                        records, self.vocab, self.cache, self.max_caption_length)
                else:
                    self._datasets[split] = CachedImageDataset(records, self.cache)
            except NotInCache as e:
                unreadable = self.cache.unreadable  # key -> reason
                bad = [key for key in e.missing if key in unreadable]
                if bad:  # an extraction with skip_bad left them out; this config keeps them
                    raise FeatureCacheError(
                        f"{len(bad)} of the {len(records)} {split} images could not be read "
                        f"when the feature cache {self.features_dir} was extracted (first: "
                        f"{bad[0]}: {unreadable[bad[0]]}); repair or "
                        "remove them and run `captioner extract-features` again, or set "
                        "skip_bad: true in the data config to leave them out") from None
                raise FeatureCacheError(
                    f"{len(e.missing)} of the {len(records)} {split} images are not in the "
                    f"feature cache {self.features_dir} (first: {e.missing[0]}); run `captioner "
                    f"extract-features --split {split}` with this data config") from None
        return self._datasets[split]

    def _collate(self, split: str) -> Any:
        if split == "train":
            return functools.partial(collate_cached_captions, pad_id=self.vocab.pad_id)
        return collate_cached_images


class CachedFeaturesDataModule(_CachedFeatures, CaptionDataModule):
    """:class:`CaptionDataModule` serving cached annotation grids (``features``).

    Args:
        features_dir: the folder written by ``captioner extract-features`` for these images.
        format, annotations, image_root, instances, image_size, batch_size, eval_batch_size,
            num_workers, min_freq, max_vocab_size, max_caption_length, val_fraction,
            test_fraction, split_seed, skip_bad, max_images, vocab_file, split_method,
            same_length_batches, max_captions_per_image: as
            :class:`CaptionDataModule` (``image_size`` is not used for loading; it is kept for
            checkpoints and the inference tools, which read raw images).
        verify_cache: read every shard when the cache is opened and compare it with the
            checksum written with it (:meth:`~captioner.features.FeatureCache.verify`; about
            0.5 s per GB): bytes changed inside a shard are otherwise served.

    Raises:
        captioner.features.FeatureCacheError: when a split is set up, if the cache is missing,
            unfinished, or lacks some of the split's images, or (``verify_cache``) has a
            damaged shard.
    """

    def __init__(
        self,
        features_dir: str,
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
        verify_cache: bool = False,
        same_length_batches: bool = False,
        max_captions_per_image: int | None = None,
    ) -> None:
        super().__init__(format, annotations, image_root, instances, image_size, batch_size,
                         eval_batch_size, num_workers, min_freq, max_vocab_size,
                         max_caption_length, val_fraction, test_fraction, split_seed, skip_bad,
                         max_images, vocab_file, split_method, same_length_batches,
                         max_captions_per_image)
        self.save_hyperparameters()
        self.features_dir = features_dir
        self.verify_cache = verify_cache
        self._cache = None


class CachedShapesDataModule(_CachedFeatures, ShapesDataModule):
    """:class:`ShapesDataModule` serving cached annotation grids (``features``).

    Args:
        features_dir: the folder written by ``captioner extract-features`` for these images.
        root, num_train, num_val, num_test, image_size, seed, clutter, distort, batch_size,
            eval_batch_size, num_workers, min_freq, max_caption_length, same_length_batches: as
            :class:`ShapesDataModule`.
        verify_cache: as :class:`CachedFeaturesDataModule`.
    """

    def __init__(
        self,
        features_dir: str,
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
        verify_cache: bool = False,
        same_length_batches: bool = False,
    ) -> None:
        super().__init__(root, num_train, num_val, num_test, image_size, seed, clutter, distort,
                         batch_size, eval_batch_size, num_workers, min_freq, max_caption_length,
                         same_length_batches)
        self.save_hyperparameters("features_dir", "verify_cache")
        self.features_dir = features_dir
        self.verify_cache = verify_cache
        self._cache = None
