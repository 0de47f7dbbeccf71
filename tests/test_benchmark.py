"""scripts/benchmark.py: the fixed work, the tutorial baseline, the ablations,
and a smoke run of the whole script at tiny sizes."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from captioner.attention import AdditiveAttention
from captioner.decoder import AttentionDecoder
from tests.conftest import load_script


@pytest.fixture(scope="module")
def bm():
    return load_script("benchmark")


def test_caption_lengths_follow_the_fixed_distribution(bm):
    a = bm.sample_lengths(20000, np.random.default_rng(0))
    assert np.array_equal(a, bm.sample_lengths(20000, np.random.default_rng(0)))
    assert a.min() >= 10 and a.max() <= 22
    for length, p in bm.LENGTH_DISTRIBUTION.items():
        assert abs((a == length).mean() - p) < 0.01, length
    assert sum(bm.LENGTH_DISTRIBUTION.values()) == pytest.approx(1.0)

    captions = bm.make_captions(np.array([4, 3]), 11, np.random.default_rng(0))
    assert captions.shape == (2, 4)
    assert captions[0, 0] == bm.START_ID and captions[0, 3] == bm.END_ID
    assert captions[1].tolist()[2:] == [bm.END_ID, bm.PAD_ID]
    assert (captions[0, 1:3] >= 4).all() and (captions[0, 1:3] < 11).all()


def test_tutorial_decoder_sorting_and_shrinking_match_single_captions(bm):
    """The tutorial's sorted, shrinking batch gives each caption the predictions it gets
    alone (eval mode): the baseline computes the model it claims to."""
    torch.manual_seed(0)
    dec = bm.TutorialDecoder(attention_dim=6, embed_dim=4, decoder_dim=9, vocab_size=13,
                             encoder_dim=5).eval()
    ann = torch.randn(3, 7, 5)
    lengths = torch.tensor([4, 6, 3])
    caps = bm.make_captions(lengths.numpy(), 13, np.random.default_rng(1))
    with torch.no_grad():
        preds, caps_sorted, decode_lengths, alphas, sort_ind = dec(ann, caps, lengths)
        assert sort_ind.tolist() == [1, 0, 2] and decode_lengths == [5, 3, 2]
        for row, b in enumerate(sort_ind.tolist()):
            n = int(lengths[b]) - 1
            alone = dec(ann[b : b + 1], caps[b : b + 1, : n + 1], lengths[b : b + 1])[0]
            torch.testing.assert_close(preds[row, :n], alone[0, :n])
            assert (preds[row, n:] == 0).all()  # never computed past the caption
            torch.testing.assert_close(alphas[row, :n].sum(-1), torch.ones(n))
    assert torch.isfinite(bm.tutorial_loss(dec.train(), ann, caps, lengths))


def test_tutorial_beam_search_k1_is_greedy_and_has_the_fixed_length(bm):
    torch.manual_seed(0)
    dec = bm.TutorialDecoder(6, 4, 9, 13, encoder_dim=5).eval()
    ann = torch.randn(1, 7, 5)
    seq = bm.tutorial_beam_search(dec, ann, beam_size=1, steps=6)
    assert len(seq) == 7 and seq[0] == bm.START_ID  # <start> + 6 steps
    assert bm.END_ID not in seq[1:6]
    with torch.no_grad():  # greedy by hand
        h, c = dec.init_hidden_state(ann)
        prev, expected = torch.tensor([bm.START_ID]), [bm.START_ID]
        for step in range(1, 7):
            awe, _ = dec.attention(ann, h)
            awe = dec.sigmoid(dec.f_beta(h)) * awe
            h, c = dec.decode_step(torch.cat([dec.embedding(prev), awe], 1), (h, c))
            scores = torch.log_softmax(dec.fc(h), 1)
            if step < 6:
                scores[:, bm.END_ID] = float("-inf")
            prev = scores.argmax(1)
            expected.append(int(prev))
    assert seq == expected
    assert len(bm.tutorial_beam_search(dec, ann, beam_size=3, steps=6)) == 7


def tiny_decoder(bm, cls=AttentionDecoder, **flags) -> AttentionDecoder:
    torch.manual_seed(0)
    return cls(11, 5, embed_dim=4, hidden_dim=6,
               attention=functools.partial(AdditiveAttention, attention_dim=3), dropout=0.0,
               **flags)


def test_sliced_recurrent_ablation_keeps_loss_and_gradients(bm):
    """The 'before' of the fused recurrent matmul computes the same model: same loss and
    gradients (so the benchmark's ratio compares equal work)."""
    ours = tiny_decoder(bm)
    sliced = tiny_decoder(bm, bm.SlicedRecurrentDecoder)
    assert ours.fused_recurrent and not sliced.fused_recurrent
    ann = torch.randn(3, 7, 5)
    caps = bm.make_captions(np.array([5, 3, 6]), 11, np.random.default_rng(2))
    work = bm.Work(ann, [caps], [torch.tensor([5, 3, 6])])
    parity = bm.training_parity(ours, sliced, work)
    assert parity["loss_abs_diff"] < 1e-6 and parity["grad_max_rel_diff"] < 1e-5
    ref = bm.library_loss(ours, ann, caps)
    ref.backward()
    loss = bm.library_loss(sliced, ann, caps)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for (name, p), q in zip(sliced.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_padded_steps_ablation_computes_the_padding_and_keeps_loss_and_gradients(bm):
    ours = tiny_decoder(bm)
    padded = tiny_decoder(bm, bm.PaddedStepsDecoder)
    ann = torch.randn(3, 7, 5)
    caps = bm.make_captions(np.array([4, 3, 6]), 11, np.random.default_rng(2))
    a = ours(ann, caps, skip_padding=True)
    b = padded(ann, caps, skip_padding=True)  # ignored: every step of every caption
    assert (a.alphas[1, 2:] == 0).all() and torch.allclose(b.alphas[1].sum(-1), torch.ones(5))
    parity = bm.training_parity(ours, padded, bm.Work(ann, [caps], [torch.tensor([4, 3, 6])]))
    assert parity["loss_abs_diff"] < 1e-5 and parity["grad_max_rel_diff"] < 1e-5


def test_quick_run_at_tiny_sizes_writes_every_figure(bm, tmp_path):
    out = tmp_path / "bench.json"
    result = bm.main(["--tiny", "--quick", "--baseline", "--ablations", "--bf16",
                      "--threads", "1", "--json", str(out),
                      "--data", ""])  # generated JPEGs, as on a clean clone (not ../shared/data)
    assert json.loads(out.read_text()) == result
    rates = ["train_captions_per_s", "beam_k3_fixed20_images_per_s",
             "beam_k5_fixed20_images_per_s", "greedy_b32_fixed20_images_per_s"]
    for key in [*rates, "load_images_per_s", "peak_rss_mb", "matmul_gflops"]:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert set(result["encode_images_per_s"]) == {"resnet101_32", "efficientnet_lite0_32"}
    assert all(v > 0 for v in result["encode_images_per_s"].values())
    assert result["torch_version"] == torch.__version__ and result["threads"] == 1
    assert result["mode"] == "tiny" and result["sizes"]["steps"] == 20
    assert set(result["baseline"]) == set(rates)
    for key in rates:
        assert result["speedup_vs_baseline"][key] == pytest.approx(
            result[key] / result["baseline"][key], rel=1e-3)
    assert result["sliced_recurrent_parity"]["loss_abs_diff"] < 1e-4
    assert set(result["ablations"]["sliced_recurrent"]["ours_speedup"]) == {rates[0]}
    assert set(result["ablations"]["reproject_keys"]["ours_speedup"]) == set(rates)
    assert set(result["ablations"]["tanh_hidden"]["ours_speedup"]) == set(rates)
    tanh = result["tanh_hidden_parity"]
    assert tanh["greedy_tokens_equal"] and tanh["beam3_tokens_equal"]
    assert tanh["loss_abs_diff"] < 1e-4 and tanh["grad_max_rel_diff"] < 1e-4
    assert set(result["ablations"]["per_image_decoding"]["ours_speedup"]) == set(rates[1:])
    assert set(result["ablations"]["whole_hidden_layer"]["ours_speedup"]) == set(rates[1:])
    assert set(result["ablations"]["padded_steps"]["ours_speedup"]) == {rates[0]}
    assert set(result["ablations"]["grid_loss"]["ours_speedup"]) == {rates[0]}
    assert set(result["ablations"]["loop_adam"]["ours_speedup"]) == {rates[0]}
    grid = result["grid_loss_parity"]
    assert grid["loss_abs_diff"] < 1e-5 and grid["grad_max_rel_diff"] < 1e-5
    assert set(result["ablations"]["copied_beam_keys"]["ours_speedup"]) == set(rates[1:])
    copied = result["copied_beam_keys_parity"]
    assert copied["greedy_tokens_equal"] and copied["beam3_tokens_equal"]
    assert copied["beam3_score_max_abs_diff"] < 1e-4
    whole = result["whole_hidden_layer_parity"]
    assert whole["greedy_tokens_equal"] and whole["beam3_tokens_equal"]
    assert set(result["ablations"]["compiled_score"]["ours_speedup"]) == set(rates[1:])
    fused = result["compiled_score_parity"]
    assert fused["greedy_tokens_equal"] and fused["beam3_tokens_equal"]
    assert result["bf16"]["loss_rel_diff"] < 0.05
    bf16 = result["bf16"]  # throughput is measured even without native bf16, beside fp32
    for key, task in zip(rates, ["train", "beam_k3", "beam_k5", "greedy_b32"]):
        assert bf16[key] > 0 and bf16[f"fp32_{key}"] > 0, key
        assert bf16[f"{task}_bf16_over_fp32_time"] == pytest.approx(  # rounded in the JSON
            bf16[f"fp32_{key}"] / bf16[key], rel=1e-2)
    assert bf16["encode_images_per_s"].keys() == result["encode_images_per_s"].keys()
    for key in ("greedy_b32", "beam_k3"):
        block = bf16["lightning_autocast"][key]
        assert block["speedup"] == pytest.approx(block["frozen_weights_images_per_s"]
                                                 / block["per_step_casts_images_per_s"], rel=1e-2)
    assert all(v > 0 for v in bf16["encode_images_per_s"].values())
    assert result["load_settings"]["num_workers"] == 2  # the data module's default
    assert result["load_settings"]["source"] == "generated JPEGs (40 x 30)"  # --tiny's size


def test_a_misspelt_skip_is_refused(bm, capsys):
    """``--skip encode,laod`` ran the loading part anyway (minutes at full size), silently."""
    with pytest.raises(SystemExit) as e:
        bm.main(["--tiny", "--skip", "encode,laod"])
    assert e.value.code == 2
    assert "--skip: unknown laod (choose among decoders, encode, load)" in capsys.readouterr().err


def test_interleaved_alternates_the_order_of_each_round(bm):
    calls = []
    tasks = {name: functools.partial(calls.append, name) for name in ("a", "b", "c")}
    times = bm.interleaved(tasks, 1, 3, torch.device("cpu"))
    assert calls == ["a", "b", "c",  # warm-up
                     "a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    calls.clear()
    bm.interleaved(tasks, 0, 2, torch.device("cpu"), alternate=False)
    assert calls == ["a", "b", "c", "a", "b", "c"]


def test_ab_run_reports_each_round(bm):
    result = bm.main(["--tiny", "--quick", "--repeats", "3", "--ab", "grid_loss", "--skip",
                      "decoders,encode,load", "--threads", "1"])
    ab = result["ab"]
    assert ab["ablation"] == "grid_loss" and ab["repeats"] == 3
    assert len(ab["ours_speedup_per_round"]) == 3
    rounds = ab["ours_speedup_per_round"]  # rounded to 3 decimals: 1.0004 reads 1.0
    assert sum(x > 1 for x in rounds) <= ab["rounds_ours_faster"] <= sum(x >= 1 for x in rounds)
    assert min(rounds) - 1e-3 <= ab["ours_speedup_median"] <= max(rounds) + 1e-3
    assert ab["ours_train_captions_per_s"] > 0 and ab["ablated_train_captions_per_s"] > 0
    assert "decode" not in ab  # grid_loss changes training only
    result = bm.main(["--tiny", "--quick", "--repeats", "2", "--ab", "copied_beam_keys", "--skip",
                      "decoders,encode,load", "--threads", "1"])
    ab = result["ab"]
    assert "ours_train_captions_per_s" not in ab  # decoding only
    assert set(ab["decode"]) == {"beam_k3", "beam_k5", "greedy_b32"}
    for entry in ab["decode"].values():
        assert len(entry["ours_speedup_per_round"]) == 2 and entry["ours_per_s"] > 0
    with pytest.raises(SystemExit, match="'nonsense' is not an ablation"):
        bm.main(["--tiny", "--quick", "--ab", "nonsense", "--skip", "decoders,encode,load"])


def test_batching_weighs_each_length_by_its_probability(bm, monkeypatch):
    """The paper's batches of one length: expected step time ``sum_l p_l t(l)``. With a fake
    clock giving ``t(l) = 0.01 l`` s and 0.2 s for every mixed batch, the expected same-length
    step is 0.01 x the mean length, 13.062 tokens (10 x 0.07 + 11 x 0.22 + ... + 22 x 0.007)."""
    def fake_interleaved(tasks, warmup, repeats, device, alternate=True):
        return {name: [0.01 * int(name.split("_")[1]) if name.startswith("same") else 0.2] * 3
                for name in tasks}

    monkeypatch.setattr(bm, "interleaved", fake_interleaved)
    s = bm.TINY
    out = bm.bench_batching(s, torch.device("cpu"), lambda msg: None)
    assert set(out["step_seconds"]) == {f"{kind}_{n}" for n in bm.LENGTH_DISTRIBUTION
                                        for kind in ("same", "mixed")}
    assert out["mean_caption_tokens"] == pytest.approx(13.062)
    assert out["same_length_train_captions_per_s"] == pytest.approx(s.batch / 0.13062)
    assert out["mixed_train_captions_per_s"] == pytest.approx(s.batch / 0.2)
    tokens = out["mixed_batches_mean_caption_tokens"]
    assert 10 <= tokens <= 22
    # seconds per token: mixed 0.2 / tokens, same 0.01
    assert out["same_length_speedup_per_token"] == pytest.approx(20 / tokens)


def test_batching_run_at_tiny_sizes(bm):
    result = bm.main(["--tiny", "--quick", "--batching", "--skip", "decoders,encode,load",
                      "--threads", "1"])
    batching = result["batching"]
    assert batching["same_length_train_captions_per_s"] > 0
    assert batching["mixed_train_captions_per_s"] > 0
    assert len(batching["step_seconds"]) == 2 * len(bm.LENGTH_DISTRIBUTION)
