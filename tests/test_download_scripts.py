"""scripts/download_coco.py and scripts/download_flickr8k.py, offline: what a dry run says and
how failures are told (the network is replaced by stubs)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load_script(name: str, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the flickr script extends sys.path
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "urls"),
    [
        ("download_coco", ["images.cocodataset.org/zips/train2014.zip",
                           "annotations_trainval2014.zip", "caption_datasets.zip"]),
        ("download_flickr8k", ["Flickr8k_Dataset.zip", "Flickr8k_text.zip"]),
    ],
)
def test_download_scripts_dry_run(tmp_path, capsys, monkeypatch, name, urls):
    root = tmp_path / "data"
    assert _load_script(name, monkeypatch).main(["--root", str(root), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for url in urls:
        assert url in printed
    assert "image_root:" in printed
    assert not root.exists()


@pytest.mark.parametrize("name", ["download_coco", "download_flickr8k"])
def test_dry_run_says_what_is_already_there(tmp_path, capsys, monkeypatch, name):
    """A dry run printed "GET" for archives already downloaded, partly downloaded or
    extracted; it now says what a real run would do with them."""
    script = _load_script(name, monkeypatch)
    archives = script.COCO_ARCHIVES if name == "download_coco" else script.FLICKR8K_ARCHIVES
    root = tmp_path / "data"
    downloads = root / "downloads"
    downloads.mkdir(parents=True)
    first, second = archives[0], archives[1]
    (downloads / (first.filename + ".part")).write_bytes(b"x" * 2048)
    (downloads / second.filename).write_bytes(b"zip")
    assert script.main(["--root", str(root), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {downloads / (first.filename + '.part')} at 2.0 KB" in printed
    assert f"already downloaded: {downloads / second.filename}" in printed


def test_failures_are_one_line_without_retrying_an_unknown_host(tmp_path, capsys, monkeypatch):
    """No network (a host name that does not resolve) ended in ~30 s of retries and a 40-line
    traceback, an HTTP error and a corrupt archive in tracebacks too; each is now one line and
    exit status 1, with no empty downloads/ folder left behind."""
    script = _load_script("download_coco", monkeypatch)
    calls = []

    def offline(request, timeout=None):
        calls.append(request.full_url)
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(script.urllib.request, "urlopen", offline)
    monkeypatch.setattr(script.time, "sleep", lambda seconds: None)
    root = tmp_path / "data"
    assert script.main(["--root", str(root), "--only", "annotations"]) == 1
    err = capsys.readouterr().err
    assert len(calls) == 1  # not retried
    assert err.startswith("error: cannot download (") and "not known" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (root / "downloads").exists()

    def missing(request, timeout=None):
        raise urllib.error.HTTPError(request.full_url, 404, "Not Found", {}, None)

    monkeypatch.setattr(script.urllib.request, "urlopen", missing)
    assert script.main(["--root", str(root), "--only", "annotations"]) == 1
    err = capsys.readouterr().err
    assert "annotations_trainval2014.zip: HTTP 404 Not Found" in err

    archive = next(a for a in script.COCO_ARCHIVES if a.key == "annotations")
    zip_path = root / "downloads" / archive.filename
    zip_path.parent.mkdir(parents=True)
    zip_path.write_bytes(b"PK\x03\x04 not really a zip")  # a finished but corrupt download
    assert script.main(["--root", str(root), "--only", "annotations"]) == 1
    out, err = capsys.readouterr()
    assert "corrupt archive moved to" in out and err.startswith("error: ")
    assert zip_path.with_name(zip_path.name + ".corrupt").exists() and not zip_path.exists()
    with pytest.raises(zipfile.BadZipFile):  # what the one line replaced
        script.verify_zip(zip_path.with_name(zip_path.name + ".corrupt"))


def test_a_response_cut_short_is_retried(tmp_path, monkeypatch):
    """``http.client.IncompleteRead`` (a chunked response cut short) is a network error like
    the others: retried, resuming, instead of ending the run."""
    import http.client
    import io

    script = _load_script("download_coco", monkeypatch)
    monkeypatch.setattr(script.time, "sleep", lambda seconds: None)
    payload = b"0123456789" * 10
    attempts = []

    class Response(io.BytesIO):
        status = 200
        headers: dict = {}

        def read(self, size=-1):
            if len(attempts) == 1:
                raise http.client.IncompleteRead(b"01234")
            return super().read(size)

    def urlopen(request, timeout=None):
        attempts.append(request.full_url)
        return Response(payload)

    monkeypatch.setattr(script.urllib.request, "urlopen", urlopen)
    dest = script.download("https://example.org/a.zip", tmp_path / "a.zip")
    assert len(attempts) == 2 and dest.read_bytes() == payload
