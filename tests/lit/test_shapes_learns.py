"""The shapes configurations learn: a short CLI run reaches a stated held-out score.

Soft attention (the demo configuration) and stochastic hard attention (REINFORCE, Xu et al.
2015, Section 4.1) are trained at the same small budget; hard attention must come close to soft.
"""

import math
from pathlib import Path

import pytest
import torch

from captioner.cli import lightning_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _fit_shapes(model_config: str, tmp_path: Path):
    return lightning_main([
        "fit",
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "shapes.yaml"),
        "--config", str(CONFIGS / "model" / model_config),
        "--data.init_args.root", str(tmp_path / "shapes"),
        "--data.init_args.num_train", "300",
        "--data.init_args.num_val", "60",
        "--data.init_args.num_test", "10",
        "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "32",
        "--model.init_args.encoder.init_args.grid_size", "4",
        "--model.init_args.lr", "0.003",
        "--trainer.max_epochs", "5",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--seed_everything", "0",
    ])


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    return _fit_shapes("shapes_soft.yaml", tmp_path_factory.mktemp("soft"))


def test_demo_config_learns_shapes_through_the_cli(soft_run):
    cli = soft_run
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # an untrained model scores ~0 BLEU-4; 5 short epochs on 300 images reach ~0.26 here
    assert metrics["val/bleu4"] > 0.15, metrics
    assert metrics["val/bleu1"] > 0.45, metrics
    assert metrics["train/loss"] < 60, metrics
    best = cli.trainer.checkpoint_callback.best_model_path
    meta = torch.load(best, map_location="cpu", weights_only=True)["captioner"]
    assert meta["model_config"]["init_args"]["vocab_size"] == cli.datamodule.vocab_size
    assert meta["data"]["datamodule"]["class_path"].endswith("ShapesDataModule")


def test_hard_attention_learns_shapes_close_to_soft(soft_run, tmp_path):
    cli = _fit_shapes("shapes_hard.yaml", tmp_path)
    hard = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    soft = {k: float(v) for k, v in soft_run.trainer.callback_metrics.items()}
    # the REINFORCE terms are logged apart from the loss (issue 4)
    assert {"train/reward", "train/baseline", "train/entropy"} <= hard.keys(), sorted(hard)
    # reward = log p(y | s, a) <= 0 and the baseline tracks it; H[s] = sum_t H(alpha_t) over
    # the caption's words lies in (0, T log L] (L = 4 x 4 cells, T <= 21 steps with <end>)
    assert hard["train/reward"] < 0 and hard["train/baseline"] < 0
    assert 0.0 < hard["train/entropy"] <= 21 * math.log(16), hard["train/entropy"]
    # measured here (with the doubly stochastic penalty, then the default): hard 0.27, soft
    # 0.36 BLEU-4 (the equal-budget table in docs/RESULTS.md, 5 epochs on 800 images at 64 px:
    # hard 0.37, soft 0.39); untrained ~0
    assert hard["val/bleu4"] > 0.15, hard
    assert hard["val/bleu4"] > 0.6 * soft["val/bleu4"], (hard["val/bleu4"], soft["val/bleu4"])
