"""Does the Spatial Transformer learn to undo the distortion? Distorted-shape classification.

The cluttered-MNIST experiment of Jaderberg et al. (2015, Section 4.1) on the shapes data
(:mod:`captioner.data.shapes_classification`): one small shape per 64 x 64 image, randomly
rotated, scaled and placed among clutter; the label is the shape. Three classifiers, equal
budget (same data, epochs, batch size, optimiser, seed), the same small CNN
(three 3x3 conv layers, global average pooling, a linear layer):

=================  ============================================================================
``downsampled``    the CNN sees the whole image sampled to ``Z x Z`` (an identity
                   :class:`~captioner.encoders.stn.SpatialTransformer` whose localisation net is
                   frozen: the same sampler as the STN model, without learning)
``stn``            the CNN sees the ``Z x Z`` output of a learnt transformer on the full image
                   (crop-and-zoom: "attend to a region at higher resolution")
``full``           the CNN sees the full ``S x S`` image (4x the CNN's compute at Z = S / 2)
=================  ============================================================================

For the STN model the script compares the predicted transform with the one that undoes each
image's distortion (``ShapeParams``): Pearson correlations of ``t_x, t_y`` with the shape's
centre, of ``s`` with its side, and of the rotation ``r`` with ``-phi`` (non-circles), and the
mean distance from the output grid's centre to the shape's centre against the identity's.

Outputs under ``--out``: ``results.json``, ``results.md`` and ``stn_warps.png`` (test images
with the sampling grid and the warped view).

The transformer's localisation net is ``--localization conv | fc | heatmap`` and the CNN's head
``--head gap`` (global average pooling, translation invariant) or ``fc`` (flatten + dense, as
the common cluttered-MNIST recipes). With a learnt transformer, every epoch prints how its
transform on 256 held-out images relates to their distortion.

Usage (from the repository root)::

    # the run of docs/stn_experiment.md, section 2.1: the STN finds and zooms onto each shape
    python scripts/stn_classification.py --view 8 --head fc --transform attention \
        --localization heatmap --loc-lr 3e-3 --epochs 15 --variants stn downsampled \
        --out runs/stn_classification_z8_heatmap
    python scripts/stn_classification.py --num-train 256 --num-test 64 --epochs 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from captioner.atomic import atomic_write
from captioner.data.shapes import SHAPES
from captioner.data.shapes_classification import DistortedShapes
from captioner.encoders.stn import SpatialTransformer
from captioner.metrics import json_safe
from captioner.visualize import plot_stn

VARIANTS = ("downsampled", "stn", "full")


class ShapeClassifier(nn.Module):
    """``U (B, 3, S, S)`` -> [transformer] -> ``V (B, 3, Z, Z)`` -> CNN -> logits ``(B, C)``.

    Args:
        num_classes: ``C``.
        view: ``Z``, the side of the CNN's input; ``None`` feeds ``U`` itself (no transformer).
        localization: the transformer's localisation network (``conv``, ``fc``, ``heatmap``).
        learn_transform: train the transformer's localisation network (``False``: it stays
            the identity, i.e. a plain resampling of the whole image to ``Z x Z``).
        transform: the transformation family of the transformer.
        loc_pool: side of the localisation network's pooled map (its hidden layer's fan-in
            is ``32 loc_pool^2``).
        head: ``gap``: global average pooling and a linear layer (translation invariant);
            ``fc``: flatten the ``Z/4 x Z/4`` map into a 256-unit hidden layer (the classifier
            of the common cluttered-MNIST STN recipes: where the shape lies in the view
            matters, so centring it pays).
    """

    def __init__(self, num_classes: int, view: int | None = 32, learn_transform: bool = True,
                 transform: str = "similarity", loc_pool: int = 8, head: str = "gap",
                 localization: str = "conv") -> None:
        super().__init__()
        self.stn = None
        if view is not None:
            self.stn = SpatialTransformer(where="input", transform=transform,
                                          localization=localization, loc_hidden=32,
                                          loc_pool=loc_pool, output_size=view, in_channels=3)
            self.stn.requires_grad_(learn_transform)
        if head == "gap":
            top: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 64)
                                    nn.Linear(64, num_classes)]
        elif head == "fc":
            side = (view or 64) // 4
            top = [nn.Flatten(),  # (B, 64 Z/4 Z/4)
                   nn.Linear(64 * side * side, 256), nn.ReLU(inplace=True),
                   nn.Linear(256, num_classes)]
        else:
            raise ValueError(f"unknown head {head!r}; valid: gap, fc")
        self.cnn = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),  # (B, 64, Z/4, Z/4)
            *top,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        view = images if self.stn is None else self.stn(images)  # (B, 3, Z, Z)
        return self.cnn(view)  # (B, C)


def build(variant: str, args: argparse.Namespace) -> ShapeClassifier:
    if variant == "full":
        return ShapeClassifier(len(SHAPES), view=None, head=args.head)
    return ShapeClassifier(len(SHAPES), view=args.view, learn_transform=variant == "stn",
                           transform=args.transform, loc_pool=args.loc_pool, head=args.head,
                           localization=args.localization)


def train(model: ShapeClassifier, data: DistortedShapes, args: argparse.Namespace,
          probe: DistortedShapes | None = None) -> float:
    """Cross-entropy, ``args.epochs`` epochs; returns the wall seconds. Adam for the CNN; the
    localisation net with Adam at ``--loc-lr`` or SGD with momentum (``--loc-optim sgd``).

    With ``probe`` and a learnt transformer, prints after every epoch how its transform on
    ``probe`` relates to the distortion (translation correlation, centre error, scale)."""
    optimizers = [torch.optim.Adam(model.cnn.parameters(), lr=args.lr)]
    learns_transform = model.stn is not None and any(
        p.requires_grad for p in model.stn.parameters())
    if learns_transform:
        loc_params, loc_lr = list(model.stn.parameters()), args.loc_lr or args.lr
        if args.loc_optim == "adam":
            optimizers[0].add_param_group({"params": loc_params, "lr": loc_lr})
        else:  # plain SGD with momentum: updates proportional to the (small) gradient
            optimizers.append(torch.optim.SGD(loc_params, lr=loc_lr, momentum=0.9))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    start = time.time()
    model.train()
    for epoch in range(args.epochs):
        total, seen = 0.0, 0
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            for opt in optimizers:
                opt.step()
            total, seen = total + loss.item() * len(labels), seen + len(labels)
        line = f"   epoch {epoch}: train loss {total / seen:.4f}"
        if probe is not None and learns_transform:
            _, theta, _ = evaluate(model, probe)
            d = transform_vs_distortion(theta, probe)
            line += (f", probe r(t_x) {d['pearson_tx_cx']:.2f} r(t_y) {d['pearson_ty_cy']:.2f}"
                     f" centre error {d['centre_error_px']:.1f} px, scale {d['scale_mean']:.2f}")
            model.train()
        print(line, flush=True)
    return time.time() - start


@torch.no_grad()
def evaluate(model: ShapeClassifier, data: DistortedShapes) -> tuple[float, torch.Tensor | None,
                                                                     torch.Tensor]:
    """Accuracy, the transformer's ``A_theta`` ``(N, 2, 3)`` (or ``None``) and predictions."""
    model.eval()
    preds, thetas = [], []
    for images, _ in DataLoader(data, batch_size=256):
        preds.append(model(images).argmax(-1))
        if model.stn is not None:
            thetas.append(model.stn.input_theta()[:, 0])  # (b, 2, 3)
    pred = torch.cat(preds)
    accuracy = float((pred == data.labels).float().mean())
    return accuracy, (torch.cat(thetas) if thetas else None), pred


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def transform_vs_distortion(theta: torch.Tensor, data: DistortedShapes) -> dict[str, Any]:
    """Compare ``A_theta`` ``(N, 2, 3)`` with each image's distortion (module docstring)."""
    t = data.targets()
    linear = theta[:, :, :2]  # (N, 2, 2) = s R(r)
    scale = linear.det().abs().sqrt()  # (N,)
    rotation = torch.rad2deg(torch.atan2(linear[:, 1, 0] - linear[:, 0, 1],
                                         linear[:, 0, 0] + linear[:, 1, 1]))  # (N,)
    shift = theta[:, :, 2]  # (N, 2): where the output's centre samples the input
    upright = t["label"] != SHAPES.index("circle")
    miss = (shift - t["centre"]).norm(dim=-1) * data.images.shape[-1] / 2  # pixels
    miss_identity = t["centre"].norm(dim=-1) * data.images.shape[-1] / 2
    return {
        "pearson_tx_cx": _pearson(shift[:, 0], t["centre"][:, 0]),
        "pearson_ty_cy": _pearson(shift[:, 1], t["centre"][:, 1]),
        "pearson_scale_side": _pearson(scale, t["side"]),
        "pearson_rotation_minus_angle": _pearson(rotation[upright], -t["angle"][upright]),
        "centre_error_px": float(miss.mean()),
        "centre_error_identity_px": float(miss_identity.mean()),
        "scale_mean": float(scale.mean()),
        "scale_std": float(scale.std()),
        "rotation_std_deg": float(rotation.std()),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--view", type=int, default=32, help="Z: side of the CNN's input view")
    p.add_argument("--transform", default="similarity",
                   choices=("affine", "attention", "similarity", "translation"))
    p.add_argument("--localization", default="conv", choices=("conv", "fc", "heatmap"),
                   help="the transformer's localisation network")
    p.add_argument("--loc-pool", type=int, default=8,
                   help="side of the localisation net's pooled map (fan-in 32 x side^2)")
    p.add_argument("--loc-lr", type=float, default=None,
                   help="learning rate of the localisation net (default: --lr)")
    p.add_argument("--loc-optim", default="adam", choices=("adam", "sgd"),
                   help="optimiser of the localisation net (sgd: momentum 0.9, lr --loc-lr)")
    p.add_argument("--head", default="gap", choices=("gap", "fc"),
                   help="classifier top: global average pooling or a fully connected layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--figure-images", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/stn_classification"))
    return p.parse_args(argv)


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"Distorted shapes classification: {s['num_train']} training / {s['num_test']} test "
        f"images ({len(SHAPES)} classes, chance {1 / len(SHAPES):.2f}), {s['epochs']} epochs, "
        f"batch {s['batch_size']}, Adam {s['lr']}, seed {s['seed']}; view Z = {s['view']}, "
        f"transform `{s['transform']}`, localisation `{s.get('localization', 'conv')}` (pool "
        f"{s['loc_pool']}, lr {s['loc_lr'] or s['lr']}), head `{s.get('head', 'gap')}`.", "",
        "| variant | CNN input | test accuracy | parameters | train time (s) |",
        "|---|---|---:|---:|---:|",
    ]
    what = {"downsampled": f"whole image sampled to {s['view']}x{s['view']}",
            "stn": f"learnt transformer's {s['view']}x{s['view']} view",
            "full": "whole image, 64x64"}
    for name, r in results["models"].items():
        lines.append(f"| {name} | {what[name]} | {r['accuracy']:.3f} | {r['parameters']:,} | "
                     f"{r['train_seconds']:.0f} |")
    if "stn_vs_distortion" in results:
        d = results["stn_vs_distortion"]
        lines += [
            "", "STN transform against the distortion of each test image:", "",
            "| quantity | value |", "|---|---:|",
            f"| Pearson r, t_x vs shape centre x | {d['pearson_tx_cx']:.3f} |",
            f"| Pearson r, t_y vs shape centre y | {d['pearson_ty_cy']:.3f} |",
            f"| Pearson r, scale s vs shape side | {d['pearson_scale_side']:.3f} |",
            f"| Pearson r, rotation r vs -phi (no circles) | "
            f"{d['pearson_rotation_minus_angle']:.3f} |",
            f"| mean distance, view centre to shape centre (px) | {d['centre_error_px']:.2f} |",
            f"| same for the identity (image centre) (px) | "
            f"{d['centre_error_identity_px']:.2f} |",
            f"| scale s: mean (std) | {d['scale_mean']:.3f} ({d['scale_std']:.3f}) |",
            f"| rotation r: std (deg) | {d['rotation_std_deg']:.1f} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train_set = DistortedShapes(args.num_train, seed=args.seed)
    test_set = DistortedShapes(args.num_test, seed=args.seed + 1_000_003)
    results: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v
                                            for k, v in vars(args).items()}, "models": {}}
    for name in args.variants:
        print(f"== {name}", flush=True)
        torch.manual_seed(args.seed)
        model = build(name, args)
        seconds = train(model, train_set, args, probe=DistortedShapes(256, seed=args.seed + 7))
        accuracy, theta, pred = evaluate(model, test_set)
        print(f"   test accuracy {accuracy:.3f} ({seconds:.0f} s)", flush=True)
        results["models"][name] = {
            "accuracy": accuracy, "train_seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}
        if name == "stn":
            results["stn_vs_distortion"] = transform_vs_distortion(theta, test_set)
            k = min(args.figure_images, len(test_set))
            titles = [f"{SHAPES[int(test_set.labels[i])]} -> {SHAPES[int(pred[i])]}, "
                      f"rot {test_set.params[i].angle:+.0f}, side {test_set.params[i].side}"
                      for i in range(k)]
            results["stn_figure"] = str(plot_stn(test_set.images[:k].float() / 255.0,
                                                 theta[:k], args.out / "stn_warps.png",
                                                 output_size=args.view, titles=titles,
                                                 fill=(0.5, 0.5, 0.5)))  # 0 in [-1, 1] pixels
        with atomic_write(args.out / "results.json") as f:  # after each variant: whole files
            json.dump(json_safe(results), f, indent=1, allow_nan=False)
    with atomic_write(args.out / "results.md") as f:
        f.write(_markdown(results))
    print(_markdown(results))
    return results


if __name__ == "__main__":
    main()
