"""``captioner demo``: the main job on data the project makes itself.

1. make the synthetic shapes data set (COCO captions + instances JSON, deterministic);
2. train a small soft-attention model on CPU through LightningCLI (``configs/`` shapes files);
3. caption the held-out test images with the best checkpoint and score them (BLEU-1..4 with all
   references, attention correctness against the object boxes, and its chance level);
4. draw the attention for each word of a few test images (the figure of Xu et al.).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.atomic import atomic_write
from captioner.commands.common import non_negative_int, positive_int

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="captioner demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--epochs", type=positive_int, default=6, help="training epochs (default: 6)")
    p.add_argument("--num-train", type=positive_int, default=3000,
                   help="training images (default: 3000)")
    p.add_argument("--num-test", type=positive_int, default=200,
                   help="held-out test images (default: 200)")
    p.add_argument("--figures", type=non_negative_int, default=4,
                   help="attention figures to draw (default: 4)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv or [])
    if not (REPO_CONFIGS / "model" / "shapes_soft.yaml").is_file():
        print(f"captioner demo: the repository's configs are not at {REPO_CONFIGS}; the demo "
              "runs from a clone installed with `pip install -e .` (see README)", file=sys.stderr)
        return 2
    import lightning as L

    from captioner.cli import lightning_main
    from captioner.data.datamodule import ShapesDataModule
    from captioner.evaluation import upright_boxes
    from captioner.inference import Captioner
    from captioner.metrics import attention_correctness, corpus_bleu, json_safe
    from captioner.visualize import plot_attention

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, workers=True)
    epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
    print(f"[demo] 1/4 shapes data + 2/4 training ({epochs}) -> {out}", flush=True)
    cli = lightning_main([
        "fit",
        "--config", str(REPO_CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(REPO_CONFIGS / "data" / "shapes.yaml"),
        "--config", str(REPO_CONFIGS / "model" / "shapes_soft.yaml"),
        "--data.init_args.root", str(out / "shapes"),
        "--data.init_args.num_train", str(args.num_train),
        "--data.init_args.num_test", str(args.num_test),
        "--trainer.max_epochs", str(args.epochs),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--seed_everything", str(args.seed),
    ])
    best = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
    print(f"[demo] best checkpoint: {best}", flush=True)

    print("[demo] 3/4 captioning the held-out test images", flush=True)
    dm: ShapesDataModule = cli.datamodule
    records = dm.records("test")
    captioner = Captioner.from_checkpoint(best)
    captions = captioner.caption([r.path for r in records], batch_size=64)
    hyps = [c.words for c in captions]
    scores = corpus_bleu(hyps, dm.references("test"))
    grid = captioner.encoder.grid_size
    upright = [upright_boxes(r) for r in records]
    ac = attention_correctness(
        [c.alphas.reshape(len(c.tokens), -1)[: len(c.words)] for c in captions], hyps,
        [boxes for boxes, _ in upright], grid, [size for _, size in upright],
        thetas=[c.grid_theta for c in captions])
    scores.update({"attention_correctness": ac["attention_correctness"],
                   "attention_chance": ac["chance"]})
    with atomic_write(out / "test_captions.tsv") as f:
        for r, c in zip(records, captions):
            f.write(f"{r.path.name}\t{c.text}\t{r.captions[0]}\n")
    with atomic_write(out / "demo_metrics.json") as f:
        json.dump(json_safe({"checkpoint": str(best), "test_images": len(records), **scores}),
                  f, indent=2, allow_nan=False)

    print("[demo] 4/4 attention figures", flush=True)
    for stale in out.glob("attention_test_[0-9]*.png"):  # an earlier demo's figures (the
        if stale.is_file() and stale.stem[len("attention_test_"):].isdigit():  # test images'
            stale.unlink()  # names are test_NNNNN)
    for r, c in list(zip(records, captions))[: args.figures]:
        words = [*c.words, "<end>"][: len(c.tokens)]
        fig = plot_attention(c.image, words, c.alphas, grid, out / f"attention_{r.path.stem}.png",
                             betas=c.betas, title=f"{c.text}", theta=c.grid_theta)
        print(f"  {fig}")
    print("\n[demo] held-out test set (%d images):" % len(records))
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "attention_correctness", "attention_chance"):
        print(f"  {k:>22s}: {scores[k]:.4f}")
    for r, c in list(zip(records, captions))[:5]:
        print(f"  {r.path.name}: {c.text!r}   (reference: {r.captions[0]!r})")
    return 0
