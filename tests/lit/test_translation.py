"""TranslationModule: the shared decoder, memorising pairs, val/test metrics, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from captioner.data.parallel import (ParallelDataset, ParallelTextDataModule, collate_parallel,
                                     tokenize_mt)
from captioner.data.vocabulary import Vocabulary
from captioner.decoder import AttentionDecoder
from captioner.lit.captioning import CaptioningModule
from captioner.lit.translation import TranslationModule
from captioner.translate import Translator, sacrebleu_score
from tests.conftest import TINY_MODEL_CONFIG

PAIRS = [  # six toy pairs of different lengths (2 to 6 words)
    ("Der Hund.", "The dog."),
    ("Die Katze schläft.", "The cat sleeps."),
    ("Ein alter Mann lacht.", "An old man laughs."),
    ("Zwei kleine Kinder spielen im Park.", "Two small children play in the park."),
    ("Eine Frau liest.", "A woman reads."),
    ("Der rote Ball.", "The red ball."),
]


ATTENTION = {"class_path": "captioner.attention.AdditiveAttention",
             "init_args": {"attention_dim": 10}}


def model_config(src_vocab_size: int, vocab_size: int, **kw) -> dict:
    return {
        "encoder": {"class_path": "captioner.encoders.text.TextEncoder",
                    "init_args": {"embed_dim": 12, "hidden_dim": 14}},
        "decoder": {"class_path": "captioner.decoder.AttentionDecoder",
                    "init_args": {"embed_dim": 12, "hidden_dim": 26, "dropout": 0.0,
                                  "gate": "none", "attention": ATTENTION}},
        "src_vocab_size": src_vocab_size,
        "vocab_size": vocab_size,
        "lr": 0.02,
        "max_length": 12,
        **kw,
    }


def vocabularies() -> tuple[Vocabulary, Vocabulary]:
    return (Vocabulary.build(tokenize_mt(s) for s, _ in PAIRS),
            Vocabulary.build(tokenize_mt(t) for _, t in PAIRS))


def batch_of(pairs, src_vocab, tgt_vocab) -> dict[str, torch.Tensor]:
    data = ParallelDataset([(tokenize_mt(s), tokenize_mt(t)) for s, t in pairs], src_vocab,
                           tgt_vocab)
    return collate_parallel([data[i] for i in range(len(data))])


def test_the_decoder_is_the_captioning_decoder_class():
    module = TranslationModule.from_config(model_config(11, 13))
    captioning = CaptioningModule.from_config({**TINY_MODEL_CONFIG, "vocab_size": 13})
    assert type(module.decoder) is AttentionDecoder
    assert type(module.decoder) is type(captioning.decoder)
    assert module.decoder.encoder_dim == module.encoder.out_channels == 28  # D = 2 * 14
    assert module.decoder.vocab_size == 13 and module.encoder.vocab_size == 11


def test_overfits_six_pairs_exact_greedy_and_beam_reproduction():
    torch.manual_seed(0)
    src_vocab, tgt_vocab = vocabularies()
    module = TranslationModule.from_config(model_config(len(src_vocab), len(tgt_vocab), lr=0.03))
    module.src_vocab, module.vocab = src_vocab, tgt_vocab
    batch = batch_of(PAIRS, src_vocab, tgt_vocab)
    optimizer = module.configure_optimizers()
    for _ in range(90):
        loss = module.loss(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    module.eval()
    annotations, mask = module.encode(batch)
    targets = [tgt_vocab.encode(tokenize_mt(t))[1:] for _, t in PAIRS]  # ... <end>
    for k in (1, 3):
        result = module.generate(annotations, mask, beam_size=k)
        for i, target in enumerate(targets):
            assert result.tokens[i, : result.lengths[i]].tolist() == target


def test_doubly_stochastic_penalty_counts_real_source_words_only():
    src_vocab, tgt_vocab = vocabularies()
    torch.manual_seed(1)
    module = TranslationModule.from_config(
        model_config(len(src_vocab), len(tgt_vocab), doubly_stochastic=1.0)).eval()
    pairs = [PAIRS[0], PAIRS[3], PAIRS[4]]  # source lengths 3, 8, 4 (with <end>): padded batch
    together = module.loss(batch_of(pairs, src_vocab, tgt_vocab))["dsr"]
    alone = [module.loss(batch_of([p], src_vocab, tgt_vocab))["dsr"] for p in pairs]
    assert torch.allclose(together, torch.stack(alone).mean(), atol=1e-5)
    # by hand for the first pair: sum over its 3 source words of (1 - sum_t alpha_tj)^2
    b = batch_of(pairs[:1], src_vocab, tgt_vocab)
    alphas = module.decoder(*module.encode(b)[:1], b["tgt"], module.encode(b)[1]).alphas[0]
    assert torch.allclose(alone[0], ((1 - alphas.sum(0)) ** 2).sum(), atol=1e-5)
    assert "dsr" not in TranslationModule.from_config(
        model_config(len(src_vocab), len(tgt_vocab))).loss(b)  # off by default


def test_token_reduction_divides_the_penalty_by_the_token_count_too():
    """``loss_reduction: token`` (the default here): ``loss * N_tok == loss_sentence * B``, the
    doubly stochastic penalty included (a penalty left as a mean over ``B`` breaks it)."""
    src_vocab, tgt_vocab = vocabularies()
    torch.manual_seed(1)
    module = TranslationModule.from_config(
        model_config(len(src_vocab), len(tgt_vocab), doubly_stochastic=0.7)).eval()
    b = batch_of([PAIRS[0], PAIRS[3], PAIRS[4]], src_vocab, tgt_vocab)  # targets of 3 lengths
    tokens = int((b["tgt"][:, 1:] != 0).sum())
    token = module.loss(b)
    module.hparams.loss_reduction = "sentence"
    sentence = module.loss(b)
    assert float(sentence["dsr"]) > 0
    torch.testing.assert_close(token["loss"] * tokens, sentence["loss"] * 3)


@pytest.mark.parametrize("samples", [1, 3])
def test_hard_attention_trains_the_attention_through_reinforce(samples):
    # every location sampled (no expectation steps): only Eq. 12's REINFORCE term reaches the
    # attention's parameters, so with lambda_r = lambda_e = 0 their gradient is exactly zero
    src_vocab, tgt_vocab = vocabularies()
    batch = batch_of(PAIRS[:3], src_vocab, tgt_vocab)
    grads = {}
    for lambda_r in (0.0, 1.0):
        torch.manual_seed(3)
        config = model_config(len(src_vocab), len(tgt_vocab), hard_lambda_r=lambda_r,
                              hard_lambda_e=0.0, hard_num_samples=samples)
        config["decoder"]["init_args"].update(attention_mode="hard", hard_expectation_prob=0.0)
        module = TranslationModule.from_config(config).train()
        module.src_vocab, module.vocab = src_vocab, tgt_vocab
        losses = module.loss(batch)
        assert {"reinforce", "reward", "baseline", "entropy"} <= losses.keys()
        assert bool(module.decoder.hard.baseline_started)  # b updated with the rewards
        assert module.decoder.hard.baseline.item() == pytest.approx(losses["reward"].item())
        losses["loss"].backward()
        grads[lambda_r] = torch.cat([p.grad.flatten() for p in
                                     module.decoder.attention.parameters()])
    assert grads[0.0].abs().max() == 0
    assert grads[1.0].abs().max() > 1e-4
    module.eval()  # evaluation: no sampling, no REINFORCE terms
    assert "reinforce" not in module.loss(batch)


# ------------------------------------------------------------------------------ through Lightning
def write_split(root: Path, split: str, pairs) -> None:
    (root / f"{split}.de").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    (root / f"{split}.en").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_mt")
    write_split(root, "train", PAIRS)
    write_split(root, "val", PAIRS[:5])
    write_split(root, "test_2016_flickr", PAIRS[1:])
    return root


def data(root: Path, eval_batch_size: int = 5) -> ParallelTextDataModule:
    return ParallelTextDataModule(str(root), min_freq=1, batch_size=3,
                                  eval_batch_size=eval_batch_size)


@pytest.fixture(scope="module")
def fitted(toy_root, tmp_path_factory):
    torch.manual_seed(0)
    dm = data(toy_root)
    module = TranslationModule.from_config(model_config(dm.src_vocab_size, dm.vocab_size))
    out = tmp_path_factory.mktemp("toy_run")
    trainer = L.Trainer(default_root_dir=out, max_epochs=12, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=12)
    trainer.fit(module, datamodule=dm)
    path = out / "toy.ckpt"
    trainer.save_checkpoint(path)
    return trainer, module, dm, path


def test_validation_logs_sacrebleu_and_perplexity(fitted, toy_root):
    trainer, module, dm, _ = fitted
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/loss", "val/bleu", "val/ppl"} <= set(metrics)
    assert 0.0 <= metrics["val/bleu"] <= 100.0
    # perplexity by hand: exp of the mean NLL over all target tokens (<end> included)
    module.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for s, t in dm.pairs("val"):
            b = batch_of([(s, t)], module.src_vocab, module.vocab)
            annotations, mask = module.encode(b)
            logits = module.decoder(annotations, b["tgt"], mask).logits[0]  # (T, V)
            total += F.cross_entropy(logits, b["tgt"][0, 1:], reduction="sum").item()
            tokens += b["tgt"].shape[1] - 1
    assert metrics["val/ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    # the same numbers whatever the evaluation batching (padding changes nothing)
    one_by_one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    again = one_by_one.validate(module, datamodule=data(toy_root, eval_batch_size=1),
                                verbose=False)[0]
    assert again["val/ppl"] == pytest.approx(metrics["val/ppl"], rel=1e-4)
    assert again["val/bleu"] == pytest.approx(metrics["val/bleu"], abs=1e-6)


def test_test_writes_translations_and_signature(fitted, toy_root, tmp_path, caplog):
    """...and says so, with the BLEU detail and signature, through Lightning's logger, which
    a run prints (they went to captioner's own, which nothing configures: never shown)."""
    import logging

    _, module, _, _ = fitted
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    lightning_log = logging.getLogger("lightning.pytorch")  # it does not propagate to caplog's
    lightning_log.addHandler(caplog.handler)
    try:
        scores = trainer.test(module, datamodule=data(toy_root), verbose=False)[0]
    finally:
        lightning_log.removeHandler(caplog.handler)
    assert f"test translations and metrics written to {tmp_path}" in caplog.text
    assert "test BLEU = " in caplog.text and "(nrefs:1|case:lc" in caplog.text
    written = json.loads((tmp_path / "test_metrics.json").read_text())
    assert written["signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a")
    hyps = (tmp_path / "test_translations.txt").read_text().splitlines()
    assert len(hyps) == written["sentences"] == 5
    refs = [t for _, t in PAIRS[1:]]
    assert scores["test/bleu"] == pytest.approx(sacrebleu_score(hyps, refs).score, abs=1e-4)
    assert written["bleu"] == pytest.approx(scores["test/bleu"], abs=1e-4)
    # the file holds <unk> as decoded; the metrics say how test/bleu scored it, and following
    # that note, plain sacreBLEU on the file reproduces the figure
    assert written["unk_scored_as"].startswith("\u2047 (one token: replace <unk> by \u2047")
    from sacrebleu.metrics import BLEU

    plain = BLEU(lowercase=True).corpus_score([h.replace("<unk>", "\u2047") for h in hyps],
                                              [refs])
    assert plain.score == pytest.approx(scores["test/bleu"], abs=1e-4)


def test_checkpoint_carries_config_and_both_vocabularies(fitted):
    _, module, dm, path = fitted
    meta = torch.load(path, map_location="cpu", weights_only=True)["captioner"]
    assert meta["task"] == "translation"
    assert meta["model_config"]["init_args"]["src_vocab_size"] == dm.src_vocab_size
    assert Vocabulary.from_dict(meta["src_vocab"]) == dm.src_vocab
    assert Vocabulary.from_dict(meta["vocab"]) == dm.vocab
    assert meta["data"]["lowercase"] is True
    loaded = TranslationModule.load_from_checkpoint(path)  # Lightning's loader, rebuilt
    assert loaded.src_vocab == dm.src_vocab and loaded.vocab == dm.vocab
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in loaded.state_dict().items())
    # a fresh Translator decodes exactly as the trained module
    translator = Translator.from_checkpoint(path)
    module.eval()
    b = batch_of(PAIRS, module.src_vocab, module.vocab)
    expected = module.generate(*module.encode(b), beam_size=2)
    got = translator.translate([s for s, _ in PAIRS], beam_size=2)
    for i, t in enumerate(got):
        assert t.tokens == expected.tokens[i, : expected.lengths[i]].tolist()
        assert t.alphas.shape == (len(t.tokens), len(t.source_tokens))
        assert t.source_tokens[-1] == "<end>"


def tiny_translator(**search) -> Translator:
    from captioner.encoders.text import TextEncoder

    src_vocab, tgt_vocab = vocabularies()
    torch.manual_seed(5)
    encoder = TextEncoder(len(src_vocab), embed_dim=7, hidden_dim=5)
    decoder = AttentionDecoder(len(tgt_vocab), 10, embed_dim=9, hidden_dim=11, dropout=0.0)
    return Translator(encoder, decoder, src_vocab, tgt_vocab, search=search)


def test_translator_batches_like_single_sentences_and_cuts_at_max_length():
    translator = tiny_translator(max_length=3)
    with torch.no_grad():
        translator.decoder.L_o.bias[translator.tgt_vocab.end_id] = -1e4  # never <end>
    sources = [s for s, _ in PAIRS[:3]]  # 3, 4 and 5 source tokens with <end>
    together = translator.translate(sources)
    for sentence, t in zip(sources, together):
        alone = translator.translate(sentence)[0]
        assert t.tokens == alone.tokens and t.score == pytest.approx(alone.score, abs=1e-5)
        assert len(t.source_unknown) == len(t.source_tokens) == t.alphas.shape[1]
        assert len(t.tokens) == len(t.target_tokens) == 3  # cut: no <end> emitted


def test_translator_passes_its_search_settings(monkeypatch):
    import captioner.translate as translate

    seen = {}

    def spy(decoder, annotations, **kw):
        seen.update(kw)
        return translate.greedy_search(decoder, annotations, **{
            k: v for k, v in kw.items() if k not in ("beam_size", "length_penalty", "stop")})

    monkeypatch.setattr(translate, "beam_search", spy)
    translator = tiny_translator(min_length=3, length_penalty=0.3, beam_stop="exact")
    translator.translate(PAIRS[0][0], beam_size=2)
    assert (seen["beam_size"], seen["min_length"], seen["length_penalty"], seen["stop"]) == (
        2, 3, 0.3, "exact")


def test_the_loss_counts_target_tokens_and_pairs_each_mask_with_its_sentence(monkeypatch):
    src_vocab, tgt_vocab = vocabularies()
    torch.manual_seed(3)
    config = model_config(len(src_vocab), len(tgt_vocab), hard_num_samples=2)
    config["decoder"]["init_args"].update(attention_mode="hard")
    module = TranslationModule.from_config(config).train()
    module.src_vocab, module.vocab = src_vocab, tgt_vocab
    batch = batch_of([PAIRS[0], PAIRS[3], PAIRS[4]], src_vocab, tgt_vocab)  # 3, 8, 4 source
    forward = module.decoder.forward

    def check(annotations, tgt, mask, **kw):
        assert torch.equal(mask, annotations.abs().sum(-1) > 0)  # padding is exactly 0
        return forward(annotations, tgt, mask, **kw)

    monkeypatch.setattr(module.decoder, "forward", check)
    losses = module.loss(batch)
    assert int(losses["tokens"]) == 2 * (4 + 9 + 5)  # 2 samples of the targets, <end> counted


def test_validation_decodes_with_the_modules_search_settings(monkeypatch):
    """``generate`` hands every search setting of the module to the search (``min_length`` too:
    an undertrained model would otherwise end every sentence at once)."""
    import captioner.lit.translation as translation

    seen = {}
    monkeypatch.setattr(translation, "decode", lambda decoder, a, m, **kw: seen.update(kw))
    module = TranslationModule.from_config(model_config(
        11, 13, beam_size=3, min_length=4, length_penalty=0.7, beam_stop="exact"))
    module.generate(torch.zeros(2, 5, 28), torch.ones(2, 5, dtype=torch.bool))
    assert seen == {"beam_size": 3, "max_length": 12, "min_length": 4, "length_penalty": 0.7,
                    "beam_stop": "exact"}


def test_the_plateau_scheduler_is_stepped_with_validation_bleu():
    """``plateau`` reads sacreBLEU (what checkpoints monitor), not the perplexity."""
    from types import SimpleNamespace

    module = TranslationModule.from_config(model_config(11, 13))
    module._trainer = SimpleNamespace(sanity_checking=False)
    module._score = lambda split: ({"bleu": 17.5, "ppl": 3.25}, [], [])
    module.log = lambda *args, **kwargs: None
    stepped = []
    module.step_plateau = stepped.append
    module.on_validation_epoch_end()
    assert stepped == [17.5]


def test_a_translator_takes_the_checkpoints_search_settings_and_casing(fitted, tmp_path):
    """A cased model's Translator keeps the case of its input; its search settings are the
    checkpoint's, not the defaults."""
    _, _, _, path = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    settings = {"beam_size": 3, "max_length": 7, "min_length": 2, "length_penalty": 0.4,
                "beam_stop": "exact"}
    ckpt["hyper_parameters"].update(settings)
    ckpt["captioner"]["data"]["lowercase"] = False
    torch.save(ckpt, tmp_path / "cased.ckpt")
    translator = Translator.from_checkpoint(tmp_path / "cased.ckpt")
    assert translator.search == settings and translator.lowercase is False
    assert translator.tokenize("Ein Hund")[:2] == ["Ein", "Hund"]
    assert Translator.from_checkpoint(path).tokenize("Ein Hund")[:2] == ["ein", "hund"]


@pytest.mark.parametrize("attention", ["LocationAttention", "LocalAttention2d"])
def test_attention_made_for_fixed_positions_or_a_grid_is_refused(attention):
    """Location attention (a fixed number of positions) failed on the first batch of another
    sentence length, and local_2d needs an image grid; both are refused when built."""
    from captioner.config import ConfigError

    config = model_config(9, 11)
    config["decoder"]["init_args"]["attention"] = {
        "class_path": f"captioner.attention.{attention}", "init_args": {}}
    with pytest.raises(ConfigError, match=f"{attention} cannot attend over sentences"):
        TranslationModule.from_config(config)
    TranslationModule.from_config(model_config(9, 11))  # additive: built
