"""Tests for captioner.inference: rebuilding a checkpoint, captioning any image, clear errors."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.attention import AdditiveAttention
from captioner.data.images import ImageLoadError, load_image
from captioner.data.vocabulary import Vocabulary
from captioner.inference import Caption, Captioner, CheckpointError, read_checkpoint
from tests.conftest import TINY_GRID, TINY_MODEL_CONFIG

H, W = TINY_GRID


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def test_images(shapes_root: Path) -> list[Path]:
    return sorted((shapes_root / "test" / "images").glob("*.png"))


def _same(a: Caption, b: Caption) -> None:
    """Two captions of the same pixels: same tokens, score and attention."""
    assert a.tokens == b.tokens
    assert a.score == pytest.approx(b.score, abs=1e-4)
    np.testing.assert_allclose(a.alphas, b.alphas, atol=1e-5)


def _rewrite(tmp_path: Path, src: Path, name: str, **save) -> Path:
    """``src`` converted by ``save.pop("convert")`` and saved as ``tmp_path / name``."""
    img = Image.open(src).convert("RGB")
    convert = save.pop("convert", None)
    if convert is not None:
        img = convert(img)
    out = tmp_path / name
    img.save(out, **save)
    return out


# ------------------------------------------------------------------------------- rebuilding
def test_from_checkpoint_restores_the_trained_model(captioner: Captioner, tiny_checkpoint: Path,
                                                    test_images: list[Path]) -> None:
    from captioner.lit.captioning import CaptioningModule

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert captioner.grid_size == TINY_GRID
    assert captioner.image_size == 32
    assert len(captioner.vocab) == ckpt["hyper_parameters"]["vocab_size"]
    assert captioner.search["max_length"] == TINY_MODEL_CONFIG["max_length"]
    assert not captioner.encoder.training and not captioner.decoder.training  # no dropout
    # The model trained by Lightning and the one rebuilt from the file decode identically.
    module = CaptioningModule.from_config({**TINY_MODEL_CONFIG,
                                           "vocab_size": len(captioner.vocab)})
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    batch = torch.stack([captioner.preprocess(Image.open(p).convert("RGB"))
                         for p in test_images])  # (B, 3, 32, 32)
    expected = module.generate(module.encoder(batch))
    got = captioner.caption(test_images, batch_size=4)
    for i, c in enumerate(got):
        n = int(expected.lengths[i])
        assert c.tokens == expected.tokens[i, :n].tolist()
        assert c.score == pytest.approx(float(expected.scores[i]), abs=1e-5)


def test_caption_fields_and_shapes(captioner: Captioner, test_images: list[Path]) -> None:
    captions = captioner.caption(test_images[:3], beam_size=2, max_length=5)
    assert len(captions) == 3
    for c, path in zip(captions, test_images):
        T = len(c.tokens)
        assert 1 <= T <= 5
        assert c.alphas.shape == (T, H, W)
        np.testing.assert_allclose(c.alphas.sum(axis=(1, 2)), np.ones(T), atol=1e-5)
        assert c.betas.shape == (T,) and np.all((c.betas > 0) & (c.betas < 1))  # sigmoid gate
        assert c.words == captioner.vocab.decode(c.tokens)
        assert c.text == " ".join(c.words)
        assert c.word_alphas.shape == (len(c.words), H, W)
        assert c.score <= 0.0
        assert c.path == path and c.image is not None and c.image.mode == "RGB"


def test_word_maps_leave_out_the_end_step() -> None:
    """``word_alphas`` / ``word_betas`` hold one entry per word: the step that emitted
    ``<end>`` (which has an attention map and a gate value, but no word) is left out."""
    end = Vocabulary.from_counts({"a": 1, "dog": 1}).end_id  # 2: <pad> <start> <end> <unk>
    alphas = np.arange(12, dtype=np.float64).reshape(3, 2, 2)  # (T = 3, H, W): a, dog, <end>
    betas = np.array([0.1, 0.2, 0.9])
    c = Caption(words=["a", "dog"], tokens=[4, 5, end], score=0.0, alphas=alphas, betas=betas)
    assert c.word_alphas.shape == (2, 2, 2)
    np.testing.assert_array_equal(c.word_alphas, alphas[:2])  # maps of "a" and "dog"
    np.testing.assert_array_equal(c.word_betas, [0.1, 0.2])


def test_batching_does_not_change_captions(captioner: Captioner, test_images: list[Path]) -> None:
    one_by_one = [captioner.caption(p)[0] for p in test_images]
    batched = captioner.caption(test_images, batch_size=4)  # batches of 4 and 2
    for a, b in zip(one_by_one, batched):
        _same(a, b)


def test_beam_search_is_batch_invariant(captioner: Captioner, test_images: list[Path]) -> None:
    batched = captioner.caption(test_images, beam_size=3, batch_size=6)
    for path, b in zip(test_images, batched):
        _same(captioner.caption(path, beam_size=3)[0], b)
        assert b.alphas.shape == (len(b.tokens), H, W)


def test_pil_images_and_paths_agree(captioner: Captioner, test_images: list[Path]) -> None:
    pil = Image.open(test_images[0])
    _same(captioner.caption([pil])[0], captioner.caption([test_images[0]])[0])
    assert captioner.caption([pil])[0].path is None


# ------------------------------------------------------------------------------- image modes
def test_grey_16bit_and_rgba_match_their_8bit_rgb_equivalents(
        captioner: Captioner, test_images: list[Path], tmp_path: Path) -> None:
    src = test_images[1]
    grey = _rewrite(tmp_path, src, "grey.png", convert=lambda im: im.convert("L"))
    grey_rgb = Image.open(grey).convert("RGB")  # L -> RGB replicates the channel
    values = np.asarray(Image.open(grey), dtype=np.uint16) * 257  # 8-bit v -> 16-bit v * 257
    deep = tmp_path / "deep.png"
    Image.fromarray(values.astype(np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    opaque = _rewrite(tmp_path, src, "opaque.png", convert=lambda im: im.convert("RGBA"))
    assert Image.open(opaque).mode == "RGBA"

    grey_c, deep_c, opaque_c = captioner.caption([grey, deep, opaque])
    _same(grey_c, captioner.caption([grey_rgb])[0])
    _same(deep_c, grey_c)  # 16-bit scaled by 255 / 65535, not clipped
    _same(opaque_c, captioner.caption([src])[0])  # alpha 255 everywhere changes nothing
    assert captioner.caption([grey_rgb])[0].score != captioner.caption([src])[0].score


def test_exif_rotated_image_is_captioned_upright(captioner: Captioner, test_images: list[Path],
                                                 tmp_path: Path) -> None:
    src = test_images[2]
    upright = Image.open(src).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # stored counter-clockwise
    rotated = tmp_path / "rotated.png"
    stored.save(rotated, exif=exif.tobytes())
    sideways = tmp_path / "sideways.png"
    stored.save(sideways)  # the same pixels without the orientation tag

    c_rotated = captioner.caption([rotated])[0]
    _same(c_rotated, captioner.caption([src])[0])
    assert c_rotated.image is not None and c_rotated.image.size == upright.size
    assert not np.allclose(captioner.caption([sideways])[0].alphas[0], c_rotated.alphas[0])
    # the image load_image gives (turned once) is not turned again as an in-memory image
    # (captioner visualize captioned it twice turned, and drew it once turned)
    loaded = load_image(rotated)
    assert loaded.size == upright.size
    _same(captioner.caption([loaded])[0], c_rotated)
    # the same where the orientation comes from XMP's tiff:Orientation, or from ImageMagick's
    # PNG text chunk of EXIF ("Raw profile type exif"): Pillow reads both
    for name, metadata in (("xmp", _xmp_orientation(6)), ("raw", _raw_profile_orientation(6))):
        file = tmp_path / f"{name}.png"
        stored.save(file, pnginfo=metadata)
        assert Image.open(file).getexif().get(0x0112) == 6, name
        loaded = load_image(file)
        assert loaded.size == upright.size and loaded.getexif().get(0x0112) is None, name
        _same(captioner.caption([loaded])[0], c_rotated)

def _raw_profile_orientation(value: int):
    """PNG metadata holding the EXIF orientation as ImageMagick writes it: a text chunk
    "Raw profile type exif" with the hex of ``Exif\0\0`` and the TIFF block."""
    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[0x0112] = value
    data = exif.tobytes()
    data = data if data.startswith(b"Exif") else b"Exif\x00\x00" + data
    text = data.hex()
    body = f"\nexif\n{len(data):8d}\n" + "\n".join(text[i:i + 72]
                                                   for i in range(0, len(text), 72))
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", body, zip=True)
    return info


def _xmp_orientation(value: int):
    """PNG metadata holding only an XMP packet with ``tiff:Orientation``."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
                  f'"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff='
                  f'"http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{value}"/></rdf:RDF>'
                  f'</x:xmpmeta>')
    return info


@pytest.mark.parametrize("kind", ["palette", "cmyk_jpeg", "tiny_1x1", "large_3000x2000",
                                  "wide_rgba"])
def test_unusual_images_are_captioned(kind: str, captioner: Captioner, test_images: list[Path],
                                      tmp_path: Path) -> None:
    src = test_images[0]
    if kind == "palette":
        path = _rewrite(tmp_path, src, "p.png", convert=lambda im: im.convert("P"))
        assert Image.open(path).mode == "P"
    elif kind == "cmyk_jpeg":
        path = _rewrite(tmp_path, src, "cmyk.jpg", convert=lambda im: im.convert("CMYK"))
        assert Image.open(path).mode == "CMYK"
    elif kind == "tiny_1x1":
        path = tmp_path / "one.png"
        Image.new("RGB", (1, 1), (200, 30, 30)).save(path)
    elif kind == "large_3000x2000":
        path = tmp_path / "large.png"
        Image.open(src).convert("RGB").resize((3000, 2000), Image.Resampling.NEAREST).save(
            path, compress_level=1)
    else:
        path = tmp_path / "wide.png"
        a = np.zeros((9, 41, 4), dtype=np.uint8)  # (H, W, RGBA): fully transparent
        Image.fromarray(a, mode="RGBA").save(path)
    (c,) = captioner.caption([path])
    assert 1 <= len(c.tokens) <= captioner.search["max_length"]
    assert c.alphas.shape == (len(c.tokens), H, W)
    assert np.isfinite(c.score)
    if kind == "wide_rgba":  # transparent pixels are composited on white
        white = tmp_path / "white.png"
        Image.new("RGB", (41, 9), (255, 255, 255)).save(white)
        _same(c, captioner.caption([white])[0])


# ------------------------------------------------------------------------------- bad images
def test_caption_raises_image_load_error_naming_the_file(captioner: Captioner,
                                                         tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="missing.png.*no such file"):
        captioner.caption([tmp_path / "missing.png"])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ImageLoadError, match="notes.png.*not a recognised image"):
        captioner.caption([text])


def test_caption_paths_reports_bad_files_and_captions_the_rest(
        captioner: Captioner, test_images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    good = [folder / "a.png", folder / "nested" / "b.png"]
    for dst, src in zip(good, test_images):
        dst.write_bytes(src.read_bytes())
    full = tmp_path / "full.jpg"
    Image.open(test_images[2]).convert("RGB").save(full, quality=95)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (folder / "readme.txt").write_text("skipped: not an image suffix")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x00" * 100)

    captions, errors = captioner.caption_paths(
        [folder, tmp_path / "missing.jpg", fake, tmp_path / "notes.txt"], batch_size=2)
    assert [c.path for c in captions] == good  # sorted, recursive; readme.txt ignored
    for c, src in zip(captions, test_images):
        _same(c, captioner.caption([src])[0])
        assert c.image is None  # not kept by default: large folders stay small in memory
    reasons = {p.name: r for p, r in errors}
    assert set(reasons) == {"truncated.jpg", "missing.jpg", "fake.png", "notes.txt"}
    assert "truncated image: the file ends before the image data does" in reasons["truncated.jpg"]
    assert "no such file" in reasons["missing.jpg"]
    assert reasons["fake.png"] == "not a recognised image format"  # the reason, no path


def test_caption_paths_takes_one_path_as_one_path(captioner: Captioner,
                                                  test_images: list[Path]) -> None:
    """A single path string was iterated character by character: ``"/"`` walked the whole
    file system (99 s, 19,825 captions of other images)."""
    for one in (str(test_images[0]), test_images[0]):
        captions, errors = captioner.caption_paths(one)
        assert [c.path for c in captions] == [test_images[0]] and errors == []
        _same(captions[0], captioner.caption(one)[0])


def test_caption_paths_yields_each_batch_and_resizes_each_image_as_it_is_read(
        captioner: Captioner, test_images: list[Path], tmp_path: Path, monkeypatch) -> None:
    """Batches come as they are done (the tool writes them at once), the paths that name no
    image first; without ``keep_images`` each image is resized right after it is decoded, so
    a batch of 8000 x 6000 photos never sits in memory at full size (3.9 GB at batch 16)."""
    import captioner.inference as inference

    events = []
    load, preprocess = inference.load_image, Captioner.preprocess
    monkeypatch.setattr(inference, "load_image",
                        lambda path: events.append(("load", Path(path).name)) or load(path))
    monkeypatch.setattr(Captioner, "preprocess",
                        lambda self, img: events.append(("resize",)) or preprocess(self, img))
    batches = list(captioner.iter_caption_paths(
        [*test_images[:5], tmp_path / "missing.png"], batch_size=2))
    assert [len(c) for c, _ in batches] == [0, 2, 2, 1]
    assert batches[0][1] == [(tmp_path / "missing.png", "no such file or folder")]
    assert [cap.path for caps, _ in batches[1:] for cap in caps] == test_images[:5]
    assert events[:4] == [("load", test_images[0].name), ("resize",),
                          ("load", test_images[1].name), ("resize",)]


def test_an_image_too_large_for_memory_fails_alone(captioner: Captioner,
                                                   test_images: list[Path], tmp_path: Path,
                                                   monkeypatch) -> None:
    """A PNG under the pixel limit can still need more memory than there is (23000 x 23000
    from 500 KB): its MemoryError ended ``captioner caption`` with a traceback and no line of
    output. It is now that image's error."""
    from PIL import ImageFile

    huge = tmp_path / "huge.png"
    huge.write_bytes(test_images[1].read_bytes())
    decode = ImageFile.ImageFile.load

    def load(self):
        if Path(getattr(self, "filename", "")).name == "huge.png":
            raise MemoryError
        return decode(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    captions, errors = captioner.caption_paths([test_images[0], huge, test_images[2]])
    assert [c.path for c in captions] == [test_images[0], test_images[2]]
    assert errors == [(huge, "image too large to decode in the memory available")]
    with pytest.raises(ImageLoadError, match="huge.png: image too large to decode"):
        load_image(huge)


def test_caption_tensors_refuses_integer_images_and_reads_any_float(
        captioner: Captioner, test_images: list[Path]) -> None:
    """``uint8`` in [0, 255] (``torchvision.io.read_image``) was captioned as if in [0, 1]
    ("a a a a ..."), float64 failed inside a matmul, a grey (B, 1, H, W) batch inside a conv."""
    batch = torch.stack([captioner.preprocess(load_image(p)) for p in test_images[:3]])
    expected = captioner.caption_tensors(batch)
    with pytest.raises(TypeError, match=r"floating point in \[0, 1\], got torch.uint8 "
                                        r"\(uint8 images in \[0, 255\]: divide by 255 first\)"):
        captioner.caption_tensors((batch * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) RGB, got shape \(3, 1, "):
        captioner.caption_tensors(batch[:, :1])
    for got, want in zip(captioner.caption_tensors(batch.double()), expected):
        _same(got, want)


def test_batch_sizes_below_one_and_integer_precision(captioner: Captioner,
                                                     test_images: list[Path],
                                                     tiny_checkpoint: Path) -> None:
    for call in (captioner.caption, captioner.caption_paths):
        with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
            call(test_images[:2], batch_size=0)
    # precision=32 (Lightning's spelling) was refused as "must be one of 32, bf16, got 32"
    assert Captioner.from_checkpoint(tiny_checkpoint, precision=32).precision == "32"


# ------------------------------------------------------------------------------- bad checkpoints
def _variant(tiny_checkpoint: Path, tmp_path: Path, name: str, edit) -> Path:
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    edit(ckpt)
    out = tmp_path / name
    torch.save(ckpt, out)
    return out


class UntypedAdditive(AdditiveAttention):
    """A user's score function written to the README's contract, its parameters untyped."""

    def __init__(self, query_dim, key_dim, attention_dim=8):  # noqa: ANN001 - untyped on purpose
        super().__init__(query_dim, key_dim, attention_dim)


def test_a_checkpoint_of_a_class_with_untyped_parameters_rebuilds(tiny_checkpoint: Path,
                                                                  captioner: Captioner,
                                                                  test_images: list[Path],
                                                                  tmp_path: Path) -> None:
    """LightningCLI reads classes with ``fail_untyped=False``, so such a model trained; the
    inference tools refused its checkpoint ("Parser key "decoder":", the reason cut off)."""
    def edit(ckpt):
        attention = ckpt["captioner"]["model_config"]["init_args"]["decoder"]["init_args"][
            "attention"]
        attention["class_path"] = f"{__name__}.UntypedAdditive"

    untyped = Captioner.from_checkpoint(_variant(tiny_checkpoint, tmp_path, "untyped.ckpt", edit))
    assert type(untyped.decoder.attention) is UntypedAdditive
    _same(untyped.caption(test_images[0])[0], captioner.caption(test_images[0])[0])


@pytest.mark.parametrize("key, value, says", [
    ("gate", "sigmoid", 'Parser key "decoder": Parser key "gate": Expected a typing.Literal['
                        "'scalar', 'vector', 'none']. Got value: sigmoid)"),
    ("hidden_dim", "big", "Parser key \"hidden_dim\": Expected a <class 'int'>. Got value: big)"),
    ("nosuch", 1, "Parser key \"decoder\": Option 'nosuch' is not accepted)"),
    ("encoder.nosuch", 1, "Parser key \"encoder\": Problem with given class_path "
                          "'captioner.encoders.ImageEncoder': Option 'nosuch' is not accepted)"),
    ("encoder.freeze", "maybe", "'captioner.encoders.ImageEncoder': Parser key \"freeze\": "
                                "Expected a <class 'bool'>. Got value: maybe)")])
def test_a_stored_config_that_does_not_rebuild_is_named_by_key_and_reason(
        tiny_checkpoint: Path, tmp_path: Path, key, value, says) -> None:
    """The one line named neither the key nor the reason once every part was read as an
    ``Optional`` (jsonargparse's union report: "Does not validate against any of the Union
    subtypes"); the encoder's (a class, not a callable) ended on "Problem with given
    class_path '...':"."""
    def edit(ckpt):
        part, _, name = key.rpartition(".")
        ckpt["captioner"]["model_config"]["init_args"][part or "decoder"]["init_args"][
            name] = value

    with pytest.raises(CheckpointError) as e:
        Captioner.from_checkpoint(_variant(tiny_checkpoint, tmp_path, "bad.ckpt", edit))
    assert str(e.value).endswith(says) and "\n" not in str(e.value), str(e.value)


def test_random_bytes_and_missing_files_are_not_checkpoints(tmp_path: Path) -> None:
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="noise.ckpt: not a checkpoint file"):
        Captioner.from_checkpoint(noise)
    torn = tmp_path / "torn.ckpt"  # a zip archive, but not one torch can read
    with zipfile.ZipFile(torn, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    with pytest.raises(CheckpointError, match="torn.ckpt: not a readable PyTorch checkpoint"):
        Captioner.from_checkpoint(torn)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Captioner.from_checkpoint(tmp_path / "nothing.ckpt")


def test_a_checkpoint_cut_short_gets_one_message_from_the_tools_and_lightning(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The tools said "not a torch.save archive", ``fit/test --ckpt_path`` the same with "cut
    short, empty, or another kind of file": one loader now answers both, and a file that
    loads but is not a dict is refused by both."""
    from captioner.cli import _checkpoint_meta

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_checkpoint.read_bytes()[: tiny_checkpoint.stat().st_size // 2])
    says = f"{cut}: not a checkpoint file (not a torch.save archive: cut short, empty, or"
    for read in (Captioner.from_checkpoint, _checkpoint_meta):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            read(cut)
    listed = tmp_path / "list.ckpt"
    torch.save([1, 2], listed)
    for read in (Captioner.from_checkpoint, _checkpoint_meta):
        with pytest.raises(CheckpointError, match=re.escape(f"{listed}: not a checkpoint (a list)")):
            read(listed)

def damaged_copy(checkpoint: Path, out: Path) -> str:
    """``checkpoint`` copied to ``out`` with 16 bytes inverted in the middle of its largest
    weight record: the same size, still a zip archive that ``torch.load`` reads.

    Returns:
        The name of the damaged record."""
    import struct

    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack_from("<2H", data, record.header_offset + 26)
    middle = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    out.write_bytes(bytes(data))
    return record.filename


def test_a_damaged_checkpoint_is_refused_naming_the_record(tiny_checkpoint: Path,
                                                          tmp_path: Path, capsys) -> None:
    """Bytes changed in a copy or download, the size kept: ``torch.load`` read it silently and
    the model captioned nonsense; the archive's stored checksums now refuse it, in the API and
    in the Lightning commands (``--ckpt_path``)."""
    from captioner.cli import main

    damaged = tmp_path / "damaged.ckpt"
    record = damaged_copy(tiny_checkpoint, damaged)
    torch.load(damaged, map_location="cpu", weights_only=True)  # torch reads it as it is
    with pytest.raises(CheckpointError, match=f"damaged.ckpt: damaged checkpoint: the bytes of "
                                              f"{record} do not match"):
        Captioner.from_checkpoint(damaged)
    assert main(["test", "--ckpt_path", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert f"damaged.ckpt: damaged checkpoint: the bytes of {record}" in err and \
        err.count("\n") == 1
    Captioner.from_checkpoint(tiny_checkpoint)  # the original: its checksums hold
    # a file found whole, then replaced by a damaged copy keeping its size and mtime (cp -p):
    # checked again (a cache of files checked by size and mtime alone took it for the old one)
    import shutil

    whole = tmp_path / "whole.ckpt"
    shutil.copy2(tiny_checkpoint, whole)
    Captioner.from_checkpoint(whole)
    before = whole.stat()
    shutil.copy2(damaged, tmp_path / "damaged_same_time.ckpt")
    os.utime(tmp_path / "damaged_same_time.ckpt", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp_path / "damaged_same_time.ckpt", whole)
    assert (whole.stat().st_size, whole.stat().st_mtime_ns) == (before.st_size,
                                                                before.st_mtime_ns)
    with pytest.raises(CheckpointError, match="whole.ckpt: damaged checkpoint"):
        Captioner.from_checkpoint(whole)
    # saved without checksums (torch's option): nothing to check, not "damaged"
    from torch.utils.serialization import config

    unchecked = tmp_path / "unchecked.ckpt"
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    config.save.compute_crc32 = False
    try:
        torch.save(ckpt, unchecked)
    finally:
        config.save.compute_crc32 = True
    with zipfile.ZipFile(unchecked) as archive:
        assert {r.CRC for r in archive.infolist() if r.file_size} == {0}
    Captioner.from_checkpoint(unchecked)


def test_torch_file_without_captioner_metadata(tmp_path: Path) -> None:
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, plain)
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        Captioner.from_checkpoint(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match=r"tensor\.pt: not a checkpoint \(a Tensor\)"):
        read_checkpoint(tensor)


def test_vocabulary_mismatch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def bigger_vocab(ckpt):
        itos = ckpt["captioner"]["vocab"]["itos"]
        ckpt["captioner"]["vocab"] = Vocabulary([*itos, "zebra"]).to_dict()

    path = _variant(tiny_checkpoint, tmp_path, "vocab.ckpt", bigger_vocab)
    V = torch.load(tiny_checkpoint, weights_only=True)["hyper_parameters"]["vocab_size"]
    with pytest.raises(CheckpointError, match=f"vocabulary mismatch.*{V + 1} words.*built for {V}"):
        Captioner.from_checkpoint(path)

    def bigger_model(ckpt):  # config and vocabulary agree, the weights do not
        bigger_vocab(ckpt)
        ckpt["captioner"]["model_config"]["init_args"]["vocab_size"] = V + 1

    path = _variant(tiny_checkpoint, tmp_path, "weights.ckpt", bigger_model)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        Captioner.from_checkpoint(path)

    def missing_decoder_weight(ckpt):  # a decoder weight the config needs is not in the file
        del ckpt["state_dict"][next(k for k in ckpt["state_dict"] if k.startswith("decoder."))]

    path = _variant(tiny_checkpoint, tmp_path, "partial.ckpt", missing_decoder_weight)
    with pytest.raises(CheckpointError, match="weights do not fit.*Missing key"):
        Captioner.from_checkpoint(path)


def test_search_settings_come_from_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = {"beam_size": 3, "max_length": 5, "min_length": 2, "length_penalty": 0.7,
                "beam_stop": "exact"}
    path = _variant(tiny_checkpoint, tmp_path, "beam.ckpt",
                    lambda ckpt: ckpt["hyper_parameters"].update(settings))
    assert Captioner.from_checkpoint(path).search == settings


def test_wrong_task_and_broken_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def translation(ckpt):
        ckpt["captioner"]["task"] = "translation"

    path = _variant(tiny_checkpoint, tmp_path, "nmt.ckpt", translation)
    with pytest.raises(CheckpointError, match="'translation' checkpoint, expected 'captioning'"):
        Captioner.from_checkpoint(path)

    def unknown_backbone(ckpt):
        ckpt["captioner"]["model_config"]["init_args"]["encoder"]["init_args"]["backbone"] = "nope"

    path = _variant(tiny_checkpoint, tmp_path, "config.ckpt", unknown_backbone)
    with pytest.raises(CheckpointError, match="cannot rebuild the model"):
        Captioner.from_checkpoint(path)


def test_a_checkpoint_naming_pretrained_weights_loads_offline(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    """The stored config says ``weights: IMAGENET1K_V1`` (as resnet101_soft.yaml does): the
    backbone is rebuilt without them (the checkpoint holds every weight), so nothing is
    downloaded and a machine without internet loads it."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models._api import WeightsEnum

    from captioner.lit.captioning import CaptioningModule

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    vocab_size = len(ckpt["captioner"]["vocab"]["itos"])
    encoder = {"class_path": "captioner.encoders.ImageEncoder",
               "init_args": {"backbone": "resnet18", "weights": None,
                             "grid_size": list(TINY_GRID)}}
    torch.manual_seed(0)
    module = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "encoder": encoder,
                                           "vocab_size": vocab_size})
    named = {**encoder, "init_args": {**encoder["init_args"], "weights": "IMAGENET1K_V1"}}
    ckpt["state_dict"] = module.state_dict()
    ckpt["captioner"]["model_config"] = {**ckpt["captioner"]["model_config"],
                                         "init_args": {**TINY_MODEL_CONFIG, "encoder": named,
                                                       "vocab_size": vocab_size}}
    path = tmp_path / "resnet.ckpt"
    torch.save(ckpt, path)

    def no_internet(self, *args, **kwargs):
        raise RuntimeError(f"download attempted: {self}")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_internet)
    captioner = Captioner.from_checkpoint(path)
    torch.testing.assert_close(captioner.encoder.body.layer1[0].conv1.weight,
                               module.encoder.body.layer1[0].conv1.weight)
    expected = ResNet18_Weights.IMAGENET1K_V1.transforms().mean
    assert captioner.encoder.mean.flatten().tolist() == pytest.approx(expected)  # the weights'
    (caption,) = captioner.caption([Image.new("RGB", (40, 30), (200, 20, 20))])
    assert caption.alphas.shape[1:] == TINY_GRID
    with pytest.raises(RuntimeError, match="download attempted"):  # outside: they would load
        CaptioningModule.from_config({**TINY_MODEL_CONFIG, "encoder": named,
                                      "vocab_size": vocab_size})


def test_in_memory_images_of_any_mode_are_seen_as_from_a_file(tiny_checkpoint, tmp_path):
    """A 16-bit or transparent PIL image passed to ``caption`` is converted as the loader
    converts files (scaled, composited on white), not by PIL's saturating ``convert``."""
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    seen = []  # the pixels the model gets
    decode = captioner.caption_tensors
    captioner.caption_tensors = lambda batch, *a, **k: seen.append(batch) or decode(batch, *a, **k)
    deep = Image.fromarray(np.tile(np.linspace(0, 65535, 40, dtype=np.uint16), (30, 1)))
    clear = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    for image in (deep, clear):
        path = tmp_path / f"{image.mode}.png"
        image.save(path)
        (in_memory,), (from_file,) = captioner.caption([image]), captioner.caption([path])
        torch.testing.assert_close(seen[-2], seen[-1])
        assert in_memory.tokens == from_file.tokens
    assert seen[-1].min() == 1.0  # transparent: white, not black
    assert 0.4 < seen[-4].mean() < 0.6  # a 16-bit ramp: scaled, not saturated to white


def test_in_memory_images_are_turned_by_their_exif_orientation(tiny_checkpoint, tmp_path):
    """A PIL image with an EXIF orientation is captioned as its file is: turned upright (a
    30 x 50 photo stored sideways is seen and kept 50 x 30)."""
    captioner = Captioner.from_checkpoint(tiny_checkpoint)
    seen = []  # the pixels the model gets
    decode = captioner.caption_tensors
    captioner.caption_tensors = lambda batch, *a, **k: seen.append(batch) or decode(batch, *a, **k)
    pixels = np.random.default_rng(0).integers(0, 255, (50, 30, 3), dtype=np.uint8)  # (H, W, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "sideways.png"
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as opened:
        (in_memory,) = captioner.caption([opened])
    (from_file,) = captioner.caption([path])
    torch.testing.assert_close(seen[0], seen[1])
    assert in_memory.image.size == from_file.image.size == (50, 30)  # W x H, upright
    assert in_memory.image.mode == "RGB" and in_memory.tokens == from_file.tokens


@pytest.mark.parametrize("module, part_types", [
    ("captioner.lit.captioning.CaptioningModule", "captioner.inference.PART_TYPES"),
    ("captioner.lit.translation.TranslationModule", "captioner.translate.PART_TYPES"),
])
def test_inference_rebuilds_parts_typed_as_the_lightning_modules_take_them(module, part_types):
    """Inference spells out the modules' ``encoder`` / ``decoder`` types so as not to import
    Lightning; they must stay those of the constructors, or checkpoints would rebuild wrong."""
    import typing

    from captioner.config import import_class

    hints = typing.get_type_hints(import_class(module).__init__)
    spelled = import_class(part_types)
    assert set(spelled) == {"encoder", "decoder"}
    def normal(t):  # typing.Callable and collections.abc.Callable are the same type hint
        return (typing.get_origin(t) or t, typing.get_args(t))

    for name, type_ in spelled.items():
        assert normal(hints[name]) == normal(type_), name


def _output_dtypes(captioner: Captioner, images: list[Path], **kw) -> tuple[set, list[Caption]]:
    """The dtypes of the encoder's output and the output layer's logits while captioning."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in (captioner.encoder, captioner.decoder.L_o)]
    try:
        return seen, captioner.caption(images, **kw)
    finally:
        for hook in hooks:
            hook.remove()


def test_bf16_precision_runs_the_model_in_bf16_and_reports_in_float32(
        tiny_checkpoint: Path, captioner: Captioner, test_images: list[Path]) -> None:
    bf16 = Captioner.from_checkpoint(tiny_checkpoint, precision="bf16")
    assert bf16.precision == "bf16" and captioner.precision == "32"
    for model, dtype in ((captioner, torch.float32), (bf16, torch.bfloat16)):
        for beam in (1, 3):
            seen, caps = _output_dtypes(model, test_images, beam_size=beam)
            assert seen == {dtype}, (model.precision, beam)
            assert len(caps) == len(test_images)
            for c in caps:
                assert c.alphas.dtype == np.float32 and isinstance(c.score, float)
                assert np.allclose(c.alphas.sum(axis=(1, 2)), 1.0, atol=2e-2)
    with torch.no_grad():  # the model itself is left in float32
        assert all(p.dtype == torch.float32 for p in bf16.decoder.parameters())


def test_unknown_precision_is_refused_and_emulated_bf16_warns(tiny_checkpoint: Path,
                                                              monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"precision must be one of 32, bf16, got '16'"):
        Captioner.from_checkpoint(tiny_checkpoint, precision="16")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        Captioner.from_checkpoint(tiny_checkpoint, precision="bf16")
