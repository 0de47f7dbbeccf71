"""Cached annotation grids: run a frozen encoder once, train the decoder from the cache.

With a frozen encoder the annotations ``(L, D)`` of an image never change, so running the CNN on
every image at every epoch is wasted work. :func:`extract_features` runs it once over a set of
images and stores the grids; :class:`FeatureCache` reads them back.

On disk (``DIR``)::

    index.json          {"format", "dtype": "float16", "grid": [H, W], "dim": D, "shard_size",
                         "image_size", "fingerprint", "fingerprint_version",
                         "fingerprints": {"bfloat16", "float16"},
                         "precision", "encoder", "shards": [...],
                         "items": {image key: [shard, row]},
                         "files": {image key: [size, mtime_ns]}, "complete": bool,
                         "unreadable": {image key: reason},
                         "unreadable_files": {image key: [size, mtime_ns] or null},
                         "checksums": {shard file: CRC-32 of its grids' bytes}}
    shard_00000.npy     (n, L, D) float16, n <= shard_size images, rows in extraction order
    shard_00001.npy     ...

An image's key is its resolved path (:func:`image_key`), so an image shared by several splits is
stored once. Its file's size and modification time when it was encoded are kept under ``files``:
an image rewritten since (a data set regenerated or re-downloaded in place, a file repaired) no
longer matches its grid, and reading or resuming the cache refuses it, naming the file (a file
deleted since is not an error: the cache is then the only copy of its grid). The signature is
taken before any image is read and compared after each shard, so a file rewritten while it is
being cached stops the run (its shard is not kept; the next run encodes it). An image found
unreadable (``skip_unreadable``) is read again once its file changes (repaired, restored), so
that the raw and the cached data keep the same images. Shards and the index are written
atomically (a temporary file, then ``os.replace``); the index after the first shard, then at
most every :data:`INDEX_WRITE_INTERVAL` seconds, and at the end (rewriting it after every shard was
quadratic: 81 s of index writes for COCO's 482 shards). An interrupted extraction leaves a
consistent cache of whole shards and, run again, continues after the last shard the index
records (at most that interval's work is redone; a shard written after it is overwritten with
the same bytes). One DataLoader feeds every shard (its workers are not restarted per shard).
Shard boundaries coincide with batch boundaries, so a resumed extraction encodes exactly the
batches an uninterrupted one would and produces the same bytes. The ``fingerprint`` (a hash of the
encoder's weights, settings and input size: :func:`encoder_fingerprint`) keeps a resumed run from
mixing two encoders, and
``precision`` (``"32"``, or ``"bf16"``: the encoder run under bfloat16 autocast, about 2x faster
on CPUs with native bf16; the grids then carry the network's bf16 error, 5.5 % of their norm for
EfficientNet-Lite0 on Flickr8k) from mixing two precisions; an index without it (written before
it existed) is float32.

Reading is memory-mapped (``np.load(mmap_mode="r")``): memory stays bounded whatever the size of
the data set, and DataLoader workers share the page cache. At most ``max_open_shards`` maps (and
their file descriptors) stay open per reader, the least recently used released first; by default
every shard, within the process's file-descriptor limit (re-opening a shard costs ~300 us, which
a small LRU paid for ~85 % of the items of a shuffled COCO epoch). Datasets look up each image's
``(shard, row)`` once (:meth:`FeatureCache.locate`), not its resolved path per item.

Each shard's CRC-32 (of its ``(n, L, D)`` float16 grids in C order, not of the ``.npy`` header) is
kept under ``checksums`` when it is written. Opening a shard checks only its header and shape
(bytes changed inside a shard of the right size are served); :meth:`FeatureCache.verify` reads
every shard and compares it with its checksum (``captioner extract-features --verify``, which
then encodes the images of damaged shards again, and the cached data modules' ``verify_cache``
option). Shards written before checksums were kept have none (``verify`` records them then).

One extraction writes a folder at a time: it holds an exclusive lock on ``DIR/.lock``, so a
second one is refused instead of overwriting the first one's shards and index.

No Lightning here; the data-module side is :mod:`captioner.data.cached`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioner.atomic import atomic_write, remove_leftovers
from captioner.autocast import check_precision, inference_autocast

__all__ = ["FeatureCache", "FeatureCacheError", "changed_files", "encoder_fingerprint",
           "extract_features", "file_signature", "image_key", "shard_checksum", "INDEX_FILE"]

INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
FORMAT = 1
DTYPE = "float16"
FINGERPRINT_VERSION = 2
"""The definition of :func:`encoder_fingerprint` new caches are written with."""
INDEX_WRITE_INTERVAL = 30.0
"""Seconds between two writes of ``index.json`` during an extraction (after the first shard and
at the end it is always written)."""


class FeatureCacheError(ValueError):
    """A cache that is missing, incomplete, or does not match the request."""


class NotInCache(KeyError):
    """Images a :class:`FeatureCache` does not hold.

    Attributes:
        missing: their keys (:func:`image_key`), in the order asked.
    """

    def __init__(self, directory: Path, missing: list[str]) -> None:
        super().__init__(f"{missing[0]} is not in the feature cache {directory}"
                         + (f" (nor {len(missing) - 1} more images)" if len(missing) > 1 else ""))
        self.missing = missing

    def __str__(self) -> str:
        return str(self.args[0])


def image_key(path: str | os.PathLike[str]) -> str:
    """The cache key of an image file: its resolved absolute path."""
    return str(Path(path).resolve())


def encoder_fingerprint(encoder: nn.Module, image_size: int | Sequence[int],
                        dtype: torch.dtype | None = None,
                        version: int = FINGERPRINT_VERSION) -> str:
    """A short hash of what an encoder computes: the input size, and its weights and buffers
    (version 1), plus (version 2) the buffers a state dict leaves out (the input normalisation)
    and every submodule's class and settings (``extra_repr``: a stage's sub-sampling, output
    size or place, which change the features without any weight changing). A class that
    computes what another did names that one in ``fingerprint_name``
    (:class:`captioner.encoders.pooling.GridPool`), so that existing caches stay valid.

    Two extractions with the same fingerprint produce the same features (on the same machine).

    Args:
        encoder: the encoder.
        image_size: its input side ``S`` or ``(H, W)``.
        dtype: hash the floating-point tensors cast to this dtype: the fingerprint the same
            encoder has once converted to it (``bf16-true`` / ``16-true`` training), stored at
            extraction so that such a run can check the cache too.
        version: the definition; a cache is compared under the one it was written with
            (``fingerprint_version`` of its index; 1 where absent).
    """
    digest = hashlib.sha256(json.dumps(_size_pair(image_size)).encode())
    tensors = dict(encoder.state_dict())
    if version >= 2:
        for name, module in encoder.named_modules():
            kind = getattr(module, "fingerprint_name", type(module).__qualname__)
            digest.update(f"{name}:{kind}({module.extra_repr()})".encode())
        tensors = {**dict(encoder.named_buffers()), **tensors}
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        flat = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _size_pair(size: int | Sequence[int]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def _read_index(index_file: Path) -> dict[str, Any]:
    """The parsed ``index.json``.

    Raises:
        FeatureCacheError: it is not readable JSON holding an object, naming the file.
    """
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FeatureCacheError(f"{index_file}: not a readable feature cache index ({e}); "
                                "delete the cache folder and extract it again") from None
    if not isinstance(index, dict):
        raise FeatureCacheError(f"{index_file}: not a feature cache index (a JSON "
                                f"{type(index).__name__})")
    return index


def file_signature(path: str | os.PathLike[str]) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, ``None`` when it does not exist (any more)."""
    try:
        st = os.stat(path)
    except OSError:  # gone, or out of reach (another user's folder): nothing to compare
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


MTIME_TOLERANCE_NS = 2_000_000_000
"""Modification times closer than this count as equal: tar, zip and ``scp -p`` keep them only
to the second (FAT to 2 s), so a copied data set keeps its cache."""


def changed_files(index: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` whose image file differs (size or modification time) from when
    it was encoded; files deleted since, and caches written before signatures were kept, pass."""
    files = index.get("files") or {}
    changed = []
    for key in keys:
        stored = files.get(key)
        if stored is not None:
            now = file_signature(key)
            if now is not None and (now[0] != stored[0]
                                    or abs(now[1] - stored[1]) >= MTIME_TOLERANCE_NS):
                changed.append(key)
    return changed


def _changed_error(directory: Path, changed: list[str], total: int) -> FeatureCacheError:
    return FeatureCacheError(
        f"{len(changed)} of {total} images changed since they were cached in {directory} "
        f"(first: {changed[0]}: its size or modification time differs): the cached grids are "
        "not those of the images now. Extract the cache again (a new --out folder, or delete "
        "this one)")


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


def _write_shard(path: Path, shard: np.ndarray) -> None:
    with atomic_write(path, "wb") as f:
        np.save(f, shard)


CRC_CHUNK = 1 << 24
"""Bytes per ``zlib.crc32`` call when a shard is checked (16 MiB: a mapped shard is read in
pieces, never copied whole)."""


def shard_checksum(shard: np.ndarray) -> int:
    """CRC-32 of the grids ``(n, L, D)`` of a shard, their bytes in C order (a memory map is
    read in :data:`CRC_CHUNK` pieces, without a copy)."""
    data = memoryview(np.ascontiguousarray(shard)).cast("B")  # (n L D 2,) bytes
    crc = 0
    for start in range(0, len(data), CRC_CHUNK):
        crc = zlib.crc32(data[start : start + CRC_CHUNK], crc)
    return crc


def _wrong_shape(array: np.ndarray, index: dict[str, Any], rows: int = 0) -> bool:
    """Whether a shard's array is not ``(n >= rows, H W, D)`` float16 as ``index`` describes."""
    h, w = index["grid"]
    return (array.dtype != np.dtype(DTYPE) or array.ndim != 3 or array.shape[0] < rows
            or array.shape[1:] != (h * w, index["dim"]))


def _shard_problem(path: Path, index: dict[str, Any], rows: int,
                   checksum: int | None = None) -> str | None:
    """Why the shard at ``path`` cannot serve ``rows`` grids of ``index`` (missing, cut short,
    not ``.npy``, another dtype or shape, or, given ``checksum``, other bytes), else ``None``.

    Raises:
        FeatureCacheError: a shard that cannot be read for another reason than its contents
            (permissions, an I/O error).
    """
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return "missing"
    except (ValueError, EOFError) as e:  # cut short, empty, not .npy, pickles
        return str(e) or type(e).__name__
    except OSError as e:
        raise FeatureCacheError(f"{path}: cannot read the shard ({e})") from None
    if _wrong_shape(array, index, rows):
        return f"a {array.dtype} array of shape {tuple(array.shape)}"
    if checksum is not None:
        try:
            found = shard_checksum(array)
        except OSError as e:
            raise FeatureCacheError(f"{path}: cannot read the shard ({e})") from None
        if found != checksum:
            return f"its bytes changed (CRC-32 {found:08x}, written as {checksum:08x})"
    return None


def _rows_needed(index: dict[str, Any]) -> dict[int, int]:
    """Shard number -> how many rows of it the index's items use."""
    rows: dict[int, int] = {}
    for shard, row in index["items"].values():
        rows[shard] = max(rows.get(shard, 0), row + 1)
    return rows


class FeatureCache:
    """Memory-mapped reader of a feature cache directory.

    Args:
        directory: a folder written by :func:`extract_features`.
        require_complete: refuse a cache whose extraction has not finished.
        max_open_shards: shard maps kept open at once (each holds a file descriptor);
            ``None``: every shard, within the process's descriptor limit
            (:func:`default_open_shards`).

    Raises:
        FeatureCacheError: no index, an unknown format, or an unfinished extraction.
    """

    def __init__(self, directory: str | os.PathLike[str], require_complete: bool = True,
                 max_open_shards: int | None = None) -> None:
        self.directory = Path(directory)
        index_file = self.directory / INDEX_FILE
        if not index_file.is_file():
            raise FeatureCacheError(f"{self.directory}: no feature cache ({INDEX_FILE} missing); "
                                    "run `captioner extract-features` first")
        self.index: dict[str, Any] = _read_index(index_file)
        if self.index.get("format") != FORMAT:
            raise FeatureCacheError(f"{index_file}: unknown cache format "
                                    f"{self.index.get('format')!r}")
        if require_complete and not self.index.get("complete"):
            raise FeatureCacheError(f"{self.directory}: the extraction did not finish; run "
                                    "`captioner extract-features` again to complete it")
        self.items: dict[str, list[int]] = self.index["items"]
        if max_open_shards is None:
            max_open_shards = default_open_shards(len(self.index["shards"]))
        self.max_open_shards = max(1, int(max_open_shards))
        self._shards: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first

    @property
    def unreadable(self) -> dict[str, str]:
        """Images an extraction with ``skip_unreadable`` could not decode: key -> reason."""
        return dict(self.index.get("unreadable") or {})

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(H, W)`` of the stored grids."""
        h, w = self.index["grid"]
        return int(h), int(w)

    @property
    def dim(self) -> int:
        """``D``, the annotation size."""
        return int(self.index["dim"])

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and image_key(path) in self.items

    def _shard(self, shard: int) -> np.ndarray:
        if shard in self._shards:
            self._shards.move_to_end(shard)
            return self._shards[shard]
        # opened lazily: each DataLoader worker maps its own; the least recently used map is
        # dropped (closed, with its descriptor, once no view of it is left)
        while len(self._shards) >= self.max_open_shards:
            self._shards.popitem(last=False)
        path = self.directory / self.index["shards"][shard]
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise FeatureCacheError(f"{path}: shard missing from the feature cache "
                                    f"{self.directory}; {REPAIR}") from None
        except (OSError, ValueError, EOFError) as e:  # truncated, empty, not .npy, pickles
            raise FeatureCacheError(f"{path}: not a readable shard ({str(e) or type(e).__name__})"
                                    f"; {REPAIR}") from None
        h, w = self.grid_size
        if _wrong_shape(array, self.index):
            raise FeatureCacheError(
                f"{path}: a {array.dtype} array of shape {tuple(array.shape)}, not the (n, "
                f"{h * w}, {self.dim}) {DTYPE} grids the index describes; {REPAIR}")
        self._shards[shard] = array
        return self._shards[shard]

    def locate(self, paths: Iterable[str | os.PathLike[str]]) -> np.ndarray:
        """``(n, 2)`` int64 ``(shard, row)`` of each image, for :meth:`tensor_at` (the paths are
        resolved, and the files compared with their signatures, here once, not at every read).

        Raises:
            NotInCache: images not in the cache (all of them listed), a ``KeyError``.
            FeatureCacheError: images whose file changed since they were encoded
                (:func:`changed_files`).
        """
        rows, missing, keys = [], [], []
        for key in map(image_key, paths):
            found = self.items.get(key)
            if found is None:
                missing.append(key)
            else:
                rows.append(found[:2])
                keys.append(key)
        if missing:
            raise NotInCache(self.directory, missing)
        changed = changed_files(self.index, keys)
        if changed:
            raise _changed_error(self.directory, changed, len(keys))
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # (n, 2)

    def array(self, path: str | os.PathLike[str]) -> np.ndarray:
        """The stored ``(L, D)`` float16 grid of an image (a read-only memory-mapped view).

        Raises:
            NotInCache: the image is not in the cache (a ``KeyError``).
        """
        (shard, row), = self.locate([path])
        return self._shard(int(shard))[row]

    def tensor(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """The grid of an image as a float16 tensor ``(L, D)`` (copied out of the map)."""
        return torch.from_numpy(np.array(self.array(path)))

    def tensor_at(self, shard: int, row: int) -> torch.Tensor:
        """The grid at ``(shard, row)`` (from :meth:`locate`) as a float16 tensor ``(L, D)``."""
        return torch.from_numpy(np.array(self._shard(int(shard))[row]))

    def verify(self, progress: Callable[[str], None] | None = None) -> dict[str, str]:
        """Read every shard the index uses and compare it with its checksum (its header and
        shape too): ``O(size of the cache)`` reading, about 0.5 s per GB from the page cache (2 GB/s
        measured for a 196 MiB shard).

        Args:
            progress: called with one line per shard checked.

        Returns:
            The damaged shards: file name -> what is wrong (empty: all hold what was written).
            Shards written before checksums were kept (:attr:`unchecked_shards`) are checked
            for header and shape only.
        """
        checksums = self.index.get("checksums") or {}
        damaged = {}
        for shard, rows in sorted(_rows_needed(self.index).items()):
            name = self.index["shards"][shard]
            problem = _shard_problem(self.directory / name, self.index, rows,
                                     checksums.get(name))
            if problem is not None:
                damaged[name] = problem
            if progress is not None:
                progress(f"{name}: {problem or 'intact'}")
        return damaged

    @property
    def unchecked_shards(self) -> list[str]:
        """Shards in use that have no checksum (written before checksums were kept)."""
        checksums = self.index.get("checksums") or {}
        return [self.index["shards"][s] for s in sorted(_rows_needed(self.index))
                if self.index["shards"][s] not in checksums]

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the maps
        return {**self.__dict__, "_shards": OrderedDict()}


def default_open_shards(num_shards: int, reserve: int = 256) -> int:
    """Shard maps a reader may keep open: all ``num_shards``, within the soft limit on open
    file descriptors less ``reserve`` for everything else (64 at least; 64 where the limit
    cannot be read)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return min(max(num_shards, 1), 64)
    room = 1 << 20 if soft == resource.RLIM_INFINITY else soft - reserve
    return max(1, min(num_shards, max(room, 64)))


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` exclusively (POSIX ``flock``; released if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FeatureCacheError(
                f"{out}: another extraction is writing this cache ({out / LOCK_FILE} is "
                "locked); wait for it to finish, or use another --out folder") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


REPAIR = ("run captioner extract-features with the same config and --out again, with --verify: "
          "it encodes the images of damaged or missing shards again")
"""How the reading errors of a damaged cache say to repair it (:func:`_drop_broken_shards`)."""


def _drop_broken_shards(out: Path, index: dict[str, Any], keys: Sequence[str],
                        say: Callable[[str], None], verify: bool = False) -> bool:
    """Forget the shards of ``index`` that are missing, cut short or of another shape (a disk
    full, a copy interrupted, a file edited), and with ``verify`` those whose bytes differ from
    their checksum: their images leave ``items`` (those among ``keys``, this run's images, are
    encoded again into new shards, the others when a run asks for them) and the damaged file is
    deleted. Without ``verify`` only the ``.npy`` headers and sizes are read; with it every
    shard is read whole, and a shard without a checksum (written before they were kept) gets
    one recorded.

    Returns:
        Whether the index changed (it then needs writing; it is written here when a shard was
        dropped).

    Raises:
        FeatureCacheError: a shard that cannot be read for another reason than its contents
            (permissions, an I/O error): nothing is deleted.
    """
    if not index["items"]:
        return False
    checksums = index.setdefault("checksums", {})
    wanted, dropped, recorded = set(keys), False, 0
    for shard, rows in sorted(_rows_needed(index).items()):
        name = index["shards"][shard]
        path = out / name
        problem = _shard_problem(path, index, rows, checksums.get(name) if verify else None)
        if problem is None:
            if verify and name not in checksums:
                checksums[name] = shard_checksum(np.load(path, mmap_mode="r"))
                recorded += 1
            continue
        lost = [key for key, (s, _) in index["items"].items() if s == shard]
        for key in lost:
            del index["items"][key]
        path.unlink(missing_ok=True)
        checksums.pop(name, None)
        again = sum(1 for key in lost if key in wanted)
        say(f"{path.name}: damaged ({problem}); {again} of its {len(lost)} images are encoded "
            "again now" + (", the others when a run asks for them" if again < len(lost) else ""))
        dropped = True
    if verify:
        say("verified the cache's shards against their checksums"
            + (f"; {recorded} shards written before checksums were kept had none: "
               "recorded now" if recorded else ""))
    if dropped:
        index["complete"] = False
        _write_json(out / INDEX_FILE, index)
    return dropped or recorded > 0


def _drop_unreadable(keys: list[str], unreadable: dict[str, str],
                     unreadable_files: dict[str, list[int] | None]) -> list[str]:
    """``keys`` whose image decodes; the others go into ``unreadable`` with the reason and into
    ``unreadable_files`` with their file's signature (read again once it changes)."""
    from captioner.data.formats import image_load_errors

    errors = image_load_errors([Path(k) for k in keys])
    for key, error in zip(keys, errors):
        if error is not None:
            unreadable[key] = error
            unreadable_files[key] = file_signature(key)
        else:  # decodes now: cached below
            unreadable.pop(key, None)
            unreadable_files.pop(key, None)
    return [k for k, error in zip(keys, errors) if error is None]


def _existing_fingerprint_version(out: Path) -> int:
    """The fingerprint definition of the cache in ``out`` (1 for caches from before versions),
    :data:`FINGERPRINT_VERSION` where there is none yet."""
    index_file = out / INDEX_FILE
    if not index_file.is_file():
        return FINGERPRINT_VERSION
    return int(_read_index(index_file).get("fingerprint_version", 1))


def _load_index(out: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The existing index of ``out`` if it matches ``meta`` (resume), else a fresh one, and
    whether it lacked the 16-bit ``fingerprints`` (written before they were stored)."""
    index_file = out / INDEX_FILE
    if not index_file.is_file():
        return {**meta, "shards": [], "items": {}, "complete": False}, True
    index = _read_index(index_file)
    index.setdefault("precision", "32")  # caches from before the field: float32
    index.setdefault("fingerprint_version", 1)
    for field in ("format", "dtype", "grid", "dim", "shard_size", "image_size", "fingerprint",
                  "fingerprint_version", "precision"):
        if index.get(field) != meta[field]:
            hint = ("; an encoder with randomly initialised weights (weights: null) differs from "
                    "run to run unless the config sets seed_everything" if field == "fingerprint"
                    else "")
            raise FeatureCacheError(
                f"{out} holds a cache made with another {field} ({index.get(field)!r}, now "
                f"{meta[field]!r}){hint}; use a new --out folder or delete this one")
    added = index.get("fingerprints") != meta["fingerprints"]
    index["fingerprints"] = meta["fingerprints"]  # of the same weights (added to older ones)
    return index, added


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    image_size: int | tuple[int, int],
    batch_size: int = 32,
    shard_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    encoder_config: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    shard_delay: float = 0.0,
    skip_unreadable: bool = False,
    precision: str = "32",
    verify: bool = False,
) -> FeatureCache:
    """Encode images once and store their annotation grids, resuming an interrupted run.

    Images are read with :class:`captioner.data.datasets.ImageEvalDataset` (the same decoding
    and resizing as training from raw images) and encoded in evaluation mode.

    Args:
        encoder: an encoder ``(B, 3, H_img, W_img) -> (B, L, D)`` with ``grid_size`` and
            ``out_channels`` (:class:`captioner.encoders.ImageEncoder`); it should be frozen.
        paths: image files; duplicates (same resolved path) are encoded once.
        out_dir: the cache folder (created; an existing cache from the same encoder is resumed).
        image_size: the input side ``S`` (or ``(H, W)``) the data module would use.
        batch_size: images per encoder forward; ``shard_size`` must be a multiple of it.
        shard_size: images per shard file.
        num_workers: DataLoader worker processes for image decoding.
        device: where to run the encoder.
        encoder_config: stored in the index for the record (e.g. the ``class_path`` config).
        progress: called with one line per finished shard.
        shard_delay: seconds to sleep after each shard (tests interrupt the run there).
        skip_unreadable: decode each image first and, where
            :func:`~captioner.data.images.load_image` cannot, record it under ``unreadable``
            in the index instead of stopping (what ``skip_bad`` data does; the cached data
            modules then leave the same images out).
        precision: ``"32"``, or ``"bf16"``: the encoder under bfloat16 autocast
            (:func:`captioner.autocast.check_precision`); recorded in the index, and a resumed
            run must use the same.
        verify: first read every shard already written and compare it with its checksum
            (:meth:`FeatureCache.verify`); the images of damaged shards are encoded again.

    Returns:
        The finished :class:`FeatureCache`.

    Raises:
        FeatureCacheError: ``out_dir`` holds a cache of another encoder, image size or
            precision, or another extraction is writing it.
        ValueError: bad sizes, an encoder without ``grid_size``, features that overflow
            float16.
    """
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a positive multiple of batch_size "
                         f"({batch_size}), so that a resumed run encodes the same batches")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(encoder, "grid_size") or not hasattr(encoder, "out_channels"):
        raise ValueError("the encoder must expose grid_size (H, W) and out_channels D, as "
                         "captioner.encoders.ImageEncoder does")
    encoder = encoder.to(device).eval()
    precision = check_precision(precision, device)
    grid = [int(g) for g in encoder.grid_size]
    version = _existing_fingerprint_version(out)  # a resumed cache keeps its definition
    meta = {"format": FORMAT, "dtype": DTYPE, "grid": grid, "dim": int(encoder.out_channels),
            "shard_size": shard_size, "image_size": _size_pair(image_size),
            "fingerprint": encoder_fingerprint(encoder, image_size, version=version),
            "fingerprint_version": version, "precision": precision,
            "fingerprints": {str(d).removeprefix("torch."): encoder_fingerprint(
                encoder, image_size, d, version) for d in (torch.bfloat16, torch.float16)},
            "encoder": encoder_config or {"class": type(encoder).__qualname__}}
    with _exclusive(out):
        return _extract(encoder, paths, out, meta, image_size, batch_size, shard_size,
                        num_workers, device, progress, shard_delay, skip_unreadable, verify)


def _extract(encoder: nn.Module, paths: Sequence[str | os.PathLike[str]], out: Path,
             meta: dict[str, Any], image_size: int | tuple[int, int], batch_size: int,
             shard_size: int, num_workers: int, device: str | torch.device,
             progress: Callable[[str], None] | None, shard_delay: float,
             skip_unreadable: bool, verify: bool) -> FeatureCache:
    """The body of :func:`extract_features`, under the folder's lock."""
    from torch.utils.data import DataLoader

    from captioner.data.datasets import ImageEvalDataset, collate_images
    from captioner.data.formats import ImageRecord

    index, fingerprints_added = _load_index(out, meta)
    remove_leftovers(out, "shard_*.npy")  # a hard-killed run's partial files (we hold the lock)
    remove_leftovers(out, INDEX_FILE)

    keys = list(dict.fromkeys(image_key(p) for p in paths))  # ordered, without duplicates
    index_changed = _drop_broken_shards(out, index, keys, progress or (lambda line: None),
                                        verify)
    changed = changed_files(index, [k for k in keys if k in index["items"]])
    if changed:
        raise _changed_error(out, changed, len(keys))
    files = index.setdefault("files", {})
    unreadable: dict[str, str] = index.setdefault("unreadable", {})
    unreadable_files = index.setdefault("unreadable_files", {})  # key -> signature when found
    # without skip_unreadable an image an earlier run found unreadable is read again: it is
    # cached if it was repaired, else its error stops the run, naming it; with skip_unreadable
    # only where its file changed since (repaired, or replaced) or its signature was not kept
    todo = [k for k in keys
            if k not in index["items"] and (k not in unreadable or not skip_unreadable
                                            or unreadable_files.get(k) != file_signature(k))]
    if skip_unreadable and todo:
        todo = _drop_unreadable(todo, unreadable, unreadable_files)
        index["complete"] = False
        _write_json(out / INDEX_FILE, index)  # the unreadable ones are known from now on
        if unreadable:
            (progress or (lambda line: None))(
                f"{len(unreadable)} unreadable images left out (e.g. "
                f"{next(iter(unreadable))}: {next(iter(unreadable.values()))})")
    say = progress or (lambda line: None)
    if not todo:  # written where it is new, was left unfinished or lacked fingerprints
        if (not index["complete"] or fingerprints_added or index_changed
                or not (out / INDEX_FILE).is_file()):
            index["complete"] = True
            _write_json(out / INDEX_FILE, index)
        left_out = sum(1 for k in keys if k not in index["items"])
        say(f"{len(keys) - left_out} images already cached in {out}"
            + (f" ({left_out} unreadable left out)" if left_out else ""))
        return FeatureCache(out)

    index["complete"] = False
    done = len(keys) - len(todo)
    # one loader for every shard (workers started once); a shard is shard_size / batch_size
    # consecutive batches, as shard boundaries coincide with batch boundaries
    # each file's signature before it is read: a file rewritten while it is being encoded is
    # caught after its shard (a signature taken only then would vouch for the new file)
    before = {k: file_signature(k) for k in todo}
    records = [ImageRecord(image_id=i, path=Path(k), captions=[]) for i, k in enumerate(todo)]
    batches = iter(DataLoader(ImageEvalDataset(records, image_size), batch_size=batch_size,
                              shuffle=False, num_workers=num_workers, collate_fn=collate_images))
    last_write = None
    try:  # an interrupted run records the shards it finished (Ctrl-C included)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start : start + shard_size]
            grids = []
            for batch in itertools.islice(batches, shard_size // batch_size):
                with inference_autocast(torch.device(device), meta["precision"]):
                    annotations = encoder(batch["images"].to(device)).float()  # (rows, L, D)
                grids.append(annotations.to(torch.float16).cpu().numpy())
            shard = np.concatenate(grids)  # (n, L, D)
            assert len(shard) == len(chunk), (len(shard), len(chunk))
            finite = np.isfinite(shard).reshape(len(shard), -1).all(axis=1)  # (n,)
            if not finite.all():
                row = int(np.flatnonzero(~finite)[0])
                what = ("NaN" if np.isnan(shard[row]).any() else
                        "values beyond float16's range (|x| > 65504)")
                raise ValueError(f"{chunk[row]}: the encoder's features hold {what}; this "
                                 "encoder's outputs cannot be cached in half precision")
            moved = [k for k in chunk if file_signature(k) != before[k]]
            if moved:
                raise FeatureCacheError(
                    f"{moved[0]}: the file changed while it was being cached ({len(moved)} of "
                    f"this shard's {len(chunk)} images); run the extraction again: it goes on "
                    "after the shards already written")
            name = f"shard_{len(index['shards']):05d}.npy"
            _write_shard(out / name, shard)
            index["shards"].append(name)
            index.setdefault("checksums", {})[name] = shard_checksum(shard)
            for row, key in enumerate(chunk):
                index["items"][key] = [len(index["shards"]) - 1, row]
                files[key] = before[key]
                unreadable.pop(key, None)  # repaired since an earlier run
                unreadable_files.pop(key, None)
            index["complete"] = start + shard_size >= len(todo)
            now = time.monotonic()
            if (last_write is None or index["complete"]
                    or now - last_write >= INDEX_WRITE_INTERVAL):
                _write_json(out / INDEX_FILE, index)
                last_write = now
            done += len(chunk)
            say(f"{name}: {len(chunk)} images ({done}/{len(keys)})")
            if shard_delay and not index["complete"]:
                time.sleep(shard_delay)
    except BaseException:
        if last_write is not None and not index["complete"]:
            with contextlib.suppress(OSError):
                _write_json(out / INDEX_FILE, index)
        raise
    return FeatureCache(out)
