"""Spatial Transformer / non-local experiment on the distorted shapes data (issue 5).

Trains three captioning models at an equal budget (same data, epochs, batch size, learning
rate and seed) on shapes scenes with random rotation (+-40 deg), scale (0.7-1.1), translation
(+-15 %) and clutter (``configs/data/shapes_distorted.yaml``):

=================  ==========================================================================
``baseline``       ``configs/model/shapes_soft.yaml`` (no stage)
``stn_input``      ``configs/model/shapes_stn.yaml`` (affine Spatial Transformer on the image)
``nonlocal_out``   ``configs/model/shapes_nonlocal.yaml`` (non-local block after the backbone)
=================  ==========================================================================

Every model is evaluated by the same loop on the validation split (greedy decoding):

* BLEU-1..4 (corpus BLEU, :func:`captioner.metrics.corpus_bleu`: pycocoevalcap's scorer on the
  package's tokens; runs before 2026-11-24 used NLTK's);
* attention correctness (Liu et al. 2017, :func:`captioner.metrics.attention_correctness`) and
  its uniform-attention chance level. For the STN model the attention grid lies over the
  *warped* image, so each cell's coverage is measured where it looked in the image
  (``thetas``, :mod:`captioner.grid_frame`; runs before 2026-11-24 mapped the boxes into the
  warped frame as axis-aligned bounding boxes instead);
* for the STN model, how its transform relates to the distortion that made each image: a
  transform that undoes the distortion samples the canonical scene, i.e. ``A_theta`` equals the
  forward distortion in normalised coordinates: rotation (read as
  ``atan2(A_10 - A_01, A_00 + A_11)``) ``= -angle``, scale ``= s``, ``(tx, ty) = 2 t / W``.
  Pearson correlations and mean absolute errors are reported next to the identity's errors.
  Captions describe each scene *as seen*, so nothing forces the STN to undo the rotation.

Outputs under ``--out``: ``results.json``, ``results.md`` (table), ``stn_warps.png`` (validation
images with the STN's sampling grid and the warped image) and one CSV log per model.

Usage (from the repository root)::

    python scripts/stn_experiment.py --epochs 15 --num-train 3000 --out runs/stn_experiment
    python scripts/stn_experiment.py --epochs 1 --num-train 40 --num-val 12 --out /tmp/stn_smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, str] = {
    "baseline": "configs/model/shapes_soft.yaml",
    "stn_input": "configs/model/shapes_stn.yaml",
    "nonlocal_out": "configs/model/shapes_nonlocal.yaml",
}
DATA_CONFIG = "configs/data/shapes_distorted.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15, help="training epochs of every model")
    p.add_argument("--num-train", type=int, default=3000, help="training images")
    p.add_argument("--num-val", type=int, default=200, help="validation images")
    p.add_argument("--out", type=Path, default=Path("runs/stn_experiment"), help="output folder")
    p.add_argument("--root", type=Path, default=None,
                   help="data folder (default: data/shapes_distorted_<num-train>)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--figure-images", type=int, default=6, help="validation images in the figure")
    return p.parse_args(argv)


def _model_init_args(config: str) -> dict[str, Any]:
    with open(REPO / config) as f:
        return yaml.safe_load(f)["model"]["init_args"]


def make_datamodule(args: argparse.Namespace):
    from captioner.data.datamodule import ShapesDataModule

    with open(REPO / DATA_CONFIG) as f:
        init = dict(yaml.safe_load(f)["data"]["init_args"])
    root = args.root or Path(init["root"] + f"_{args.num_train}")
    init.update(root=str(root), num_train=args.num_train, num_val=args.num_val,
                num_test=min(init["num_test"], args.num_val), batch_size=args.batch_size,
                seed=args.seed)
    dm = ShapesDataModule(**init)
    dm.prepare_data()
    return dm


class History(L.Callback):
    """Keeps the validation metrics of every epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the epoch's validation
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.epochs.append({"epoch": trainer.current_epoch, **row})


def train(name: str, args: argparse.Namespace, dm) -> tuple[Any, dict[str, Any]]:
    """Train one variant; return the module and its training record."""
    from captioner.lit.captioning import CaptioningModule

    L.seed_everything(args.seed, workers=True)
    init_args = copy.deepcopy(_model_init_args(VARIANTS[name]))
    init_args["vocab_size"] = dm.vocab_size
    module = CaptioningModule.from_config(init_args)
    history = History()
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1,
        gradient_clip_val=5.0, logger=CSVLogger(str(args.out), name=name),
        callbacks=[history], enable_checkpointing=False, log_every_n_steps=20,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - start
    params = sum(p.numel() for p in module.parameters())
    stage_params = sum(p.numel() for s in module.encoder.stages for p in s.parameters())
    return module, {"train_seconds": seconds, "parameters": params,
                    "stage_parameters": stage_params, "history": history.epochs}


@torch.no_grad()
def evaluate(module, dm) -> dict[str, Any]:
    """Greedy-decode the validation split; BLEU, attention correctness, STN transforms."""
    from captioner.encoders.stn import SpatialTransformer, theta_parameters
    from captioner.grid_frame import encoder_thetas
    from captioner.metrics import attention_correctness, corpus_bleu

    module.eval()
    records, refs = dm.records("val"), dm.references("val")
    stns = [s for s in module.encoder.stages if isinstance(s, SpatialTransformer)]
    stn = stns[0] if stns and stns[0].where == "input" else None
    hyps, alphas, boxes, sizes, thetas, ids, indices = [], [], [], [], [], [], []
    grid_thetas = []
    for batch in dm.val_dataloader():
        images = batch["images"].to(module.device)
        result = module.generate(module.encoder(images))
        grid_theta = encoder_thetas(module.encoder)  # (b, 2, 3): where each grid looked
        theta = stn.input_theta()[:, 0].cpu().double().numpy() if stn is not None else None
        for i, index in enumerate(batch["index"].tolist()):
            rec = records[index]
            n = int(result.lengths[i])
            hyp = module.vocab.decode(result.tokens[i, :n].tolist())
            hyps.append(hyp)
            alphas.append(result.alphas[i, : len(hyp)].float().cpu().numpy())
            objs = [(b.category, (b.attributes or {}).get("colour", ""), tuple(b.bbox))
                    for b in rec.boxes]
            if theta is not None:
                thetas.append(theta[i])
            grid_thetas.append(None if grid_theta is None else grid_theta[i])
            boxes.append(objs)
            sizes.append((images.shape[-2], images.shape[-1]))
            ids.append(rec.image_id)
            indices.append(index)
    scores: dict[str, Any] = corpus_bleu(hyps, [refs[i] for i in indices])
    ac = attention_correctness(alphas, hyps, boxes, module.encoder.grid_size, sizes,
                               thetas=grid_thetas)
    scores.update(attention_correctness=ac["attention_correctness"],
                  attention_chance=ac["chance"], attention_words=ac["num_words"])
    scores["examples"] = [" ".join(h) for h in hyps[:5]]
    if thetas:
        scores["stn"] = _theta_vs_distortion(np.stack(thetas), ids, dm, theta_parameters)
    return scores


def _theta_vs_distortion(thetas: np.ndarray, ids: list[int], dm, theta_parameters) -> dict:
    """Compare the STN's transforms with the transforms that would undo each distortion."""
    with open(dm.instances["val"]) as f:
        distortions = {d["image_id"]: d for d in json.load(f).get("distortions", [])}
    size = dm.image_size
    read = {k: v.numpy() for k, v in theta_parameters(torch.from_numpy(thetas)).items()}
    ideal = {
        "rotation_deg": np.array([-distortions[i]["angle"] for i in ids]),
        "scale": np.array([distortions[i]["scale"] for i in ids]),
        "tx": np.array([2 * distortions[i]["translate"][0] / size for i in ids]),
        "ty": np.array([2 * distortions[i]["translate"][1] / size for i in ids]),
    }
    identity = {"rotation_deg": 0.0, "scale": 1.0, "tx": 0.0, "ty": 0.0}
    out = {}
    for key, target in ideal.items():
        pred = read[key]
        varies = pred.std() > 1e-9 and target.std() > 0
        r = float(np.corrcoef(pred, target)[0, 1]) if varies else 0.0
        out[key] = {"pearson_r": r, "mae": float(np.abs(pred - target).mean()),
                    "mae_identity": float(np.abs(identity[key] - target).mean()),
                    "mean": float(pred.mean()), "std": float(pred.std())}
    return out


def stn_figure(module, dm, out: Path, count: int) -> Path | None:
    """Validation images with the input STN's sampling grid and the warped output."""
    from captioner.encoders.stn import SpatialTransformer, theta_parameters
    from captioner.visualize import plot_stn

    stns = [s for s in module.encoder.stages
            if isinstance(s, SpatialTransformer) and s.where == "input"]
    if not stns:
        return None
    module.eval()
    records = dm.records("val")
    with open(dm.instances["val"]) as f:
        distortions = {d["image_id"]: d for d in json.load(f).get("distortions", [])}
    batch = next(iter(dm.val_dataloader()))
    images = batch["images"][:count].to(module.device)
    with torch.no_grad():
        result = module.generate(module.encoder(images))
    theta = stns[0].input_theta()
    read = theta_parameters(theta[:, 0])
    titles = []
    for i, index in enumerate(batch["index"][:count].tolist()):
        words = module.vocab.decode(result.tokens[i, : int(result.lengths[i])].tolist())
        d = distortions.get(records[index].image_id, {"angle": 0.0, "scale": 1.0})
        titles.append(f"{' '.join(words)[:40]}\n"
                      f"data: rot {d['angle']:+.0f} s {d['scale']:.2f} | "
                      f"STN: rot {read['rotation_deg'][i]:+.0f} s {read['scale'][i]:.2f}")
    fill = module.encoder.mean.flatten().cpu() if stns[0].where == "input" else None
    return plot_stn(images.cpu(), theta.cpu(), out / "stn_warps.png",
                    output_size=stns[0].output_size, titles=titles, dpi=110, fill=fill)


def write_report(results: dict[str, Any], out: Path) -> None:
    def fmt(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = [
        f"# STN / non-local on distorted shapes ({results['settings']['epochs']} epochs, "
        f"{results['settings']['num_train']} training images, val = "
        f"{results['settings']['num_val']} images)",
        "",
        "| model | BLEU-1 | BLEU-4 | best val BLEU-4 (epoch) | attention correctness | chance "
        "| parameters (stage) | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        s = r["val"]
        hist = [h for h in r["history"] if "val/bleu4" in h]
        best = max(hist, key=lambda h: h["val/bleu4"]) if hist else None
        best_s = f"{best['val/bleu4']:.3f} ({best['epoch']})" if best else "n/a"
        lines.append(
            f"| {name} | {fmt(s['bleu1'])} | {fmt(s['bleu4'])} | {best_s} | "
            f"{fmt(s['attention_correctness'])} | {fmt(s['attention_chance'])} | "
            f"{r['parameters']:,} ({r['stage_parameters']:,}) | {r['train_seconds']:.0f} |")
    stn = results["models"].get("stn_input", {}).get("val", {}).get("stn")
    if stn:
        lines += ["", "STN transform vs. the transform that undoes each image's distortion "
                  "(validation):", "",
                  "| quantity | Pearson r | MAE | MAE of the identity | mean | std |",
                  "|---|---|---|---|---|---|"]
        for key, v in stn.items():
            lines.append(f"| {key} | {v['pearson_r']:+.3f} | {v['mae']:.3f} | "
                         f"{v['mae_identity']:.3f} | {v['mean']:+.3f} | {v['std']:.3f} |")
    lines += ["", "Attention correctness of `stn_input` scores each grid cell where it looked in "
              "the image (captioner.grid_frame: the cell mapped through the STN's transform).", ""]
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "results.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dm = make_datamodule(args)
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": {},
    }
    for name in args.variants:
        print(f"== {name}: training {args.epochs} epochs on {args.num_train} images", flush=True)
        module, record = train(name, args, dm)
        record["val"] = evaluate(module, dm)
        results["models"][name] = record
        figure = stn_figure(module, dm, args.out, args.figure_images)
        if figure is not None:
            results["stn_figure"] = str(figure)
        print(f"   val BLEU-4 {record['val']['bleu4']:.3f}, attention correctness "
              f"{record['val']['attention_correctness']:.3f}, {record['train_seconds']:.0f} s",
              flush=True)
        tmp = args.out / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out / "results.json")
    write_report(results, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
