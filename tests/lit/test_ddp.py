"""Lightning DDP on CPU (2 processes, gloo): metrics over the whole split, same training;
translation's bucketed batches under DDP.

One ``captioner fit --trainer.devices 2 --trainer.strategy ddp`` subprocess is compared with the
same fit in one process. Training is made exactly comparable: the batch is the whole training
set (78 pairs; 39 per rank), so every step sees the same examples whatever the sampler's order,
and DDP's gradient average over the two halves equals the single-process gradient (the loss is a
mean over captions); the encoder is frozen (no per-rank batch-norm statistics) and dropout is
off. Validation has an odd number of images (5), so the distributed sampler pads one rank with
a repeat, which the gathered scoring must drop.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from captioner.cli import lightning_main

REPO = Path(__file__).resolve().parents[2]


PAIRS = 78  # training pairs of the set below (20 images)


def config(root: Path, out: Path, devices: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "max_epochs": 8, "check_val_every_n_epoch": 4, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(out),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out), "name": "logs", "version": 0}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(out / "ckpt"), "save_last": True,
                                         "save_top_k": 0}}],
        },
        "data": {"class_path": "captioner.data.datamodule.ShapesDataModule",
                 "init_args": {"root": str(root), "num_train": 20, "num_val": 5, "num_test": 2,
                               "image_size": 32, "seed": 0, "batch_size": PAIRS // devices,
                               "num_workers": 0}},
        "model": {"class_path": "captioner.lit.captioning.CaptioningModule",
                  "init_args": {
                      "encoder": {"class_path": "captioner.encoders.ImageEncoder",
                                  "init_args": {"backbone": "shapes_cnn", "weights": None,
                                                "grid_size": 3, "freeze": True}},
                      "decoder": {"class_path": "captioner.decoder.AttentionDecoder",
                                  "init_args": {"embed_dim": 16, "hidden_dim": 32,
                                                "dropout": 0.0,
                                                "attention": {
                                                    "class_path":
                                                        "captioner.attention.AdditiveAttention",
                                                    "init_args": {"attention_dim": 16}}}},
                      "lr": 0.02, "max_length": 12}},
    }


def val_scores(out: Path) -> list[dict[str, float]]:
    """The ``val/*`` rows of the CSV log, one per validation."""
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/bleu4")]
    return [{k: float(v) for k, v in r.items() if k.startswith("val/") and v} for r in rows]


def assert_same_scores(a: dict[str, float], b: dict[str, float]) -> None:
    """Same BLEU (same decoded captions); attention correctness up to the last float bits of
    the weights (it averages the attention maps themselves)."""
    assert a.keys() == b.keys() and {"val/bleu1", "val/bleu4"} <= a.keys()
    for key in a:
        tolerance = {"abs": 1e-12} if "bleu" in key else {"rel": 1e-3}
        assert b[key] == pytest.approx(a[key], nan_ok=True, **tolerance), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same fit with 2 DDP processes (a `captioner fit` subprocess) and in one process."""
    root = tmp_path_factory.mktemp("shapes_ddp")
    out = {n: tmp_path_factory.mktemp(f"fit{n}") for n in (1, 2)}
    for n in (1, 2):
        (out[n] / "config.yaml").write_text(yaml.safe_dump(config(root, out[n], n)))
    lightning_main(["fit", "--config", str(out[1] / "config.yaml")])  # also makes the data
    exe = Path(sys.executable).with_name("captioner")
    proc = subprocess.run([str(exe), "fit", "--config", str(out[2] / "config.yaml")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"single": out[1], "ddp": out[2]}


def test_ddp_fit_gives_the_same_val_bleu_as_one_process(runs):
    single, ddp = val_scores(runs["single"]), val_scores(runs["ddp"])
    assert len(single) == len(ddp) == 2  # epochs 4 and 8
    assert single[-1]["val/bleu1"] > 0.05  # decodes words: not a trivial match of empty captions
    for a, b in zip(single, ddp):
        assert_same_scores(a, b)


def test_ddp_training_equals_single_process_training(runs):
    """Same weights after 8 steps: DDP's gradient average over two half-batches is the
    single-process gradient of the whole batch."""
    single = torch.load(runs["single"] / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    ddp = torch.load(runs["ddp"] / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert single.keys() == ddp.keys()
    for key in single:
        a, b = single[key], ddp[key]
        if not a.is_floating_point():
            assert torch.equal(a, b), key
            continue
        # Adam divides by sqrt(v): a gradient at float-noise level (whose rounding differs
        # between one batch and the average of two half-batches) still moves its weight by up
        # to lr = 0.02 per step. So: all but 0.1 % of the elements within the rounding
        # tolerance, and those few within a tenth of one step.
        diff = (b - a).abs()
        outside = diff > 2e-4 + 1e-3 * a.abs()
        assert outside.float().mean() <= 1e-3, (key, int(outside.sum()), a.numel())
        assert diff.max() < 2e-3, (key, float(diff.max()))
    steps = [torch.load(runs[r] / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
             for r in ("single", "ddp")]
    assert steps == [8, 8]  # one step per epoch in both: the whole set is one batch


def test_same_length_batches_under_ddp_take_as_many_steps_on_each_rank(runs, tmp_path):
    """The paper's batches of one caption length under DDP: each rank's share of the captions
    would group into another number of batches, and the rank with more would wait forever in
    the gradient all-reduce; the batches are dealt out instead, so the fit ends, each rank
    taking ceil(batches / 2) steps per epoch."""
    from collections import Counter

    from captioner.data.datamodule import ShapesDataModule

    cfg = config(tmp_path / "unused", tmp_path, 2)  # its data section replaced below
    cfg["data"] = yaml.safe_load((runs["ddp"] / "config.yaml").read_text())["data"]
    cfg["data"]["init_args"].update(batch_size=5, same_length_batches=True)
    cfg["trainer"].update(max_epochs=2, check_val_every_n_epoch=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    dm = ShapesDataModule(**cfg["data"]["init_args"])
    dm.setup("fit")
    lengths = Counter(dm._dataset("train").lengths.tolist())
    batches = sum(-(-n // 5) for n in lengths.values())
    assert len(lengths) > 1 and batches % 2 == 1  # lengths to keep apart, one batch to repeat
    exe = Path(sys.executable).with_name("captioner")
    proc = subprocess.run([str(exe), "fit", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * -(-batches // 2)
    assert len(val_scores(tmp_path)) == 1  # validated over the whole split, as without it


def test_validate_same_checkpoint_with_one_process_matches_ddp(runs):
    """The DDP run's last val scores (2 ranks, whole split gathered) equal a 1-process
    `validate` of the checkpoint it saved."""
    ckpt = runs["ddp"] / "ckpt" / "last.ckpt"
    cfg = runs["ddp"] / "config.yaml"
    cli = lightning_main(["validate", "--config", str(cfg), "--trainer.devices", "1",
                          "--trainer.strategy", "auto", "--trainer.logger", "false",
                          # its own folder: without a logger the config is saved there, and
                          # the DDP run's config.yaml must stay a 2-process one for the others
                          "--trainer.default_root_dir", str(runs["ddp"] / "validate_one"),
                          "--data.init_args.batch_size", "3", "--ckpt_path", str(ckpt)])
    one = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    two = val_scores(runs["ddp"])[-1]
    assert one["val/bleu1"] > 0.05
    assert_same_scores(one, two)


def test_ddp_test_writes_the_results_of_the_whole_split(runs):
    """`captioner test` with 2 processes: test metrics over the whole split, written once, equal
    to a 1-process test of the same checkpoint (rank 0 used to ask for the log folder alone,
    a collective under DDP, and died: no results)."""
    ckpt = runs["ddp"] / "ckpt" / "last.ckpt"
    cfg = runs["ddp"] / "config.yaml"
    exe = Path(sys.executable).with_name("captioner")
    # no logger: the results go to default_root_dir (trainer.log_dir is still a broadcast)
    proc = subprocess.run([str(exe), "test", "--config", str(cfg), "--ckpt_path", str(ckpt),
                           "--trainer.logger", "false",
                           "--trainer.default_root_dir", str(runs["ddp"] / "two")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # two processes ran it
    two = json.loads((runs["ddp"] / "two" / "test_metrics.json").read_text())
    cli = lightning_main(["test", "--config", str(cfg), "--trainer.devices", "1",
                          "--trainer.strategy", "auto", "--trainer.logger", "false",
                          "--trainer.default_root_dir", str(runs["ddp"] / "one"),
                          "--ckpt_path", str(ckpt)])
    one = json.loads((runs["ddp"] / "one" / "test_metrics.json").read_text())
    assert one["bleu1"] > 0.0 and one.keys() == two.keys()  # 2 test images: words decoded
    assert one["images"] == two["images"] == 2  # each once, not once per rank
    for key in ("bleu1", "bleu4", "BLEU-4", "CIDEr"):
        assert two[key] == pytest.approx(one[key], abs=1e-9), key
    assert cli.trainer.callback_metrics["test/bleu1"] == pytest.approx(one["bleu1"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_on_cpu(runs, precision, tmp_path):
    """``--trainer.precision`` selects autocast: the output layer runs in half precision
    (Lightning runs ``16-mixed`` as ``bf16-mixed`` on CPU, with a warning)."""
    cfg = runs["single"] / "config.yaml"
    seen: list[torch.dtype] = []
    cli = lightning_main(["--config", str(cfg), "--trainer.precision", precision,
                          "--trainer.max_epochs", "1", "--trainer.logger", "false",
                          "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                          "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.limit_val_batches", "1",
                          "--trainer.check_val_every_n_epoch", "1"], run=False)
    cli.model.decoder.L_o.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert seen and set(seen) == {torch.bfloat16}
    assert cli.trainer.precision == "bf16-mixed"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/bleu4" in cli.trainer.callback_metrics


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_the_gradients_of_the_fused_adam(runs, algorithm, tmp_path):
    """``configs/trainer/cpu.yaml`` clips gradients; under ``bf16-mixed`` Lightning's plugin
    refused to clip for the fused Adam (a RuntimeError at the first step). The clipping now
    happens: the gradients each step applied (read after the step, as Lightning computes them
    in the closure the step calls) are within the limit."""
    clip = 1e-3
    norms: list[float] = []

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = trainer.optimizers[0]
            assert opt.defaults["fused"]

            def record(optimizer, args, kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                         if p.grad is not None]
                norms.append(float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads])) if algorithm == "norm"
                    else max(float(g.abs().max()) for g in grads)))
            opt.register_step_post_hook(record)

    cli = lightning_main(["--config", str(runs["single"] / "config.yaml"),
                          "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1",
                          "--trainer.gradient_clip_val", str(clip),
                          "--trainer.gradient_clip_algorithm", algorithm,
                          "--trainer.logger", "false", "--trainer.callbacks", "[]",
                          "--trainer.enable_checkpointing", "false",
                          "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.limit_val_batches", "0"], run=False)
    cli.trainer.callbacks.append(Watch())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert norms and all(0 < n <= clip * 1.001 for n in norms), norms


# ------------------------------------------------------------------------------ translation
def translation_config(root: Path, out: Path, devices: int) -> dict:
    from tests.lit.test_translation import model_config

    model = {k: v for k, v in model_config(0, 0).items() if "vocab_size" not in k}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": devices,
                    "strategy": "ddp" if devices > 1 else "auto", "max_epochs": 10,
                    "num_sanity_val_steps": 0, "check_val_every_n_epoch": 10,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(out),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(out), "name": "logs",
                                             "version": 0}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(out / "ckpt"),
                                                 "save_last": True, "save_top_k": 0}}]},
        "data": {"class_path": "captioner.data.parallel.ParallelTextDataModule",
                 "init_args": {"root": str(root), "min_freq": 1, "batch_size": 3,
                               "eval_batch_size": 2}},
        "model": {"class_path": "captioner.lit.translation.TranslationModule",
                  "init_args": model},
    }


def test_translation_validates_the_whole_split_under_ddp(tmp_path):
    """Translation batches come from a bucketing batch sampler: under DDP Lightning shards it
    (this used to fail: "can't inject a (distributed) sampler into your batch sampler"), and
    val/bleu and val/ppl are computed over the whole split, the 5th pair (which the
    distributed sampler repeats on one rank to even the shards) counted once."""
    from tests.lit.test_translation import PAIRS, write_split

    root = tmp_path / "toy"
    root.mkdir()
    write_split(root, "train", PAIRS)
    write_split(root, "val", PAIRS[:5])
    write_split(root, "test_2016_flickr", PAIRS[1:])
    out = {n: tmp_path / f"run{n}" for n in (1, 2)}
    for n in (1, 2):
        out[n].mkdir()
        (out[n] / "config.yaml").write_text(yaml.safe_dump(translation_config(root, out[n], n)))
    lightning_main(["fit", "--config", str(out[1] / "config.yaml")])
    ckpt = out[1] / "ckpt" / "last.ckpt"
    one = lightning_main(["validate", "--config", str(out[1] / "config.yaml"),
                          "--trainer.logger", "false", "--ckpt_path", str(ckpt)])
    single = {k: float(v) for k, v in one.trainer.callback_metrics.items()}
    exe = Path(sys.executable).with_name("captioner")
    proc = subprocess.run([str(exe), "validate", "--config", str(out[2] / "config.yaml"),
                           "--ckpt_path", str(ckpt)], capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out[2] / "logs" / "version_0" / "metrics.csv") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("val/ppl")]
    assert single["val/ppl"] > 1.0 and single["val/bleu"] > 0.0
    assert float(row["val/ppl"]) == pytest.approx(single["val/ppl"], rel=1e-5)
    assert float(row["val/bleu"]) == pytest.approx(single["val/bleu"], abs=1e-6)
    # `test` under DDP writes its translations and metrics once (rank 0 used to die asking for
    # the log folder alone, a collective)
    proc = subprocess.run([str(exe), "test", "--config", str(out[2] / "config.yaml"),
                           "--ckpt_path", str(ckpt), "--trainer.logger.init_args.version", "3"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = out[2] / "logs" / "version_3"
    lines = (written / "test_translations.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(PAIRS) - 1  # the whole test split, each pair once
    assert "bleu" in json.loads((written / "test_metrics.json").read_text())


def test_translation_resumed_under_ddp_trains_as_the_uninterrupted_fit(tmp_path):
    """3 epochs of translation under DDP, with dropout, against 2 epochs and a resumed third:
    the same weights. Two defects made them differ:

    * the resumed fit trained its first epoch on epoch 0's batch order (Lightning rebuilds the
      bucketing batch sampler around a distributed sampler of its own at epoch 0 and draws the
      first batches before ``set_epoch``): 0.045 apart at the largest weight without dropout.
      (With these 6 pairs epochs 0 and 1 happen to share their order on both ranks, so the
      resumed epoch is epoch 2, whose order differs.)
    * rank 1 resumed on rank 0's random streams, the only ones the checkpoint held, while its
      own had drifted (its batches' dropout drew other numbers of values): 0.056 apart with the
      batch order fixed."""
    from tests.lit.test_translation import PAIRS, write_split

    root = tmp_path / "toy"
    root.mkdir()
    write_split(root, "train", PAIRS)
    write_split(root, "val", PAIRS[:5])
    exe = Path(sys.executable).with_name("captioner")

    def fit(out: Path, epochs: int, *extra: str) -> Path:
        out.mkdir(exist_ok=True)
        cfg = translation_config(root, out, 2)
        cfg["trainer"].update(max_epochs=epochs, check_val_every_n_epoch=100)
        cfg["data"]["init_args"]["batch_size"] = 1  # 3 batches per rank and epoch: order matters
        cfg["model"]["init_args"]["decoder"]["init_args"]["dropout"] = 0.3
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([str(exe), "fit", "--config", str(out / "config.yaml"), *extra],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out / "ckpt" / "last.ckpt"

    full = fit(tmp_path / "full", 3)
    part = fit(tmp_path / "part", 2)
    part = fit(tmp_path / "part", 3, "--ckpt_path", str(part),
               "--trainer.logger.init_args.version", "1")
    a, b = (torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in (full, part))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------ hard attention
def _hard_attention_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: a hard-attention translation loss on this rank's
    share of the batch (rank 0: 3 pairs, rank 1: 2); writes the rewards and the baseline."""
    import torch.distributed as dist

    from tests.lit.test_translation import PAIRS, batch_of, model_config, vocabularies
    from captioner.lit.translation import TranslationModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(3)  # the same model on both ranks
        src_vocab, tgt_vocab = vocabularies()
        config = model_config(len(src_vocab), len(tgt_vocab))
        config["decoder"]["init_args"].update(attention_mode="hard", hard_expectation_prob=0.0)
        module = TranslationModule.from_config(config).train()
        module.src_vocab, module.vocab = src_vocab, tgt_vocab
        share = PAIRS[:3] if rank == 0 else PAIRS[3:5]
        rewards, baselines = [], []
        for _ in range(2):  # the first update sets b, the second moves it
            losses = module.loss(batch_of(share, src_vocab, tgt_vocab))
            rewards.append(losses["reward"].item())  # this rank's mean
            baselines.append(module.decoder.hard.baseline.item())
        torch.save({"rewards": rewards, "n": len(share), "baselines": baselines},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_hard_attention_baseline_averages_the_rewards_of_every_rank(tmp_path):
    """Under DDP the REINFORCE baseline ``b`` moves with the whole batch's mean reward (all
    ranks'), as in one process; each rank used to track its own share, and DDP's buffer
    broadcast then kept rank 0's alone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_hard_attention_rank, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["baselines"] == ranks[1]["baselines"]
    assert ranks[0]["rewards"][0] != pytest.approx(ranks[1]["rewards"][0])  # shares differ
    # the mean over all 5 sampled targets (the ranks' means weighted by their counts): b is
    # set to the first, then b <- 0.9 b + 0.1 mean
    means = [sum(r["rewards"][i] * r["n"] for r in ranks) / sum(r["n"] for r in ranks)
             for i in range(2)]
    assert ranks[0]["baselines"][0] == pytest.approx(means[0], rel=1e-5)
    assert ranks[0]["baselines"][1] == pytest.approx(0.9 * means[0] + 0.1 * means[1], rel=1e-5)
