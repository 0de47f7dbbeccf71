"""The shapes demo configuration learns: a short CLI run reaches a stated held-out score."""

from pathlib import Path

import torch

from captioner.cli import lightning_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_demo_config_learns_shapes_through_the_cli(tmp_path):
    cli = lightning_main([
        "fit",
        "--config", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--config", str(CONFIGS / "data" / "shapes.yaml"),
        "--config", str(CONFIGS / "model" / "shapes_soft.yaml"),
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
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # an untrained model scores ~0 BLEU-4; 5 short epochs on 300 images reach ~0.26 here
    assert metrics["val/bleu4"] > 0.15, metrics
    assert metrics["val/bleu1"] > 0.45, metrics
    assert metrics["train/loss"] < 60, metrics
    best = cli.trainer.checkpoint_callback.best_model_path
    meta = torch.load(best, map_location="cpu", weights_only=True)["captioner"]
    assert meta["model_config"]["init_args"]["vocab_size"] == cli.datamodule.vocab_size
    assert meta["data"]["datamodule"]["class_path"].endswith("ShapesDataModule")
