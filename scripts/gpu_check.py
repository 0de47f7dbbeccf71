#!/usr/bin/env python
r"""GPU checks: what the test suite, which runs on CPUs (CI has no GPU), cannot exercise.

Each check prints one line (``PASS``/``FAIL``, its figures); the exit status is 1 when one
fails; ``--json OUT`` writes every figure. Run it wherever a CUDA device is at hand::

    python scripts/gpu_check.py --device cuda --json gpu_check.json

1. ``parity/<model>``: every shapes model of ``configs/model`` (soft, hard, local 2-D, none,
   non-local, STN) and the Multi30k translation model (``multi30k_gru``: GRU source encoder,
   the same decoder) gives on the device the loss and gradients it gives on the CPU (the same
   weights and batch, eval mode so that dropout and hard attention's sampling are off, fp32 with
   TF32 switched off for matrix products and cuDNN's convolutions, whose default is on):
   ``|x_dev - x_cpu| / |x_cpu|`` under ``1e-4`` for the loss and the gradient.
   ``deterministic/<model>``: one training step of each (and of the STN with its ``fc`` and
   ``heatmap`` localisations) under ``torch.use_deterministic_algorithms(True)`` (Lightning's
   ``deterministic: true``) runs, and twice from one seed gives bit-identical gradients.
2. ``search``: greedy and beam-3/beam-5 tokens on the device equal the CPU's (random weights;
   a near tie may flip a token, so up to 1 % of the tokens may differ) and their scores agree;
   ``compile_search=True`` (the ``torch.compile``\ d energies) gives the eager search's tokens.
3. ``fit/<precision>``: a short fit on the shapes data under ``32``, ``bf16-mixed``,
   ``16-mixed`` and ``bf16-true``: the training loss stays finite and falls, validation BLEU-4
   is finite.
4. ``resume``: 2 epochs then a resumed third give bit-identical weights to 3 epochs straight
   (deterministic algorithms): the CUDA random state (dropout) is saved and restored.
5. ``cli``: ``captioner fit`` with the shipped ``configs/trainer/gpu.yaml`` (``16-mixed``,
   TensorBoard, the checkpoint callbacks, early stopping) on the shapes data for 2 epochs, then
   ``captioner test`` of its ``last.ckpt``: both exit 0, and the test metrics are written.
6. ``tools``: ``caption``, ``visualize``, ``evaluate`` and ``extract-features`` with
   ``--device`` on the fitted checkpoint exit 0; captions on the device equal the CPU's; the
   cached features on the device match the CPU's (``|a - b| / |a|`` under ``2e-3`` over the
   cache: cuDNN's TF32 convolutions and the float16 storage).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before its init
ROOT = Path(__file__).resolve().parents[1]
SHAPES_MODELS = ("shapes_soft", "shapes_hard", "shapes_local2d", "shapes_none",
                 "shapes_nonlocal", "shapes_stn")
IMAGE_SIZE = 64  # the shapes configs' (the STN's and grids' sizes assume it)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def model_config(name: str, vocab_size: int) -> dict[str, Any]:
    """``configs/model/<name>.yaml``'s model; ``shapes_stn+heatmap``: with that localisation."""
    name, _, localization = name.partition("+")
    init = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())["model"]
    if localization:
        init["init_args"]["encoder"]["init_args"]["stages"][0]["init_args"]["localization"] = (
            localization)
    return {**init["init_args"], "vocab_size": vocab_size}


TRANSLATION_MODEL = "multi30k_gru"
SRC_VOCAB = 41


def build(name: str, vocab_size: int, seed: int = 0):
    from captioner.lit.captioning import CaptioningModule
    from captioner.lit.translation import TranslationModule

    torch.manual_seed(seed)
    if name == TRANSLATION_MODEL:
        return TranslationModule.from_config({**model_config(name, vocab_size),
                                              "src_vocab_size": SRC_VOCAB})
    return CaptioningModule.from_config(model_config(name, vocab_size))


def _padded_tokens(vocab_size: int, B: int, T: int, g: torch.Generator,
                   ends: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T + 1)`` ids with uneven lengths (``<start> .. <end> <pad>..`` with ``ends``), and
    the lengths."""
    tokens = torch.randint(4, vocab_size, (B, T + 1), generator=g)
    lengths = torch.empty(B, dtype=torch.long)
    for b in range(B):
        end = T - 2 * b if T - 2 * b > 2 else T
        if ends:
            tokens[b, 0], tokens[b, end] = 1, 2  # <start>, <end>
        tokens[b, end + 1:] = 0  # <pad>
        lengths[b] = end + 1
    return tokens, lengths


def batch(vocab_size: int, B: int = 5, T: int = 11, seed: int = 1,
          translation: bool = False) -> dict[str, torch.Tensor]:
    """Images ``(B, 3, 64, 64)`` and captions ``(B, T + 1)`` with uneven lengths; with
    ``translation`` source sentences ``src (B, S)``, ``src_lengths (B,)`` and ``tgt``."""
    g = torch.Generator().manual_seed(seed)
    captions, _ = _padded_tokens(vocab_size, B, T, g)
    if translation:
        src, src_lengths = _padded_tokens(SRC_VOCAB, B, T + 2, g, ends=False)
        return {"src": src, "src_lengths": src_lengths, "tgt": captions}
    return {"images": torch.randn(B, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g), "captions": captions}


# ============================================================================ checks
@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@no_tf32()
def check_parity(device: torch.device, name: str) -> dict[str, Any]:
    V = 37
    data = batch(V, translation=name == TRANSLATION_MODEL)
    out: dict[str, Any] = {}
    grads = {}
    for where in ("cpu", device):
        module = build(name, V).to(where).eval()
        if name == TRANSLATION_MODEL:  # cuDNN's GRU has no backward in eval mode: train mode,
            module.train()  # dropout off (a soft-attention model draws nothing else)
            for m in module.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
                if isinstance(m, torch.nn.RNNBase):
                    m.dropout = 0.0
        losses = module.loss({k: v.to(where) for k, v in data.items()})
        losses["loss"].backward()
        out[str(where)] = float(losses["loss"])
        grads[str(where)] = torch.cat([p.grad.flatten().cpu() for p in module.parameters()
                                       if p.grad is not None])
    cpu, dev = out["cpu"], out[str(device)]
    out["loss_rel"] = abs(dev - cpu) / abs(cpu)
    out["grad_rel"] = rel(grads[str(device)], grads["cpu"])
    out["ok"] = math.isfinite(dev) and out["loss_rel"] < 1e-4 and out["grad_rel"] < 1e-4
    return out


def check_deterministic(device: torch.device, name: str) -> dict[str, Any]:
    """One training step (dropout, hard attention's sampling) twice from the same seed under
    deterministic algorithms: it runs, and the two give bit-identical gradients."""
    V = 37
    runs = []
    for _ in range(2):
        module = build(name, V).to(device).train()
        torch.manual_seed(5)
        with deterministic():
            data = batch(V, translation=name == TRANSLATION_MODEL)
            losses = module.loss({k: v.to(device) for k, v in data.items()})
            losses["loss"].backward()
        runs.append((float(losses["loss"]),
                     [p.grad for p in module.parameters() if p.grad is not None]))
    (loss, grads), (loss2, grads2) = runs
    same = loss == loss2 and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    return {"ok": all(bool(g.isfinite().all()) for g in grads) and same, "loss": loss,
            "grads": len(grads), "bit_identical_twice": same}


@no_tf32()
def check_search(device: torch.device) -> dict[str, Any]:
    V = 211
    module = build("shapes_soft", V).eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(16, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    out: dict[str, Any] = {"ok": True}
    with torch.no_grad():
        ann_cpu = module.encoder(images)
        dev_module = build("shapes_soft", V).to(device).eval()
        ann_dev = dev_module.encoder(images.to(device))
        out["annotations_rel"] = rel(ann_dev, ann_cpu)
        for k in (1, 3, 5):
            kw = dict(beam_size=k, max_length=16, min_length=16)
            a = module.generate(ann_cpu, **kw)
            b = dev_module.generate(ann_cpu.to(device), **kw)  # the same input on both
            differ = float((a.tokens != b.tokens.cpu()).float().mean())
            out[f"k{k}_token_mismatch"] = differ
            out[f"k{k}_score_rel"] = rel(b.scores, a.scores)
            out["ok"] &= differ <= 0.01 and out[f"k{k}_score_rel"] < 1e-4
            dev_module.decoder.attention.compile_search = True
            try:
                c = dev_module.generate(ann_cpu.to(device), **kw)
            finally:
                dev_module.decoder.attention.compile_search = False
            compiled = float((c.tokens != b.tokens).float().mean())
            out[f"k{k}_compiled_token_mismatch"] = compiled
            out[f"k{k}_compiled_score_rel"] = rel(c.scores, b.scores)
            out["ok"] &= compiled <= 0.01 and out[f"k{k}_compiled_score_rel"] < 1e-4
    return out


def shapes_dm(root: Path, **kw):
    from captioner.data.datamodule import ShapesDataModule

    return ShapesDataModule(root=str(root), num_train=kw.pop("num_train", 512), num_val=32,
                            num_test=32, image_size=IMAGE_SIZE, batch_size=32, seed=0, **kw)


def trainer(root: Path, device: torch.device, epochs: int, precision: str, **kw):
    import lightning as L

    return L.Trainer(default_root_dir=root, max_epochs=epochs, accelerator=device.type,
                     devices=[device.index or 0] if device.type == "cuda" else 1, precision=precision, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


class LossLog:
    """Training losses of every step (a Lightning callback, built lazily)."""

    def __new__(cls):
        import lightning as L

        class _LossLog(L.Callback):
            def __init__(self) -> None:
                self.losses: list[float] = []

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                self.losses.append(float(outputs["loss"]))

        return _LossLog()


def check_fit(device: torch.device, precision: str, data: Path, work: Path) -> dict[str, Any]:
    import lightning as L

    L.seed_everything(0, workers=True)
    dm = shapes_dm(data)
    module = build("shapes_soft", _vocab_size(data))
    log = LossLog()
    tr = trainer(work / precision, device, 3, precision, callbacks=[log])
    start = time.perf_counter()
    tr.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    losses = log.losses
    first, last = float(np.mean(losses[:4])), float(np.mean(losses[-4:]))
    bleu = float(tr.callback_metrics.get("val/bleu4", float("nan")))
    ckpt = work / f"fit_{precision}.ckpt"
    tr.save_checkpoint(ckpt)
    return {"ok": all(map(math.isfinite, losses)) and last < 0.8 * first and math.isfinite(bleu),
            "first_loss": first, "last_loss": last, "val_bleu4": bleu, "steps": len(losses),
            "seconds": seconds, "ckpt": str(ckpt)}


def _vocab_size(data: Path) -> int:
    dm = shapes_dm(data)
    dm.prepare_data()
    dm.setup("fit")
    return dm.vocab_size


def check_resume(device: torch.device, data: Path, work: Path) -> dict[str, Any]:
    import lightning as L

    def run(epochs: int, root: Path, ckpt_path: str | None = None):
        L.seed_everything(7, workers=True)
        dm = shapes_dm(data, num_train=128)
        module = build("shapes_soft", _vocab_size(data))  # dropout 0.1 draws on the CUDA RNG
        tr = trainer(root, device, epochs, "32", deterministic=True,
                     limit_val_batches=1)
        tr.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return tr, module

    _, straight = run(3, work / "straight")
    tr1, _ = run(2, work / "first")
    ckpt = work / "epoch2.ckpt"
    tr1.save_checkpoint(ckpt)
    _, resumed = run(3, work / "resumed", str(ckpt))
    a, b = straight.state_dict(), resumed.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    _, again = run(3, work / "again")  # determinism itself: the straight run twice
    repeat = [k for k in a if not torch.equal(a[k], again.state_dict()[k])]
    return {"ok": not differ and not repeat, "tensors_differing_after_resume": len(differ),
            "tensors_differing_between_two_straight_runs": len(repeat), "tensors": len(a)}


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def check_cli(work: Path, trainer_yaml: str = "gpu.yaml") -> dict[str, Any]:
    """The shipped GPU trainer config end to end, from a folder of its own."""
    run_dir = work / "cli"
    run_dir.mkdir()
    configs = [f"--config={ROOT / 'configs' / sub / name}" for sub, name in (
        ("trainer", trainer_yaml), ("data", "shapes.yaml"), ("model", "shapes_soft.yaml"))]
    data = ["--data.init_args.root", str(run_dir / "shapes"), "--data.init_args.num_train", "256",
            "--data.init_args.num_val", "32", "--data.init_args.num_test", "32"]
    r = _cli("fit", *configs, *data, "--trainer.max_epochs", "2", cwd=run_dir)
    out: dict[str, Any] = {"fit_rc": r.returncode}
    if r.returncode:
        return {**out, "ok": False, "fit_stderr": r.stderr[-3000:]}
    last = sorted(run_dir.rglob("last.ckpt"))
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    out.update(last_ckpt=len(last), tensorboard_event_files=len(events))
    if not last:
        return {**out, "ok": False}
    r = _cli("test", *configs, *data, "--ckpt_path", str(last[-1]), cwd=run_dir)
    out["test_rc"] = r.returncode
    metrics = sorted(run_dir.rglob("test_metrics.json"))
    out["test_metrics_files"] = len(metrics)
    if r.returncode:
        out["test_stderr"] = r.stderr[-3000:]
    if metrics:
        scores = json.loads(metrics[-1].read_text())
        out["test_bleu4"] = next((v for k, v in scores.items() if k in ("BLEU-4", "bleu4")), None)
    logged = bool(events) or trainer_yaml != "gpu.yaml"  # cpu.yaml logs CSV
    out["ok"] = r.returncode == 0 and logged and bool(metrics)
    return out


def check_tools(device: torch.device, ckpt: Path, data: Path, work: Path) -> dict[str, Any]:
    images = sorted(p for p in data.rglob("*.png"))[:8]
    out: dict[str, Any] = {"ok": True}
    captions = {}
    for where in ("cpu", str(device)):
        r = _cli("caption", "--ckpt", str(ckpt), "--device", where, "--beam-size", "3", "--json",
                 *map(str, images))
        out[f"caption_{where}_rc"] = r.returncode
        out["ok"] &= r.returncode == 0
        if r.returncode:
            out[f"caption_{where}_stderr"] = r.stderr[-2000:]
            continue
        captions[where] = [c.get("caption") for c in json.loads(r.stdout)]
    if len(captions) == 2:
        same = sum(a == b for a, b in zip(*captions.values()))
        out["captions_equal"] = f"{same}/{len(images)}"
        out["ok"] &= same >= len(images) - 1  # a near tie may flip one
    r = _cli("visualize", "--ckpt", str(ckpt), "--device", str(device), "--out",
             str(work / "attention.png"), str(images[0]))
    out["visualize_rc"] = r.returncode
    out["ok"] &= r.returncode == 0 and (work / "attention.png").is_file()
    if r.returncode:
        out["visualize_stderr"] = r.stderr[-2000:]
    r = _cli("evaluate", "--ckpt", str(ckpt), "--device", str(device), "--split", "test",
             "--no-java", "--out", str(work / "eval"))
    out["evaluate_rc"] = r.returncode
    out["ok"] &= r.returncode == 0
    if r.returncode:
        out["evaluate_stderr"] = r.stderr[-2000:]
    shards = {}
    for where in ("cpu", str(device)):
        dest = work / f"features_{where.replace(':', '_')}"
        r = _cli("extract-features", "--ckpt", str(ckpt), "--device", where, "--out", str(dest),
                 "--allow-trainable", "--split", "val")
        out[f"extract_{where}_rc"] = r.returncode
        out["ok"] &= r.returncode == 0
        if r.returncode:
            out[f"extract_{where}_stderr"] = r.stderr[-2000:]
            continue
        shards[where] = np.concatenate([np.load(p).astype(np.float32)
                                        for p in sorted(dest.rglob("*.npy"))])
    if len(shards) == 2:
        a, b = shards.values()
        same_shape = a.shape == b.shape
        out["features_max_abs_diff"] = float(np.abs(a - b).max()) if same_shape else None
        out["features_max_abs"] = float(np.abs(a).max())
        # relative to the whole tensor: cuDNN's default TF32 convolutions (~5e-4) and the
        # float16 storage (~5e-4 per element); a wrong feature moves it by far more
        rel_err = float(np.linalg.norm(a - b) / np.linalg.norm(a)) if same_shape else None
        out["features_rel_diff"] = rel_err
        out["ok"] &= same_shape and rel_err is not None and rel_err < 2e-3
    return out


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every figure here")
    p.add_argument("--only", default="", help="comma list among: parity,search,fit,resume,cli,tools")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here")
    only = {x for x in args.only.split(",") if x}
    known = {"parity", "search", "fit", "resume", "cli", "tools"}
    if only - known:
        p.error(f"--only: unknown check(s) {', '.join(sorted(only - known))}; "
                f"known: {', '.join(sorted(known))}")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "checks": {}}
    failed = 0

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        nonlocal failed
        start = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # a crash is a failure with its message, the others still run
            import traceback

            r = {"ok": False, "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-3000:]}
        r["check_seconds"] = round(time.perf_counter() - start, 1)
        results["checks"][name] = r
        failed += not r["ok"]
        shown = {k: v for k, v in r.items() if k not in ("ok", "traceback") and
                 not k.endswith("stderr")}
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {name}  {json.dumps(shown, default=str)}",
              flush=True)
        if not r["ok"]:
            for k, v in r.items():
                if k == "traceback" or k.endswith("stderr"):
                    print(f"    {k}:\n{v}", flush=True)
        return r

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        data = work / "shapes"
        if not only or "parity" in only:
            for name in (*SHAPES_MODELS, TRANSLATION_MODEL):
                run(f"parity/{name}", lambda name=name: check_parity(device, name))
            for name in (*SHAPES_MODELS, "shapes_stn+fc", "shapes_stn+heatmap", TRANSLATION_MODEL):
                run(f"deterministic/{name}", lambda name=name: check_deterministic(device, name))
        if not only or "search" in only:
            run("search", lambda: check_search(device))
        fitted = None
        if not only or only & {"fit", "tools"}:
            for precision in ("32", "bf16-mixed", "16-mixed", "bf16-true"):
                r = run(f"fit/{precision}", lambda p=precision: check_fit(device, p, data, work))
                if precision == "32" and r["ok"]:
                    fitted = Path(r["ckpt"])
        if not only or "resume" in only:
            run("resume", lambda: check_resume(device, data, work))
        if not only or "cli" in only:
            run("cli", lambda: check_cli(work, "gpu.yaml" if device.type == "cuda" else "cpu.yaml"))
        if (not only or "tools" in only) and fitted is not None:
            run("tools", lambda: check_tools(device, fitted, data, work))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"{len(results['checks']) - failed} passed, {failed} failed "
          f"on {results['device']} (torch {results['torch']})")
    return 1 if failed else 0


if __name__ == "__main__":
    for name in ("lightning", "lightning.pytorch"):  # the script's output: the checks' lines
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.exit(main())
