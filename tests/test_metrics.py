"""Tests for captioner.metrics (BLEU, COCO protocol, results file, attention correctness).

The last section dry-runs the dataset download scripts (no network is touched).
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata

import numpy as np
import pytest

from captioner.metrics import (
    EvalResult,
    attention_correctness,
    box_cell_coverage,
    coco_caption_scores,
    corpus_bleu,
    java_available,
    simple_ptb_tokenize,
    spice_jars_present,
    write_coco_results,
)

# ---------------------------------------------------------------------------------------------
# corpus_bleu
# ---------------------------------------------------------------------------------------------


def test_corpus_bleu_identical_is_one():
    refs = [[["a", "man", "rides", "a", "horse"], ["a", "person", "on", "a", "horse"]]]
    scores = corpus_bleu([["a", "man", "rides", "a", "horse"]], refs)
    assert scores == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0})


def test_corpus_bleu_hand_computed():
    hyp = "a cat on the mat".split()  # c = 5
    ref = "the cat is on the mat".split()  # r = 6
    # unigrams: cat, on, the, mat match (not "a")               -> p1 = 4/5
    # bigrams: "on the", "the mat" of 4                          -> p2 = 2/4
    # trigrams: "on the mat" of 3                                -> p3 = 1/3
    # 4-grams: none of 2                                         -> p4 = 0
    bp = math.exp(1 - 6 / 5)  # c < r
    scores = corpus_bleu([hyp], [[ref]])
    assert scores["bleu1"] == pytest.approx(bp * 0.8)
    assert scores["bleu2"] == pytest.approx(bp * math.sqrt(0.8 * 0.5))
    assert scores["bleu3"] == pytest.approx(bp * (0.8 * 0.5 / 3) ** (1 / 3))
    # no 4-gram match: pycocoevalcap's (0 + 1e-15) / (2 + 1e-9) for p4, not exactly 0
    assert scores["bleu4"] == pytest.approx(bp * (0.8 * 0.5 / 3 * 0.5e-15) ** (1 / 4))
    assert scores["bleu4"] < 1e-3


def test_corpus_bleu_with_several_references_by_hand():
    """Matches may come from different references; clipping takes each n-gram's largest count
    in any one reference; the brevity penalty uses the closest reference length."""
    # unigrams a (ref 1), dog (ref 2), runs (both): p1 = 3/3; bigrams: "dog runs" (ref 2) of 2
    # closest reference length to c = 3 is ref 2's 3 (ref 1 has 5): BP = 1
    scores = corpus_bleu([["a", "dog", "runs"]],
                         [[["a", "cat", "runs", "fast", "today"], ["the", "dog", "runs"]]])
    assert scores["bleu1"] == pytest.approx(1.0)
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.5))
    # "the" x3 clipped to 2 (its count in ref 2) -> p1 = 2/3; "the the" x2 clipped to 1 -> 1/2;
    # closest length to 3 is 2 (ref 1; ref 2 has 6), shorter than c: BP = 1
    scores = corpus_bleu([["the", "the", "the"]],
                         [[["the", "cat"], ["the", "the", "mat", "x", "y", "z"]]])
    assert scores["bleu1"] == pytest.approx(2 / 3)
    assert scores["bleu2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2))
    # the closest reference, not the shortest: c = 6 against lengths 2 and 7 -> r = 7,
    # BP = e^(1 - 7/6); every unigram is in the long reference
    scores = corpus_bleu([["a", "dog", "runs", "on", "green", "grass"]],
                         [[["a", "dog"], ["a", "dog", "runs", "on", "the", "green", "grass"]]])
    assert scores["bleu1"] == pytest.approx(math.exp(1 - 7 / 6))


def test_corpus_bleu_counts_no_ngrams_a_short_hypothesis_lacks():
    """A 3-token hypothesis has no 4-gram: it adds 0, not 1, to the 4-gram count (NLTK's
    corpus_bleu adds 1, which scored this perfect corpus 0.974)."""
    refs = [[["a", "dog", "runs", "on", "grass"]], [["a", "cat"]], [["two", "red", "birds"]]]
    hyps = [r[0] for r in refs]  # every hypothesis equals its reference
    assert corpus_bleu(hyps, refs) == pytest.approx(
        {"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0})


def test_corpus_bleu_empty_hypotheses_and_corpus():
    ref = [["a", "dog", "runs"]]
    full = corpus_bleu([["a", "dog", "runs"]], [ref])
    with_empty = corpus_bleu([["a", "dog", "runs"], []], [ref, ref])
    # The empty hypothesis adds no n-gram, only its reference length: p1..p3 stay 1 and the
    # brevity penalty is exp(1 - 6/3); no hypothesis has a 4-gram, so p4 = 1e-15 / 1e-9.
    bp = math.exp(1 - 6 / 3)
    assert full["bleu1"] == pytest.approx(1.0)
    assert with_empty == pytest.approx({"bleu1": bp, "bleu2": bp, "bleu3": bp,
                                        "bleu4": bp * 1e-6 ** (1 / 4)})
    assert corpus_bleu([[]], [ref]) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    assert corpus_bleu([], []) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0}
    with pytest.raises(ValueError):
        corpus_bleu([["a"]], [])


# ---------------------------------------------------------------------------------------------
# coco_caption_scores
# ---------------------------------------------------------------------------------------------

REFS = {
    1: ["A man is riding a horse on the beach.", "A person rides a brown horse."],
    2: ["Two dogs play in the snow!", "Dogs are playing in the white snow."],
    "img3": ["A red bus drives down a city street.", "The bus is red, and it's on a street."],
}


@pytest.mark.skipif(not java_available(), reason="the official PTB tokenizer and METEOR run on Java; without it the Python fallback is tested separately")
def test_coco_caption_scores_official_protocol(caplog):
    hyps = {k: v[0] for k, v in REFS.items()}  # perfect hypotheses
    # line breaks inside a reference (a multi-line CSV caption): were they passed on, the Java
    # tokenizer would split that line and shift every later caption onto the wrong image
    refs = {**REFS, 1: [REFS[1][0], "A person rides\r\na brown\u2028horse.\x0c"]}
    # a reference written decomposed (NFD: "e" + U+0301) is the hypothesis's composed "café"
    hyps["img3"] = "A red bus drives past a caf\u00e9."
    refs["img3"] = [unicodedata.normalize("NFD", hyps["img3"]), *REFS["img3"][1:]]
    with caplog.at_level(logging.WARNING, logger="captioner.metrics"):
        result = coco_caption_scores(refs, hyps)  # the only Java call of the suite
    assert isinstance(result, EvalResult) and result.tokenizer == "ptb"
    assert all(isinstance(v, float) for v in result.scores.values())
    expected = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    if spice_jars_present():
        assert "SPICE" in result.scores or "SPICE" in result.skipped
    else:
        assert list(result.scores) == expected
        assert "jars missing" in result.skipped["SPICE"]
        assert len([r for r in caplog.records if "SPICE" in r.getMessage()]) == 1
    assert result.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["ROUGE-L"] == pytest.approx(1.0)
    assert result.scores["CIDEr"] > 0


def test_coco_caption_scores_without_java():
    hyps = {1: "a man riding a horse", 2: "two dogs in the snow", "img3": "a red bus"}
    result = coco_caption_scores(REFS, hyps, use_java=False)
    assert result.tokenizer == "python"
    assert set(result.scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert set(result.skipped) == {"PTBTokenizer", "METEOR", "SPICE"}
    assert 0 < result.scores["BLEU-1"] < 1 and result.scores["CIDEr"] > 0
    perfect = coco_caption_scores(REFS, {k: v[1] for k, v in REFS.items()}, use_java=False)
    assert perfect.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    # references written decomposed (NFD) score as the composed hypotheses they equal
    composed = {1: "Crème brûlée on a café table", 2: "Naïve señor", "img3": "Zwei Männer"}
    nfd = {k: [unicodedata.normalize("NFD", v)] for k, v in composed.items()}
    assert coco_caption_scores(nfd, composed, use_java=False).scores["BLEU-1"] == pytest.approx(1)


@pytest.mark.parametrize("has_java", [True, False])
def test_the_reason_for_skipping_java_is_the_users_choice_first(monkeypatch, has_java):
    """``use_java=False`` is the reason whatever the machine has (a machine without Java used to
    report "Java not found", so ``--no-java`` output depended on the machine)."""
    monkeypatch.setattr("captioner.metrics.java_available", lambda: has_java)
    hyps = {1: "a man riding a horse", 2: "two dogs in the snow", "img3": "a red bus"}
    assert coco_caption_scores(REFS, hyps, use_java=False).skipped["METEOR"] == "use_java=False"
    if not has_java:
        skipped = coco_caption_scores(REFS, hyps).skipped
        assert skipped["METEOR"] == skipped["SPICE"] == "Java not found on PATH"


def test_coco_caption_scores_mismatched_ids():
    hyps = {1: "a man", 2: "dogs", 4: "a bus"}
    with pytest.raises(ValueError, match=r"'img3'.*\b4\b"):
        coco_caption_scores(REFS, hyps, use_java=False)
    with pytest.raises(ValueError, match=r"references\[1\] must be a non-empty list"):
        coco_caption_scores({1: "a man"}, {1: "a man"}, use_java=False)  # not its characters


def test_every_reference_counts_not_only_the_first_four(tmp_path):
    """A hypothesis equal to an image's 5th reference (COCO has 5 or more) is perfect, in
    coco_caption_scores and in evaluate_split."""
    from types import SimpleNamespace

    from PIL import Image

    from captioner.data.formats import ImageRecord
    from captioner.evaluation import evaluate_split

    refs = ["a cat sits", "a cat sleeps", "a cat eats", "the cat", "a dog runs fast"]
    scores = coco_caption_scores({7: refs}, {7: "a dog runs fast"}, use_java=False).scores
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)

    class Fake:  # a Captioner that writes the 5th reference
        image_size, search = 4, dict(beam_size=1, max_length=9, min_length=1,
                                     length_penalty=0.0, beam_stop="k_finished")
        decoder = None  # no hard attention

        def caption_tensors(self, images, beam_size, max_length):
            return [SimpleNamespace(text="a dog runs fast", cell_edges=None) for _ in images]

    Image.new("RGB", (5, 3)).save(tmp_path / "a.png")
    ev = evaluate_split(Fake(), [ImageRecord(7, tmp_path / "a.png", refs)], use_java=False)
    assert ev.scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_simple_ptb_tokenize():
    assert simple_ptb_tokenize("a <unk> on a\r\nmat") == "a <unk> on a mat"  # as PTB: one token
    assert simple_ptb_tokenize("A dog's ball, don't (go)!") == "a dog 's ball do n't -lrb- go -rrb-"
    assert simple_ptb_tokenize('A black-and-white "cat"... on 3.5 mats.') == (
        "a black-and-white cat on 3.5 mats"
    )
    # as the Java PTBTokenizer writes them (pycocoevalcap's jar, -lowerCase, punctuation dropped):
    # abbreviations keep their final period, clock times and ratios stay whole
    for caption, java in [("A bus at 10:45 a.m. in N.Y.", "a bus at 10:45 a.m. in n.y."),
                          ("Mr. Smith and Dr. Who, etc.", "mr. smith and dr. who etc."),
                          ("a No. 5 jersey, at 5:30pm", "a no. 5 jersey at 5:30 pm"),
                          ("the U.S. flag says no.", "the u.s. flag says no"),
                          ("a 16:9 screen in St. Louis.", "a 16:9 screen in st. louis"),
                          ("a.k.a the u.s.army b.b.q", "a.k.a the u.s.army b.b.q")]:
        assert simple_ptb_tokenize(caption) == java


# ---------------------------------------------------------------------------------------------
# write_coco_results
# ---------------------------------------------------------------------------------------------


def test_write_coco_results_loadable_by_coco(tmp_path):
    from pycocotools.coco import COCO

    gt = {
        "info": {}, "licenses": [], "type": "captions",
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10}
                   for i in (3, 7, 11)],
        "annotations": [{"id": n, "image_id": i, "caption": f"caption {n}"}
                        for n, i in enumerate((3, 3, 7, 11), start=1)],
    }
    gt_path = tmp_path / "captions_val.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "results" / "captions_val_results.json"
    write_coco_results({11: "a dog", 3: "a cat", "7": "a bird"}, out)
    assert json.loads(out.read_text()) == [
        {"image_id": 3, "caption": "a cat"},
        {"image_id": 7, "caption": "a bird"},
        {"image_id": 11, "caption": "a dog"},
    ]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left
    coco = COCO(str(gt_path))
    res = coco.loadRes(str(out))
    assert sorted(res.getImgIds()) == [3, 7, 11]
    assert res.imgToAnns[7][0]["caption"] == "a bird"
    with pytest.raises(ValueError, match="abc"):
        write_coco_results({"abc": "x"}, out)
    # with the files: each row names its image ("7" found under the integer id too)
    write_coco_results({11: "a dog", "7": "a bird"}, out, files={11: "d/11.jpg", 7: "d/7.jpg"})
    assert [r["file_name"] for r in json.loads(out.read_text())] == ["d/7.jpg", "d/11.jpg"]
    assert coco.loadRes(str(out)).imgToAnns[7][0]["file_name"] == "d/7.jpg"
    with pytest.raises(ValueError, match="no file for image id 11"):
        write_coco_results({11: "a dog"}, out, files={7: "d/7.jpg"})


# ---------------------------------------------------------------------------------------------
# attention_correctness
# ---------------------------------------------------------------------------------------------

GRID = (3, 5)  # (H, W)
IMAGE = (60, 100)  # (H_img, W_img): 20 x 20 pixel cells
BOX = (20.0, 20.0, 50.0, 20.0)  # x, y, w, h: cells (1, 1), (1, 2) whole, half of (1, 3)


def _alpha(cells: dict[tuple[int, int], float]) -> np.ndarray:
    a = np.zeros(GRID)
    for (r, c), v in cells.items():
        a[r, c] = v
    return a.reshape(-1)  # (L,)


def test_box_cell_coverage_area_weighted():
    cover = box_cell_coverage([BOX], GRID, IMAGE)
    expected = np.zeros(GRID)
    expected[1, 1] = expected[1, 2] = 1.0
    expected[1, 3] = 0.5
    np.testing.assert_allclose(cover, expected)


def test_box_cell_coverage_counts_overlapping_boxes_once():
    """Boxes that overlap along y count their common part once (the union's area), not once
    per box."""
    # (x, y, w, h) (0, 0, 10, 10) and (0, 5, 10, 10): both x in [0, 10), y in [0, 10) and
    # [5, 15): union y in [0, 15) -> 10 * 15 = 150 px of the one 20 x 20 cell (400 px);
    # counting the overlap twice would give (10 + 10) * 10 = 200 -> 0.5
    cover = box_cell_coverage([(0, 0, 10, 10), (0, 5, 10, 10)], (1, 1), (20, 20))
    assert cover[0, 0] == pytest.approx(150 / 400)


def test_sampled_coverage_samples_at_cell_centres():
    """Through a ``theta`` the coverage counts 16 x 16 points spread evenly over the cell at
    the centres of its 16 x 16 sub-cells (``(i + 0.5) / 16``), not at their top-left corners
    (which would be biased towards the cell's top and left edges)."""
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # one 16 x 16 px cell: sample columns at x = i + 0.5 px, i = 0..15
    # x in [0, 0.5) holds none of them (corners x = i: the column x = 0, 16 / 256 = 1/16)
    left = box_cell_coverage([(0, 0, 0.5, 16)], (1, 1), (16, 16), theta=identity)
    assert left[0, 0] == 0.0
    # x in [15.5, 16) holds the column x = 15.5: 16 of 256 points (corners: none, x <= 15)
    right = box_cell_coverage([(15.5, 0, 0.5, 16)], (1, 1), (16, 16), theta=identity)
    assert right[0, 0] == pytest.approx(16 / 256)


def test_attention_correctness_hand_computed():
    inside = _alpha({(1, 1): 0.5, (1, 2): 0.5})
    partial = _alpha({(1, 1): 0.2, (1, 2): 0.3, (1, 3): 0.4, (0, 0): 0.1})  # 0.2+0.3+0.4/2
    alphas = [np.stack([np.full(15, 1 / 15), inside, partial, inside])]  # (T=4, L)
    words = [["a", "red", "square", "<end>"]]  # "a" and "<end>" name nothing
    out = attention_correctness(alphas, words, [[("square", "red", BOX)]], GRID, [IMAGE])
    assert out["num_words"] == 2
    assert out["attention_correctness"] == pytest.approx((1.0 + 0.7) / 2)
    assert out["chance"] == pytest.approx(1000 / 6000)


def test_attention_correctness_uniform_is_chance_any_grid():
    grid, image = (3, 5), (37, 53)  # non-integer cell sizes
    boxes = [[("circle", "blue", (5.5, 3.0, 20.0, 30.0)),
              ("square", "red", (40.0, 30.0, 30.0, 20.0))]]
    alphas = [np.full((2, 15), 1 / 15)]
    out = attention_correctness(alphas, [["blue", "square"]], boxes, grid, [image])
    circle = 20.0 * 30.0 / (37 * 53)
    square = 13.0 * 7.0 / (37 * 53)  # clipped to the image
    assert out["chance"] == pytest.approx((circle + square) / 2)
    assert out["attention_correctness"] == pytest.approx(out["chance"])
    # Unnormalised attention is renormalised per step.
    scaled = attention_correctness([alphas[0] * 3.0], [["blue", "square"]], boxes, grid, [image])
    assert scaled["attention_correctness"] == pytest.approx(out["attention_correctness"])


def test_attention_correctness_several_matches_use_union_and_synonyms():
    boxes = [[("circle", "red", (0.0, 0.0, 20.0, 20.0)),
              ("square", "red", (10.0, 0.0, 20.0, 20.0))]]  # overlap: union 30 x 20
    uniform = np.full(15, 1 / 15)
    on_square_only = _alpha({(0, 1): 1.0})  # half of this cell is the square
    alphas = [np.stack([uniform, on_square_only, on_square_only, uniform])]
    words = [["red", "circle", "squares", "triangle"]]  # triangle: not in the image
    out = attention_correctness(alphas, words, boxes, GRID, [IMAGE],
                                object_words={"squares": "square"})
    assert out["num_words"] == 3
    # red: union covers 1.5 cells -> 1.5 / 15; circle: 0; square: half the cell -> 0.5
    assert out["attention_correctness"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert out["chance"] == pytest.approx((600 + 400 + 400) / 6000 / 3)
    none = attention_correctness([uniform[None]], [["dog"]], boxes, GRID, [IMAGE])
    assert none["num_words"] == 0 and math.isnan(none["attention_correctness"])
    with pytest.raises(ValueError):
        attention_correctness([np.ones((1, 14))], [["red"]], boxes, GRID, [IMAGE])


def test_attention_correctness_matches_generated_words_in_any_case():
    """A generated word matches an object's name case-insensitively: "Red" names the red
    square as "red" does."""
    alphas = [np.full((1, 4), 0.25)]  # uniform over a 2 x 2 grid
    boxes = [[("square", "red", (0.0, 0.0, 10.0, 10.0))]]  # exactly cell (0, 0) of 20 x 20
    out = attention_correctness(alphas, [["Red"]], boxes, (2, 2), [(20, 20)])
    assert out["num_words"] == 1
    # 0.25 of the mass on the fully covered cell (0, 0); chance 100 / 400 = 0.25
    assert out["attention_correctness"] == pytest.approx(0.25)
    assert out["chance"] == pytest.approx(0.25)
    synonym = attention_correctness(alphas, [["Crimson"]], boxes, (2, 2), [(20, 20)],
                                    object_words={"crimson": "RED"})
    assert synonym["num_words"] == 1


def test_json_safe_turns_undefined_scores_into_null():
    from captioner.metrics import json_safe

    obj = {"BLEU-4": 0.5, "attention_correctness": float("nan"),
           "nested": [float("inf"), 1, "x", (2.0, float("-inf"))]}
    text = json.dumps(json_safe(obj), allow_nan=False)
    assert json.loads(text) == {"BLEU-4": 0.5, "attention_correctness": None,
                                "nested": [None, 1, "x", [2.0, None]]}
