"""Tests for the ``captioner caption | evaluate | visualize`` sub-commands (captioner.commands).

The commands run in-process through :func:`captioner.cli.main` (output captured with capsys);
one test runs the installed ``captioner`` entry point in a subprocess.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from captioner.cli import main
from captioner.data.datamodule import ShapesDataModule
from captioner.data.vocabulary import Vocabulary
from captioner.inference import Captioner
from tests.conftest import TINY_GRID, red_squares, red_squares_checkpoint, shapes_data_config

H, W = TINY_GRID


@pytest.fixture(scope="module")
def captioner(tiny_checkpoint: Path) -> Captioner:
    return Captioner.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def test_images(shapes_root: Path) -> list[Path]:
    return sorted((shapes_root / "test" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("bad_ckpts")
    noise = folder / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(1).bytes(2048))
    plain = folder / "plain.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, plain)
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    itos = ckpt["captioner"]["vocab"]["itos"]
    ckpt["captioner"]["vocab"] = Vocabulary([*itos, "zebra"]).to_dict()  # one word too many
    vocab = folder / "vocab.ckpt"
    torch.save(ckpt, vocab)
    return {"noise": (noise, "not a checkpoint file"),
            "plain": (plain, "not a captioner checkpoint"),
            "vocab": (vocab, "vocabulary mismatch")}


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


# ================================================================================== caption
def test_caption_plain_output_matches_the_api(capsys, tiny_checkpoint, captioner,
                                              test_images, shapes_root) -> None:
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--batch-size", "4",
                            shapes_root / "test")
    assert status == 0, err
    lines = out.splitlines()
    expected = captioner.caption(test_images)
    assert lines == [f"{p}\t{c.text}" for p, c in zip(test_images, expected)]


def test_caption_json_with_beam(capsys, tiny_checkpoint, captioner, test_images) -> None:
    status, out, _ = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--json",
                          "--beam-size", "3", "--max-length", "4", *test_images[:2])
    assert status == 0
    rows = json.loads(out)
    expected = captioner.caption(test_images[:2], beam_size=3, max_length=4)
    assert [r["image"] for r in rows] == [str(p) for p in test_images[:2]]
    for row, c in zip(rows, expected):
        assert set(row) >= {"image", "caption", "tokens", "score"}
        assert row["caption"] == c.text and row["words"] == c.words
        assert row["tokens"] == c.tokens and len(row["tokens"]) <= 4
        assert row["score"] == pytest.approx(c.score, abs=1e-5)


def test_caption_compile_search_matches_the_eager_captions(capsys, monkeypatch, tiny_checkpoint,
                                                          captioner, test_images) -> None:
    from captioner import attention
    from captioner.compiled import CompiledOrEager

    switched = []
    monkeypatch.setattr(attention, "_FUSED_ENERGIES", CompiledOrEager(
        lambda *a: switched.append(1) or attention.fused_energies(*a)))  # compiled, counted
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile would warn
        status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--json",
                                "--beam-size", "3", "--compile-search", *test_images[:3])
    assert status == 0, err
    assert switched  # the search's energies came from the fused function...
    assert attention._FUSED_ENERGIES.failed == {}  # ...compiled
    expected = captioner.caption(test_images[:3], beam_size=3)
    for row, c in zip(json.loads(out), expected):
        assert row["tokens"] == c.tokens and row["score"] == pytest.approx(c.score, abs=1e-5)


def test_caption_precision_bf16_matches_the_api_and_unknown_is_a_usage_error(
        capsys, tiny_checkpoint, test_images) -> None:
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--json",
                            "--precision", "bf16", *test_images[:3])
    assert status == 0, err
    expected = Captioner.from_checkpoint(tiny_checkpoint, precision="bf16").caption(
        test_images[:3])
    assert [r["caption"] for r in json.loads(out)] == [c.text for c in expected]
    status, _, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--precision", "16",
                          *test_images[:1])
    assert status == 2 and "--precision: invalid choice: '16'" in err


def test_hard_test_on_a_soft_checkpoint_is_refused(capsys, tiny_checkpoint, test_images) -> None:
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--hard-test",
                            "expectation", test_images[0])
    assert status == 2 and out == ""
    assert err.strip() == (f"captioner caption: error: --hard-test expectation: {tiny_checkpoint} "
                           "has soft attention; the option chooses how hard attention "
                           "(attention_mode: hard) attends at test time")


def test_caption_reports_bad_paths_and_captions_the_others(capsys, tiny_checkpoint,
                                                           test_images, tmp_path) -> None:
    full = tmp_path / "full.jpg"
    Image.open(test_images[0]).convert("RGB").save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:200])
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    fake = tmp_path / "fake.jpg"
    fake.write_text("hello")
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, test_images[1],
                            tmp_path / "missing.png", truncated, notes, fake, test_images[2])
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(test_images[1]),
                                                                  str(test_images[2])]
    assert f"{tmp_path / 'missing.png'}: no such file" in err
    assert f"{truncated}: truncated image: the file ends before the image data does" in err
    assert f"{notes}: not an image file extension (.txt)" in err
    assert f"{fake}: not a recognised image format" in err
    assert "4 path(s) not captioned, 2 captioned" in err


def test_caption_of_a_file_name_that_is_not_utf8(monkeypatch, tiny_checkpoint, test_images,
                                                  tmp_path) -> None:
    """A file name that is not valid UTF-8 (``b\\xff.png``) is written back as its bytes on a
    strict UTF-8 stdout (it was a UnicodeEncodeError that lost the captions after it, and all
    of ``--json``), and escaped in the JSON, which stays valid."""
    import io
    import shutil

    folder = tmp_path / "odd"
    folder.mkdir()
    odd = folder / os.fsdecode(b"b\xff.png")
    for path in (folder / "a.png", odd, folder / "c.png"):
        shutil.copy(test_images[0], path)
    for extra in ([], ["--json"]):
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
        monkeypatch.setattr(sys, "stdout", stdout)  # strict, as on a UTF-8 terminal
        assert main(["caption", "--ckpt", str(tiny_checkpoint), *extra, str(folder)]) == 0
        raw = stdout.buffer.getvalue()
        if extra:
            assert [r["image"] for r in json.loads(raw)] == [
                str(folder / "a.png"), str(odd), str(folder / "c.png")]
        else:
            lines = raw.splitlines()
            assert len(lines) == 3 and lines[1].startswith(os.fsencode(odd) + b"\t")


def test_caption_on_a_console_without_the_characters_of_a_name(monkeypatch, tiny_checkpoint,
                                                               test_images, tmp_path) -> None:
    """On an ASCII (or Windows code page) stdout a name such as ``ñandú 日本.png`` was a
    UnicodeEncodeError part way through the lines, and nothing at all with ``--json``: the
    lines now write it backslash-escaped, the JSON ``\\u``-escaped (still valid)."""
    import io
    import shutil

    name = "\u00f1and\u00fa \u65e5\u672c.png"
    shutil.copy(test_images[0], tmp_path / name)
    shutil.copy(test_images[1], tmp_path / "z.png")
    for extra in ([], ["--json"]):
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", write_through=True)
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["caption", "--ckpt", str(tiny_checkpoint), *extra, str(tmp_path)]) == 0
        raw = stdout.buffer.getvalue().decode("ascii")
        if extra:
            assert [r["image"] for r in json.loads(raw)] == [str(tmp_path / "z.png"),
                                                             str(tmp_path / name)]
        else:  # (sorted by code point: "z" < "ñ")
            lines = raw.splitlines()
            assert [line.split("\t")[0] for line in lines] == [
                str(tmp_path / "z.png"), f"{tmp_path}/\\xf1and\\xfa \\u65e5\\u672c.png"]


def test_caption_writes_each_batch_before_the_next(capsys, monkeypatch, tiny_checkpoint,
                                                   test_images) -> None:
    """The lines came only after the last image: an interrupted run (Ctrl-C, or a failure
    part way) had written nothing, however many images it had captioned."""
    from captioner.inference import Captioner

    tensors = Captioner.caption_tensors
    calls = []

    def interrupted_at_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return tensors(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption_tensors", interrupted_at_the_second_batch)
    for extra in ([], ["--json"]):
        calls.clear()
        status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, *extra,
                                "--batch-size", "2", *test_images[:4])
        assert status == 130 and "interrupted" in err
        if extra:  # the first batch's two rows, in an array closed as the run ended
            assert [r["image"] for r in json.loads(out)] == [str(p) for p in test_images[:2]]
        else:
            assert [line.split("\t")[0] for line in out.splitlines()] == [
                str(p) for p in test_images[:2]]


class _ReaderGoneAfter(io.StringIO):
    """A stdout whose reader goes away (``| head -N``) after ``lines`` writes."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines

    def write(self, text: str) -> int:
        if self.lines <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines -= 1
        return super().write(text)


def test_caption_into_a_closed_pipe_still_says_a_path_failed(monkeypatch, tiny_checkpoint,
                                                              test_images, tmp_path) -> None:
    """``captioner caption DIR | head -1`` exited 0 after reporting an unreadable file: the
    closed pipe was taken as success whatever had failed before it."""
    (tmp_path / "bad.jpg").write_text("not an image")
    for paths, status in (([tmp_path / "bad.jpg", *test_images[:3]], 1), (test_images[:3], 0)):
        monkeypatch.setattr(sys, "stdout", _ReaderGoneAfter(1))
        assert main(["caption", "--ckpt", str(tiny_checkpoint), "--batch-size", "1",
                     *map(str, paths)]) == status
    # `2>&1 | head -1`: the pipe closes while the failures are being reported (on stderr)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_text("not an image either")
    gone = _ReaderGoneAfter(1)
    monkeypatch.setattr(sys, "stdout", gone)
    monkeypatch.setattr(sys, "stderr", gone)
    assert main(["caption", "--ckpt", str(tiny_checkpoint), str(tmp_path / "a.jpg"),
                 str(tmp_path / "b.jpg"), str(tmp_path / "bad.jpg")]) == 1


def test_caption_of_odd_images(capsys, tiny_checkpoint, test_images, tmp_path) -> None:
    src = Image.open(test_images[0]).convert("RGB")
    src.convert("L").save(tmp_path / "grey.png")
    src.convert("P").save(tmp_path / "palette.gif")
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.asarray(src.convert("L"), np.uint16) * 257)).save(tmp_path / "deep.png")
    Image.new("RGBA", (1, 1), (9, 9, 9, 0)).save(tmp_path / "tiny.png")
    src.resize((3000, 2000)).save(tmp_path / "large.png", compress_level=1)
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--json", tmp_path)
    assert status == 0, err
    rows = json.loads(out)
    assert sorted(Path(r["image"]).name for r in rows) == sorted(
        ["grey.png", "palette.gif", "cmyk.jpg", "deep.png", "tiny.png", "large.png"])
    assert all(r["tokens"] and np.isfinite(r["score"]) for r in rows)


def test_caption_lines_escape_the_characters_that_would_split_them(capsys, tiny_checkpoint,
                                                                  captioner, test_images,
                                                                  tmp_path) -> None:
    """A file name with a tab or a newline made ``path<TAB>caption`` lines that could not be
    split back; such names are written with backslash escapes (the backslash too)."""
    import shutil

    names = ["tab\there.png", "new\nline.png", "back\\slash.png", "plain.png"]
    for name in names:
        shutil.copy(test_images[0], tmp_path / name)
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, tmp_path)
    assert status == 0, err
    text = captioner.caption([test_images[0]])[0].text
    lines = out.split("\n")[:-1]
    written = {"tab\\there.png", "new\\nline.png", "back\\\\slash.png", "plain.png"}
    assert len(lines) == 4 and all(line.count("\t") == 1 for line in lines)
    assert {line.split("\t")[0][len(str(tmp_path)) + 1:] for line in lines} == written
    assert {line.split("\t")[1] for line in lines} == {text}
    # a path that is not captioned is reported on one line too, escaped alike
    (tmp_path / "bad:\nname.png").write_bytes(b"not an image")
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, tmp_path)
    assert status == 1 and len(out.split("\n")[:-1]) == 4
    reported = err.split("\n")[:-1]
    assert len(reported) == 2, err  # the path, and the count
    assert reported[0].startswith(f"captioner caption: {tmp_path}/bad:\\nname.png: "), err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch, tiny_checkpoint,
                                           test_images) -> None:
    """Ctrl-C in a tool printed a KeyboardInterrupt traceback and exited 1."""
    import captioner.commands.caption as caption

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(caption, "load_captioner", interrupted)
    status, _, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, test_images[0])
    assert status == 130 and err == "captioner caption: error: interrupted\n"


@pytest.mark.parametrize("kind", ["noise", "plain", "vocab"])
def test_bad_checkpoint_is_one_clear_line(kind, capsys, bad_checkpoints, test_images) -> None:
    path, reason = bad_checkpoints[kind]
    status, out, err = _run(capsys, "caption", "--ckpt", path, test_images[0])
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"captioner caption: error: {path}: ")
    assert reason in err


def test_usage_errors(capsys, tiny_checkpoint, test_images) -> None:
    status, _, err = _run(capsys, "caption", test_images[0])
    assert status == 2 and "--ckpt" in err
    status, _, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--beam-size", "0",
                          test_images[0])
    assert status == 2 and "positive integer" in err
    status, out, _ = _run(capsys, "visualize", "--help")
    assert status == 0 and "--save-maps" in out
    for option, value, says in [("--device", "bogus", "not a torch device: 'bogus'"),
                                ("--device", "cuda:7", "cuda:7: "),
                                ("--num-workers", "-1", "expected an integer >= 0")]:
        tool = "evaluate" if option == "--num-workers" else "caption"
        status, _, err = _run(capsys, tool, "--ckpt", tiny_checkpoint, option, value,
                              *([test_images[0]] if tool == "caption" else []))
        assert status == 2 and says in err, err  # argparse usage, no traceback


def test_help_lists_every_command(capsys) -> None:
    status, out, _ = _run(capsys, "--help")
    assert status == 0
    for name in ("fit", "validate", "test", "demo", "caption", "evaluate", "visualize",
                 "translate", "extract-features"):
        assert f"\n  {name} " in out, name
    assert "predict" not in out  # Trainer.predict has nothing to run: `caption` does it
    status, _, err = _run(capsys, "predict")
    assert status == 2 and "unknown command 'predict'" in err


def test_entry_point_in_a_subprocess(tiny_checkpoint, test_images, tmp_path) -> None:
    exe = Path(sys.executable).parent / "captioner"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(exe), "caption", "--ckpt", str(tiny_checkpoint),
                           str(test_images[0]), str(tmp_path / "missing.png")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{test_images[0]}\t") and proc.stdout.count("\n") == 1
    assert "missing.png: no such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["captioner", "captioner.cli"])
def test_python_dash_m_has_every_command(module, tiny_checkpoint, test_images) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, "caption", "--ckpt",
                           str(tiny_checkpoint), str(test_images[0])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{test_images[0]}\t")


# ================================================================================== evaluate
def _lightning_style_config(tmp_path: Path, shapes_root: Path) -> Path:
    config = {"seed_everything": 0, "trainer": {"max_epochs": 1},
              "data": shapes_data_config(shapes_root, batch_size=5)}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_decodes_each_image_once_and_writes_coco_results(
        capsys, monkeypatch, tiny_checkpoint, captioner, shapes_root, tmp_path) -> None:
    from pycocotools.coco import COCO

    decoded: list[int] = []
    original = Captioner.caption_tensors

    def counting(self, images, *args, **kwargs):
        decoded.append(images.shape[0])
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption_tensors", counting)
    config = _lightning_style_config(tmp_path, shapes_root)
    out_dir = tmp_path / "eval"
    status, out, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", config,
                            "--batch-size", "4", "--out", out_dir, "--no-java")
    assert status == 0, err
    assert decoded == [4, 2]  # the 6 test images, each exactly once

    metrics = json.loads((out_dir / "metrics_test.json").read_text())
    assert list(metrics["scores"]) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert set(metrics["skipped"]) == {"PTBTokenizer", "METEOR", "SPICE"}
    assert metrics["protocol"]["images"] == 6 and metrics["protocol"]["beam_size"] == 1
    assert metrics["protocol"]["length_penalty"] == captioner.search["length_penalty"]
    assert metrics["protocol"]["min_length"] == captioner.search["min_length"]
    assert 0.0 <= metrics["attention_correctness"] <= 1.0
    assert 0.0 < metrics["attention_chance"] < 1.0 and metrics["attention_words"] >= 1
    for name in ("METEOR", "SPICE"):
        assert err.count(f"captioner evaluate: {name} skipped: use_java=False") == 1
    for name, value in metrics["scores"].items():
        assert f"{value:.4f}" in out and name in out
    assert metrics["protocol"]["cells"] == "tile" and metrics["protocol"]["hard_test"] is None

    # cells at the receptive fields' centres: the same captions, correctness scored there
    status, out, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", config,
                            "--batch-size", "4", "--out", tmp_path / "eval_rf", "--no-java",
                            "--cells", "receptive-field")
    assert status == 0, err
    rf = json.loads((tmp_path / "eval_rf" / "metrics_test.json").read_text())
    assert rf["protocol"]["cells"] == "receptive_field" and rf["scores"] == metrics["scores"]
    assert 0.0 <= rf["attention_correctness"] <= 1.0
    assert "attention correctness" in out and "chance" in out

    # The results file is what COCO.loadRes expects, with the API's captions.
    gt = COCO(str(shapes_root / "annotations" / "captions_test.json"))
    res = gt.loadRes(str(out_dir / "captions_test.json"))
    records = {img["id"]: img["file_name"] for img in gt.dataset["images"]}
    images_dir = shapes_root / "test" / "images"
    for image_id, file_name in records.items():
        (row,) = res.imgToAnns[image_id]
        assert row["caption"] == captioner.caption(images_dir / file_name)[0].text
        assert Path(row["file_name"]) == images_dir / file_name  # the row names its image


def test_evaluate_warns_of_empty_captions_and_counts_them(capsys, tiny_checkpoint, shapes_root,
                                                         tmp_path) -> None:
    """Empty captions (``<end>`` first) score 0 on every metric; ``evaluate`` said nothing of
    them (validation warned). It now warns with their count, recorded in the protocol."""
    from captioner.data.vocabulary import END, SPECIALS

    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["decoder.L_o.bias"][SPECIALS.index(END)] = 100.0  # <end> always first
    ends_first = tmp_path / "ends_first.ckpt"
    torch.save(ckpt, ends_first)
    config = _lightning_style_config(tmp_path, shapes_root)
    for path, empty in [(tiny_checkpoint, 0), (ends_first, 6)]:
        out_dir = tmp_path / f"eval_{empty}"
        status, _, err = _run(capsys, "evaluate", "--ckpt", path, "--config", config,
                              "--out", out_dir, "--no-java")
        assert status == 0, err
        metrics = json.loads((out_dir / "metrics_test.json").read_text())
        assert metrics["protocol"]["empty_captions"] == empty
        assert ("captioner evaluate: WARNING: test: 6 of 6 decoded captions are empty"
                in err) == bool(empty), err


def test_evaluate_reads_images_at_the_data_configs_size_and_warns_if_not_the_trained_one(
        capsys, tiny_checkpoint, tmp_path) -> None:
    """``--data.init_args.image_size`` (or a data config of another size) was ignored: the
    images were read at the checkpoint's size while the metrics file listed the override as
    applied (and ``captioner test`` read them at the data config's). Both read the data
    config's now, ``evaluate`` warning where it is not the trained size; the size used is
    recorded."""
    trained, _ = red_squares_checkpoint(tiny_checkpoint, tmp_path)
    for extra, size in [([], 16), (["--data.init_args.image_size", "20"], 20)]:
        out_dir = tmp_path / f"eval_{size}"
        status, _, err = _run(capsys, "evaluate", "--ckpt", trained, "--out", out_dir,
                              "--no-java", *extra)
        assert status == 0, err
        assert json.loads((out_dir / "metrics_test.json").read_text())[
            "protocol"]["image_size"] == size
        warned = ("WARNING: the images are read at image_size 20, but the model was trained "
                  "at 16: the scores are those of another input resolution")
        assert (warned in err) == (size != 16), err


def test_evaluate_uses_the_checkpoints_data_config_and_skips_java_when_missing(
        capsys, monkeypatch, tiny_checkpoint, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH
    status, out, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--split", "val",
                            "--limit", "3", "--out", tmp_path, "--precision", "bf16")
    assert status == 0, err
    assert "stored data config" in err
    assert err.count("METEOR skipped: Java not found on PATH") == 1
    assert err.count("SPICE skipped: Java not found on PATH") == 1
    metrics = json.loads((tmp_path / "metrics_val.json").read_text())
    assert metrics["protocol"]["images"] == 3 and metrics["tokenizer"] == "python"
    assert metrics["precision"] == "bf16"
    assert len(json.loads((tmp_path / "captions_val.json").read_text())) == 3


def test_evaluate_writes_each_checkpoint_of_a_run_into_its_own_folder(
        capsys, tiny_checkpoint, tmp_path) -> None:
    """The default ``--out`` was ``eval_SPLIT`` beside the checkpoint, shared by a run's best
    and last checkpoints: evaluating the second silently replaced the first's scores."""
    import shutil

    for name in ("best-epoch=02.ckpt", "last.ckpt"):
        shutil.copy(tiny_checkpoint, tmp_path / name)
        status, _, err = _run(capsys, "evaluate", "--ckpt", tmp_path / name, "--split", "val",
                              "--limit", "2", "--no-java")
        assert status == 0, err
    for stem in ("best-epoch=02", "last"):
        metrics = json.loads((tmp_path / f"eval_{stem}_val" / "metrics_val.json").read_text())
        assert metrics["checkpoint"] == str(tmp_path / f"{stem}.ckpt")
        assert (tmp_path / f"eval_{stem}_val" / "captions_val.json").is_file()


def test_stored_relative_data_paths_resolve_from_the_training_folder(
        capsys, monkeypatch, tiny_checkpoint, shapes_root, tmp_path) -> None:
    """A checkpoint remembers the folder it was trained in: its data config's relative paths
    (``root: shapes``) resolve from there when the checkpoint is evaluated from elsewhere (they
    named nothing from the new folder); a path that exists from here is left alone."""
    import os

    from captioner.commands.common import data_config_from_checkpoint

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    stored = ckpt["captioner"]["data"]["datamodule"]
    assert stored["working_dir"] == os.getcwd()  # where the fixture trained
    stored["working_dir"] = str(shapes_root.parent)
    stored["init_args"]["root"] = shapes_root.name
    moved = tmp_path / "moved.ckpt"
    torch.save(ckpt, moved)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "here").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    status, _, err = _run(capsys, "evaluate", "--ckpt", moved, "--split", "val", "--limit", "2",
                          "--out", tmp_path / "out", "--no-java")
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "metrics_val.json").read_text())[
        "protocol"]["images"] == 2
    ckpt["captioner"]["data"]["datamodule"]["init_args"].update(
        root="here", annotations={"train": "here", "val": "nowhere"})
    (shapes_root.parent / "nowhere").mkdir(exist_ok=True)
    init_args = data_config_from_checkpoint(ckpt)["init_args"]
    assert init_args["root"] == "here"  # exists from here: as stored
    assert init_args["annotations"] == {"train": "here", "val": str(shapes_root.parent / "nowhere")}


def test_evaluate_errors(capsys, tiny_checkpoint, bad_checkpoints, tmp_path) -> None:
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config",
                          tmp_path / "none.yaml")
    assert status == 2 and "none.yaml: cannot read the config" in err
    no_data = tmp_path / "trainer.yaml"
    no_data.write_text("trainer:\n  max_epochs: 1\n")
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", no_data)
    assert status == 2 and "no data section" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  class_path: captioner.data.datamodule.Nope\n")
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", bad)
    assert status == 2 and "cannot build the data module" in err
    # a misspelt option used to be dropped silently (another split scored)
    typo = tmp_path / "typo.yaml"
    data = shapes_data_config(tmp_path / "shapes")
    data["init_args"]["sed"] = 5
    typo.write_text(yaml.safe_dump({"data": data}))
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", typo)
    assert status == 2 and "ShapesDataModule has no option sed (its options: " in err, err
    # a translation data config: an AttributeError traceback (no records) after loading
    parallel = tmp_path / "parallel.yaml"
    parallel.write_text(yaml.safe_dump({"data": {
        "class_path": "captioner.data.parallel.ParallelTextDataModule",
        "init_args": {"root": str(tmp_path), "src_lang": "de", "tgt_lang": "en"}}}))
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--config", parallel)
    assert status == 2 and err.count("\n") == 1, err
    assert f"{parallel}: ParallelTextDataModule holds no images" in err, err
    path, reason = bad_checkpoints["vocab"]
    status, _, err = _run(capsys, "evaluate", "--ckpt", path)
    assert status == 2 and reason in err and err.count("\n") == 1
    # an --out that cannot be a folder: answered before the split is decoded (it ended in a
    # traceback after decoding and scoring the whole split, which was lost)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out, says in [(a_file, "a file, not a folder"), (a_file / "sub", "is a file")]:
        status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--out", out,
                              "--no-java")
        assert status == 2 and f"--out {out}: " in err and says in err, err
        assert "test images" not in err  # refused before the split was read


def test_evaluate_refuses_an_out_folder_that_cannot_be_written_though_access_says_yes(
        capsys, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """``os.access`` answers yes to root everywhere (``/proc``, a read-only mount): the folder
    is tried with a real write before the split is decoded, which was lost in a traceback."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    out = tmp_path / "eval"
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--out", out, "--no-java")
    assert status == 2 and err.count("\n") == 1, err
    assert f"--out {out}: cannot write in {tmp_path} (Read-only file system)" in err, err
    assert "test images" not in err and not out.exists()


def test_evaluate_on_the_train_split_records_no_overlap_count(capsys, tiny_checkpoint,
                                                             tmp_path) -> None:
    """The train split with the checkpoint's own data config is every image trained on: it
    was recorded as ``images: 0`` (not checked, "the checkpoint's own data config")."""
    status, _, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--split", "train",
                          "--limit", "2", "--no-java", "--out", tmp_path)
    assert status == 0, err
    record = json.loads((tmp_path / "metrics_train.json").read_text())["training_images_in_split"]
    assert record["images"] is None and not record["checked"]
    assert "images the model was trained on" in record["reason"]


# ================================================================================== visualize
def test_visualize_writes_figure_and_maps_for_any_aspect_ratio(
        capsys, tiny_checkpoint, captioner, test_images, tmp_path) -> None:
    from captioner.visualize import load_attention_maps

    wide = tmp_path / "wide.png"
    Image.open(test_images[3]).convert("RGB").resize((91, 23)).save(wide)  # W x H
    figure, maps = tmp_path / "fig.png", tmp_path / "maps.npz"
    status, out, err = _run(capsys, "visualize", "--ckpt", tiny_checkpoint, wide,
                            "--out", figure, "--save-maps", maps, "--beam-size", "2")
    assert status == 0, err
    expected = captioner.caption(wide, beam_size=2)[0]
    assert out.splitlines()[0] == f"{wide}\t{expected.text}"
    with Image.open(figure) as fig:
        assert fig.format == "PNG" and fig.width > fig.height  # panels in rows of five
    saved = load_attention_maps(maps)
    assert saved.words == expected.words and saved.grid == (H, W)
    assert saved.image_size == (23, 91)
    np.testing.assert_allclose(saved.alphas, expected.word_alphas, atol=1e-6)
    np.testing.assert_allclose(saved.betas, expected.word_betas, atol=1e-6)


def test_visualize_out_without_an_extension_is_a_png(capsys, tiny_checkpoint, test_images,
                                                    tmp_path) -> None:
    """matplotlib's default format (it read the temporary file's ``.tmp`` suffix: "Format
    'tmp' is not supported")."""
    status, _, err = _run(capsys, "visualize", "--ckpt", tiny_checkpoint, test_images[0],
                          "--out", tmp_path / "figure")
    assert status == 0, err
    assert (tmp_path / "figure").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_visualize_bad_image(capsys, tiny_checkpoint, tmp_path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a broken")
    status, out, err = _run(capsys, "visualize", "--ckpt", tiny_checkpoint, fake,
                            "--out", tmp_path / "fig.png")
    assert status == 1 and out == ""
    assert err.startswith(f"captioner visualize: error: cannot load image {fake}: ")
    assert err.count("\n") == 1
    assert not (tmp_path / "fig.png").exists()


@pytest.mark.parametrize("option, value, says", [
    ("--out", "fig.unknownext", "--out fig.unknownext: format 'unknownext' is not supported "
                                "(supported: avif, eps, gif, jpeg, jpg, pdf, "),
    ("--out", "/tmp", "--out /tmp: /tmp is a folder; give a file name such as "
                      "/tmp/attention.png"),
    ("--out", "IMAGE", "is the input image; give another file name"),
    ("--stn", "stn.nosuchformat", "--stn stn.nosuchformat: format 'nosuchformat' is not "),
    ("--out", "/proc/no/such/dir/fig.png", "cannot write the figure"),
    ("--cmap", "notacmap", "--cmap notacmap: not a matplotlib colormap (e.g. gray, jet"),
    ("--stn", "stn.png", "--stn: the model has no Spatial Transformer stage"),
])
def test_visualize_bad_outputs_are_one_line(option, value, says, capsys, tiny_checkpoint,
                                            test_images, tmp_path) -> None:
    image = tmp_path / "input.png"
    image.write_bytes(Path(test_images[0]).read_bytes())
    args = {"--out": str(tmp_path / "fig.png"), option: value.replace("IMAGE", str(image))}
    status, out, err = _run(capsys, "visualize", "--ckpt", tiny_checkpoint, str(image),
                            *[x for kv in args.items() for x in kv])
    assert status == 2 and says in err and err.count("\n") == 1, err
    if "/proc/" not in value:  # checked before anything is decoded or drawn (or overwritten)
        assert not (tmp_path / "fig.png").exists() and out == ""
        assert image.read_bytes() == Path(test_images[0]).read_bytes()


def test_demo_outside_a_clone_says_where_the_configs_are_missing(monkeypatch, tmp_path,
                                                                  capsys) -> None:
    import captioner.demo as demo

    monkeypatch.setattr(demo, "REPO_CONFIGS", tmp_path / "configs")
    status, _, err = _run(capsys, "demo", "--out", str(tmp_path / "out"))
    assert status == 2
    assert f"the repository's configs are not at {tmp_path / 'configs'}" in err
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("option", ["--epochs", "--num-train", "--num-test"])
def test_demo_refuses_empty_runs(capsys, tmp_path, option) -> None:
    """``--epochs 0`` ended in "checkpoint not found: ." (no best checkpoint), ``--num-train 0``
    in a vocabulary traceback, ``--num-test 0`` scored nothing and "succeeded"."""
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--out", str(tmp_path / "out"), option, "0"])
    assert exit_.value.code == 2
    assert f"argument {option}: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_beam_stop_reaches_the_search(capsys, monkeypatch, tiny_checkpoint, test_images) -> None:
    import captioner.inference as inference

    seen, original = [], inference.beam_search

    def spy(*args, **kwargs):
        seen.append(kwargs["stop"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "beam_search", spy)
    for extra, expected in (([], "k_finished"), (["--beam-stop", "exact"], "exact")):
        status, _, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--beam-size", "2",
                              *extra, test_images[0])
        assert status == 0, err
        assert seen[-1] == expected



def test_min_length_reaches_the_search_and_must_fit_max_length(capsys, monkeypatch,
                                                               tiny_checkpoint,
                                                               test_images) -> None:
    """``--min-length``: an undertrained model (or a wide beam) may end every caption at
    once, and the tools had no way to ask for longer ones."""
    import captioner.inference as inference

    seen, original = [], inference.greedy_search

    def spy(*args, **kwargs):
        seen.append(kwargs["min_length"])
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "greedy_search", spy)
    status, out, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--beam-size", "1",
                            "--min-length", "4", "--json", test_images[0])
    assert status == 0 and seen == [4], err
    assert len(json.loads(out)[0]["tokens"]) >= 3  # 4 with <end>, or no <end> at all
    status, _, err = _run(capsys, "caption", "--ckpt", tiny_checkpoint, "--min-length", "9",
                          "--max-length", "4", test_images[0])
    assert status == 2 and "--min-length 9 exceeds the most decoding steps (4" in err


def test_only_data_errors_are_shortened_to_one_line() -> None:
    """``captioner fit/test`` print captioner's own data errors in one line, even wrapped by the
    argument parser; any other error, even one raised while a missing file was being handled,
    keeps its traceback."""
    from captioner.cli import _input_error
    from captioner.data.formats import AnnotationError

    data = AnnotationError("captions.txt line 3: empty caption")
    try:
        try:
            raise data
        except AnnotationError as e:  # as jsonargparse re-raises what a link raised
            raise ValueError("Call to compute_fn of link failed") from e
    except ValueError as wrapped:
        assert _input_error(wrapped) is data
    try:
        try:
            open("/nonexistent/optional.json")
        except FileNotFoundError:
            None + 1  # a bug while handling it
    except TypeError as bug:
        assert _input_error(bug) is None
    assert _input_error(FileNotFoundError("not ours")) is None


@pytest.mark.parametrize("option, value, says", [
    ("vocab_file", "{tmp}/missing_vocab.json", "{tmp}/missing_vocab.json: no such vocabulary file"),
    ("vocab_file", "{tmp}/bad_vocab.json", "{tmp}/bad_vocab.json: not a valid vocabulary file"),
    ("max_images", "0", "max_images must be >= 1"),
    ("val_fraction", "0.9", "val_fraction and test_fraction must be >= 0 with a sum < 1"),
])
def test_fit_names_bad_data_options_in_one_line(capsys, tmp_path, option, value, says) -> None:
    """A missing or broken vocabulary file, ``max_images: 0`` (accepted until then) and
    fractions that leave nothing to train on were raw tracebacks through jsonargparse."""
    images = red_squares(tmp_path, 4)
    (tmp_path / "bad_vocab.json").write_text("{not json")
    data = {"data": {"class_path": "captioner.data.datamodule.CaptionDataModule",
                     "init_args": {"format": "flickr8k_csv",
                                   "annotations": str(tmp_path / "captions.txt"),
                                   "image_root": str(images), "image_size": 16,
                                   "num_workers": 0, "min_freq": 1, "val_fraction": 0.25,
                                   "test_fraction": 0.25}},
            "trainer": {"accelerator": "cpu", "max_epochs": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False,
                        "default_root_dir": str(tmp_path / "run")}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    model = Path(__file__).resolve().parents[1] / "configs" / "model" / "shapes_soft.yaml"
    logging.disable(logging.INFO)  # Lightning's "Seed set" goes to a handler of an older capture
    try:
        status, _, err = _run(capsys, "fit", "--config", str(tmp_path / "data.yaml"), "--config",
                              str(model), f"--data.init_args.{option}",
                              value.format(tmp=tmp_path))
    finally:
        logging.disable(logging.NOTSET)
    assert status == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("captioner fit: ") and says.format(tmp=tmp_path) in last, err
    assert "Traceback" not in err


class KwargsShapes(ShapesDataModule):
    """A data module subclass that passes ``**kwargs`` on to its base (jsonargparse follows
    the ``super()`` call; the signature alone names only ``marker``)."""

    def __init__(self, marker: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker


def test_evaluate_config_of_a_kwargs_subclass_is_not_refused(tmp_path) -> None:
    """The unknown-option check skips a class whose signature ends in ``**kwargs``: its base's
    options reach the base (they are not unknown)."""
    import argparse

    from captioner.commands.common import build_data_module

    data = shapes_data_config(tmp_path / "shapes")
    data["class_path"] = "tests.test_tools.KwargsShapes"
    data["init_args"]["marker"] = 7
    config = tmp_path / "kw.yaml"
    config.write_text(yaml.safe_dump({"data": data}))
    dm, _ = build_data_module(argparse.Namespace(config=[str(config)], ckpt=None))
    assert isinstance(dm, ShapesDataModule) and dm.marker == 7
    assert dm.batch_size == data["init_args"]["batch_size"]


def test_evaluate_refuses_a_config_that_puts_training_images_in_the_split(
        capsys, tiny_checkpoint, tmp_path) -> None:
    """``--config`` with another ``split_seed`` than the checkpoint was trained with draws
    another test split, holding training images: refused (naming one), scored only with
    ``--allow-training-images`` and then recorded; the stored split settings pass."""
    trained, images = red_squares_checkpoint(tiny_checkpoint, tmp_path)
    evaluate = ["evaluate", "--ckpt", trained, "--no-java", "--out", tmp_path / "eval"]

    status, _, err = _run(capsys, *evaluate, "--config", tmp_path / "seed1.yaml")
    assert status == 2 and "are in the checkpoint's training split (e.g." in err, err
    assert f"{images}{os.sep}" in err and "--allow-training-images" in err
    assert not (tmp_path / "eval").exists()  # nothing scored

    status, _, err = _run(capsys, *evaluate, "--config", tmp_path / "seed1.yaml",
                          "--allow-training-images")
    assert status == 0 and "WARNING" in err, err
    recorded = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    overlap = recorded["training_images_in_split"]
    assert overlap["checked"] and 0 < overlap["images"] <= recorded["protocol"]["images"]

    status, _, err = _run(capsys, *evaluate, "--config", tmp_path / "seed0.yaml")
    assert status == 0 and "WARNING" not in err, err
    recorded = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert recorded["training_images_in_split"] == {
        "checked": True, "images": 0, "example": None,
        "reason": "the same split settings as the checkpoint's"}


def test_evaluate_overlap_check_never_regenerates_generated_data(capsys, tiny_checkpoint,
                                                                 tmp_path) -> None:
    """A shapes checkpoint evaluated with ``--config`` of another seed under the same root: the
    check must not build the stored set (which would regenerate the root under the evaluated
    split's feet); it reports that generated splits cannot share images."""
    root = tmp_path / "shapes"
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["captioner"]["data"]["datamodule"] = shapes_data_config(root)  # seed 0
    trained = tmp_path / "trained.ckpt"
    torch.save(ckpt, trained)
    given = shapes_data_config(root)
    given["init_args"]["seed"] = 1
    (tmp_path / "seed1.yaml").write_text(yaml.safe_dump({"data": given}))
    status, _, err = _run(capsys, "evaluate", "--ckpt", trained, "--config",
                          tmp_path / "seed1.yaml", "--no-java", "--out", tmp_path / "eval")
    assert status == 0, err
    assert "not checked against the training split: generated data" in err
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 1  # the evaluated set, untouched


def test_evaluate_takes_data_overrides_over_the_stored_config(capsys, tiny_checkpoint,
                                                              tmp_path, monkeypatch) -> None:
    """``--data.init_args.KEY VALUE`` over the checkpoint's stored data config (as ``fit``
    takes them): applied, named in the output, checked against the training split like a
    ``--config``; a misspelt option is refused, naming it (the stored config's own unknown
    options would be dropped silently)."""
    import captioner.inference

    reads = []
    read = captioner.inference.read_checkpoint
    monkeypatch.setattr(captioner.inference, "read_checkpoint",
                        lambda *a, **k: reads.append(a[0]) or read(*a, **k))
    status, out, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--split", "val",
                            "--no-java", "--out", tmp_path / "a",
                            "--data.init_args.eval_batch_size", "2")
    assert status == 0, err
    assert len(reads) <= 2  # the model, and the stored data config once (it was read 4 times)
    assert "(stored data config) with --data.init_args.eval_batch_size" in err
    assert "not checked against the training split" not in err
    status, out, err = _run(capsys, "evaluate", "--ckpt", tiny_checkpoint, "--split", "val",
                            "--no-java", "--out", tmp_path / "b",
                            "--data.init_args.eval_batch_sise", "2")
    assert status == 2 and "has no option eval_batch_sise" in err


def test_data_override_values_are_read_as_the_option_wants_them() -> None:
    """Text options keep their text (YAML would cut ``my #2`` at the comment, turn
    ``2024-01-05`` into a date and ``no`` into False); numbers, booleans and mappings are read
    as YAML; later overrides win; a dotted key into a text value is refused, not a silent
    replacement."""
    from captioner.commands.common import ToolError, _with_overrides

    cfg = {"class_path": "captioner.data.datamodule.CaptionDataModule",
           "init_args": {"format": "flickr8k_csv", "annotations": "a.txt", "image_root": "imgs"}}
    out = _with_overrides(cfg, [
        ("image_root", "my #2"), ("vocab_file", "null"), ("instances", "2024-01-05"),
        ("image_size", "48"), ("skip_bad", "true"), ("val_fraction", "0.25"),
        ("eval_batch_size", "null"), ("annotations", "{train: t.txt, val: v.txt}"),
        ("annotations.test", "x.txt"), ("min_freq", "3"), ("min_freq", "4")], "cfg.yaml")
    args = out["init_args"]
    assert args["image_root"] == "my #2" and args["instances"] == "2024-01-05"
    assert args["vocab_file"] is None and args["eval_batch_size"] is None
    assert args["image_size"] == 48 and args["skip_bad"] is True and args["val_fraction"] == 0.25
    assert args["annotations"] == {"train": "t.txt", "val": "v.txt", "test": "x.txt"}
    assert args["min_freq"] == 4
    assert cfg["init_args"]["image_root"] == "imgs"  # the input is not modified
    with pytest.raises(ToolError, match=r"image_root is 'imgs' in cfg.yaml, not a mapping"):
        _with_overrides(cfg, [("image_root.test", "x")], "cfg.yaml")
