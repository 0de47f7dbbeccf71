"""Train every attention variant on the shapes data at an equal budget and tabulate the results.

Each variant is ``configs/model/shapes_soft.yaml`` with only the decoder's attention changed
(the rows with their own YAML - hard, local-p 2-D, none - match those files), trained for the
same number of epochs on the same data with the same seed. The table reports, for the last
epoch, the validation BLEU-4 (greedy decoding) and the attention correctness (Liu et al. 2017:
attention mass inside the box of the object each generated word names), next to its chance
level, and the training time.

Usage::

    python scripts/attention_table.py --epochs 10 --num-train 3000 --out attention_table.md
    python scripts/attention_table.py --epochs 1 --num-train 40 --variants soft hard --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from captioner.atomic import atomic_write
from captioner.metrics import json_safe

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = ROOT / "configs" / "model" / "shapes_soft.yaml"
BASE_DATA = ROOT / "configs" / "data" / "shapes.yaml"


def _attention(class_name: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": f"captioner.attention.{class_name}", "init_args": init_args}


Variant = tuple[str, dict[str, Any], dict[str, Any]]


def variants(num_positions: int, grid: int) -> dict[str, Variant]:
    """``name -> (description, decoder init_args overrides, module init_args overrides)``."""
    additive = _attention("AdditiveAttention", attention_dim=64)
    return {
        "soft": ("soft, additive (Xu et al. 2015, Sec. 4.2)", {}, {}),
        "hard": ("hard, additive, REINFORCE (Xu et al. 2015, Sec. 4.1)",
                 {"attention_mode": "hard"},
                 {"hard_lambda_r": 0.1, "hard_lambda_e": 0.002, "doubly_stochastic": 0.0}),
        "dot": ("soft, dot (Luong et al. 2015)", {"attention": _attention("DotAttention")}, {}),
        "general": ("soft, general (Luong et al. 2015)",
                    {"attention": _attention("GeneralAttention")}, {}),
        "scaled_dot": ("soft, scaled dot-product (Vaswani et al. 2017)",
                       {"attention": _attention("ScaledDotProductAttention", attention_dim=64)},
                       {}),
        "cosine": ("soft, cosine content-based (Graves et al. 2014)",
                   {"attention": _attention("CosineAttention")}, {}),
        "location": ("soft, location-based (Luong et al. 2015)",
                     {"attention": _attention("LocationAttention", num_positions=num_positions)},
                     {}),
        "local_p_2d": ("soft, local-p 2-D, window 2, additive inside",
                       {"attention": _attention("LocalAttention2d", window=2, position_dim=64,
                                                grid_size=grid, score=additive)}, {}),
        "none": ("no attention (Vinyals et al. 2015)",
                 {"attention": "captioner.attention.NoAttention"}, {"doubly_stochastic": 0.0}),
    }


def model_config(decoder_overrides: dict[str, Any], module_overrides: dict[str, Any]
                 ) -> dict[str, Any]:
    """``shapes_soft.yaml``'s model ``init_args`` with the overrides applied."""
    cfg = copy.deepcopy(yaml.safe_load(BASE_MODEL.read_text())["model"]["init_args"])
    cfg["decoder"]["init_args"].update(copy.deepcopy(decoder_overrides))
    cfg.update(copy.deepcopy(module_overrides))
    return cfg


def train_one(name: str, cfg: dict[str, Any], data_args: dict[str, Any], args: argparse.Namespace
              ) -> dict[str, float]:
    """Fit one variant and return its last validation scores and training time."""
    import lightning as L

    from captioner.config import instantiate
    from captioner.lit.captioning import CaptioningModule

    L.seed_everything(args.seed, verbose=False)
    dm = instantiate("captioner.data.datamodule.ShapesDataModule", data_args)
    module = CaptioningModule.from_config({**cfg, "vocab_size": dm.vocab_size})
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_epochs=args.epochs, gradient_clip_val=5.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(Path(args.work_dir) / name),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"bleu4": metrics.get("val/bleu4", math.nan),
            "attention_correctness": metrics.get("val/attention_correctness", math.nan),
            "attention_chance": metrics.get("val/attention_chance", math.nan),
            "train_loss": metrics.get("train/loss", math.nan), "seconds": seconds}


def markdown(rows: list[tuple[str, str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"Shapes data: {args.num_train} training / {args.num_val} validation images, "
        f"{args.epochs} epoch(s) per variant, seed {args.seed}; validation scores of the last "
        "epoch, greedy decoding. Attention correctness: attention mass inside the box of the "
        "named object (chance: a uniform map).",
        "",
        "| variant | attention | val BLEU-4 | attention correctness | chance | train time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    def number(value: float | None, digits: int) -> str:  # undefined (null): no box words
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    for name, description, r in rows:
        lines.append(f"| {name} | {description} | {number(r['bleu4'], 4)} | "
                     f"{number(r['attention_correctness'], 3)} | "
                     f"{number(r['attention_chance'], 3)} | {number(r['seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--num-train", type=int, default=3000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("attention_table.md"),
                        help="markdown table (a .json with the raw numbers is written next to it)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="subset of variants (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing --out .json that this run does not "
                             "repeat (to complete a table variant by variant)")
    parser.add_argument("--data-root", default="data/shapes_attention_table")
    parser.add_argument("--work-dir", default="runs/attention_table")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base = yaml.safe_load(BASE_MODEL.read_text())["model"]["init_args"]
    grid = int(base["encoder"]["init_args"]["grid_size"])
    table = variants(grid * grid, grid)
    names = args.variants or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown variants {unknown}; available: {', '.join(table)}")

    data_args = dict(yaml.safe_load(BASE_DATA.read_text())["data"]["init_args"])
    data_args.update(root=args.data_root, num_train=args.num_train, num_val=args.num_val,
                     num_test=min(args.num_val, 20), seed=args.seed)
    previous: dict[str, dict[str, float]] = {}
    raw_path = args.out.with_suffix(".json")
    if args.merge and raw_path.exists():
        previous = {n: r for n, r in json.loads(raw_path.read_text()).items() if n in table}
    results: dict[str, dict[str, float]] = dict(previous)
    rows: list[tuple[str, str, dict[str, float]]] = []
    for name in names:
        description, decoder_overrides, module_overrides = table[name]
        print(f"== {name}: {description}", flush=True)
        result = train_one(name, model_config(decoder_overrides, module_overrides), data_args, args)
        print(f"   {json.dumps(result)}", flush=True)
        results[name] = result
        rows = [(n, table[n][0], results[n]) for n in table if n in results]  # table order
        with atomic_write(args.out) as f:  # rewritten after each variant, whole or not at all
            f.write(markdown(rows, args))
        with atomic_write(raw_path) as f:  # an undefined score is null (valid JSON), not NaN
            json.dump(json_safe(dict((n, r) for n, _, r in rows)), f, indent=2, allow_nan=False)
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
