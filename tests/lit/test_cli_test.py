"""`captioner fit` then `captioner test` through LightningCLI: COCO-protocol metrics and results."""

import json
import shutil
from pathlib import Path

from pycocotools.coco import COCO

from captioner.cli import lightning_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_fit_then_test_writes_coco_results_and_metrics(shapes_root, tmp_path):
    common = [
        "--config", str(CONFIGS / "data" / "shapes.yaml"),
        "--config", str(CONFIGS / "model" / "shapes_soft.yaml"),
        "--data.init_args.root", str(shapes_root),
        "--data.init_args.num_train", "24", "--data.init_args.num_val", "6",
        "--data.init_args.num_test", "6", "--data.init_args.image_size", "32",
        "--data.init_args.batch_size", "8",
        "--model.init_args.encoder.init_args.grid_size", "4",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]
    logger = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    fit = lightning_main(["fit", "--config", str(CONFIGS / "trainer" / "cpu.yaml"), *common,
                          *logger, "--trainer.max_epochs", "1"])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    test = lightning_main(["test", "--config", str(CONFIGS / "trainer" / "cpu.yaml"), *common,
                           *logger, "--ckpt_path", ckpt])
    out = Path(test.trainer.log_dir or test.trainer.default_root_dir)
    metrics = json.loads((out / "test_metrics.json").read_text())
    for key in ("bleu4", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert key in metrics and 0.0 <= metrics[key] <= 10.0
    if shutil.which("java"):
        assert "METEOR" in metrics
    results = json.loads((out / "test_captions.json").read_text())
    assert len(results) == 6  # every test image decoded exactly once
    gt = COCO(str(shapes_root / "annotations" / "captions_test.json"))
    res = gt.loadRes(str(out / "test_captions.json"))
    assert sorted(res.getImgIds()) == sorted(gt.getImgIds())
