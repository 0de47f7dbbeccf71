"""Caption metrics: BLEU, the official COCO caption protocol, and attention correctness.

Three groups of functions live here:

* :func:`corpus_bleu` - corpus BLEU-1..4 on token lists (the COCO scorer's BLEU on the package's
  own tokens), for validation curves. Papers report :func:`coco_caption_scores`, whose BLEU
  differs from it only by the PTB tokenisation.
* :func:`coco_caption_scores` - the official ``pycocoevalcap`` protocol used by Xu et al.
  (2015, Section 5) and every later COCO / Flickr paper: Stanford PTB tokenisation of the raw
  strings, then BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and optionally SPICE. Parts that need Java
  or downloaded jars are skipped with one logged warning; what was skipped (and why) is returned
  in :class:`EvalResult`. :func:`write_coco_results` writes the COCO results JSON for the
  official server / ``COCO.loadRes``.
* :func:`attention_correctness` - how much attention mass falls inside the box of the object a
  generated word names (Liu et al., 2017, "Attention Correctness in Neural Image Captioning"),
  with area-weighted grid cells. Useful on synthetic shape data sets with known boxes.

Shapes use the package symbols: ``T`` caption length, ``H x W`` attention grid, ``L = H * W``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner.atomic import atomic_write
from captioner.grid_frame import Edges

logger = logging.getLogger(__name__)

ImageId = Hashable  # int or str in practice
BoxXYWH = tuple[float, float, float, float]

# Keys of the score dict returned by coco_caption_scores, in the order papers report them.
COCO_METRIC_KEYS: tuple[str, ...] = (
    "BLEU-1",
    "BLEU-2",
    "BLEU-3",
    "BLEU-4",
    "METEOR",
    "ROUGE-L",
    "CIDEr",
    "SPICE",
)

# Same punctuation list as pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, plus the raw
# brackets and quotes that the Java tokenizer turns into -LRB-/``/'' before removing them.
_PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)
# The Java tokenizer escapes brackets and, with -lowerCase, the escapes survive the filter above
# (e.g. "-lrb-"); the Python fallback reproduces that quirk.
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_CONTRACTION_RE = re.compile(r"(?<=\w)(n't|'s|'m|'d|'ll|'re|'ve)\b")
# Abbreviations whose final period PTBTokenizer keeps (checked against the Java tokenizer of
# pycocoevalcap, mid-caption and at its end): initialisms ("u.s.", "a.m.", "e.g."), titles and
# the like, and "no." before a number; clock times and ratios ("10:45", "16:9") stay whole.
_ABBREVIATIONS = (
    "mr mrs ms dr st jr sr lt capt gen col sgt gov sen rep prof rev etc vs inc co corp ltd dept "
    "mt ave blvd ft est jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri "
    "calif fla ariz").split()
_ABBREVIATION = (rf"(?<![\w.])(?:(?:[a-z]\.){{2,}}(?!\w)|(?:{'|'.join(_ABBREVIATIONS)})\.(?!\w)"
                 r"|no\.(?=\s*\d))")
_TOKEN_RE = re.compile(rf"<[a-z]+>|n't|'\w+|{_ABBREVIATION}|\d+(?::\d+)+"
                       r"|\w+(?:[-.,/']\w+)*|\.\.\.|--|``|''|[^\w\s]")

_CORENLP_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


# ---------------------------------------------------------------------------------------------
# Corpus BLEU on token lists
# ---------------------------------------------------------------------------------------------


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[Sequence[str]]],
) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 (Papineni et al., 2002) on token lists, computed by
    ``pycocoevalcap``'s ``BleuScorer``: the BLEU definition of :func:`coco_caption_scores`,
    without its Java tokenisation.

    Clipped n-gram matches and n-gram counts are summed over the corpus before the geometric
    mean; a hypothesis of ``c`` tokens contributes ``max(0, c - n + 1)`` n-grams (an empty one
    adds nothing but its reference length); the brevity penalty uses the closest reference
    length (the shorter on a tie). As in ``pycocoevalcap``, each precision is
    ``(matches + 1e-15) / (count + 1e-9)``, so an order without any match scores about
    ``1e-6 ** (1/n)`` times the rest rather than exactly 0. (Until November 2026 this used
    NLTK's ``corpus_bleu``, which counts at least one n-gram per hypothesis and order, and so
    scored corpora with short hypotheses lower; validation figures recorded before then in
    ``docs/`` used that definition.)

    Args:
        hypotheses: one token list per image, e.g. ``[["a", "dog", "runs"], ...]``.
        references: for each hypothesis, all of its reference token lists.

    Returns:
        ``{"bleu1": ..., "bleu2": ..., "bleu3": ..., "bleu4": ...}``, floats in ``[0, 1]``.

    Raises:
        ValueError: if the two lists differ in length or a hypothesis has no reference.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    if len(hypotheses) != len(references):
        raise ValueError(
            f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} reference lists"
        )
    for i, refs in enumerate(references):
        if len(refs) == 0:
            raise ValueError(f"corpus_bleu: hypothesis {i} has no reference")
    keys = ("bleu1", "bleu2", "bleu3", "bleu4")
    if not hypotheses or all(len(h) == 0 for h in hypotheses):
        return {k: 0.0 for k in keys}
    scorer = BleuScorer(n=4)
    for hyp, refs in zip(hypotheses, references):
        scorer += (" ".join(hyp), [" ".join(r) for r in refs])  # tokens hold no spaces
    scores, _ = scorer.compute_score(option="closest", verbose=0)
    return {k: float(v) for k, v in zip(keys, scores)}


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``), inside
    dicts, lists and tuples: metrics files stay valid JSON (RFC 8259 has no NaN) when a score
    is undefined, e.g. attention correctness of captions without a single box word."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Official COCO caption evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`coco_caption_scores` returns.

    Attributes:
        scores: metric name -> corpus score, floats only. Keys are a subset of
            :data:`COCO_METRIC_KEYS` (``"BLEU-1"`` .. ``"BLEU-4"``, ``"METEOR"``, ``"ROUGE-L"``,
            ``"CIDEr"`` (pycocoevalcap's CIDEr is CIDEr-D), ``"SPICE"``).
        skipped: part -> reason, for each part that did not run (``"PTBTokenizer"``,
            ``"METEOR"``, ``"SPICE"``). Empty when the full protocol ran.
        tokenizer: ``"ptb"`` (Stanford PTBTokenizer, the official one) or ``"python"`` (the
            fallback of :func:`simple_ptb_tokenize`; scores are then close to, but not exactly,
            the official ones).
    """

    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "ptb"


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH`` (needed by PTBTokenizer, METEOR, SPICE)."""
    return shutil.which("java") is not None


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0])


def spice_jars_present() -> bool:
    """Whether the Stanford CoreNLP 3.6.0 jars that SPICE needs are installed.

    ``pycocoevalcap``'s ``get_stanford_models()`` downloads them into ``spice/lib/`` on first
    use; without internet they are missing and SPICE cannot run.
    """
    lib = _pycocoevalcap_dir() / "spice" / "lib"
    return all((lib / jar).is_file() for jar in _CORENLP_SPICE_JARS)


def simple_ptb_tokenize(caption: str) -> str:
    """Pure-Python approximation of the COCO PTBTokenizer step.

    Lowercases, splits clitics the PTB way (``"don't"`` -> ``"do n't"``, ``"dog's"`` ->
    ``"dog 's"``), keeps hyphenated words and numbers whole, escapes brackets as the Java
    tokenizer does (``"("`` -> ``"-lrb-"``), keeps the final period of abbreviations
    (``"u.s."``, ``"mr."``) and clock times whole (``"10:45"``), and drops quotes and the
    punctuation tokens that ``pycocoevalcap`` drops. Used only when Java is unavailable; it
    matches PTBTokenizer on ordinary captions, not on every corner case (single-letter
    initials such as ``"john f. kennedy"`` differ).

    Args:
        caption: a raw caption string.

    Returns:
        The space-joined tokens.
    """
    text = _CONTRACTION_RE.sub(r" \1", caption.lower().replace("\n", " "))
    tokens = (_PTB_BRACKETS.get(t, t) for t in _TOKEN_RE.findall(text))
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATIONS and t != '"')


def _ptb_tokenize(captions: list[str], timeout_s: float) -> list[str]:
    """Stanford PTBTokenizer exactly as pycocoevalcap calls it, one output line per caption.

    Same jar, flags and punctuation filter as ``pycocoevalcap.tokenizer.PTBTokenizer``, but the
    temporary file goes to the system temp dir (site-packages may be read-only), the call has a
    timeout and the number of output lines is checked.
    """
    jar = _pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"{jar} not found")
    # one line per caption: any line break inside one (\r, \v, \f, U+2028...) would make the
    # tokenizer split it and shift every later caption onto the wrong image
    text = "\n".join(" ".join(c.split()) for c in captions)
    fd, tmp = tempfile.mkstemp(suffix=".txt", prefix="ptb_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", tmp]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=True)
    finally:
        os.remove(tmp)
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "" and len(lines) == len(captions) + 1:
        lines.pop()  # the final newline
    if len(lines) != len(captions):
        raise RuntimeError(
            f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions"
        )
    return [
        " ".join(w for w in line.rstrip().split(" ") if w and w not in _PTB_PUNCTUATIONS)
        for line in lines[: len(captions)]
    ]


def _run_meteor(
    gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]], timeout_s: float
) -> float:
    """METEOR 1.5 through pycocoevalcap, with a watchdog and a guaranteed shutdown.

    The jar runs as one subprocess per call. ``compute_score`` runs in a worker thread; if it
    exceeds ``timeout_s`` the subprocess is killed, which unblocks the thread (its ``readline``
    returns EOF) and turns the hang into an error.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    scores: list[float] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            scores.append(float(meteor.compute_score(gts, res)[0]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    try:
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            meteor.meteor_p.kill()
            worker.join(5.0)
            raise TimeoutError(f"METEOR did not answer within {timeout_s:g} s")
        if errors:
            raise RuntimeError(f"METEOR failed: {errors[0]!r}") from errors[0]
        return scores[0]
    finally:
        proc = meteor.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        proc.kill()
        proc.wait()
        # A crashed compute_score leaves Meteor.lock held; Meteor.__del__ acquires it and would
        # deadlock at garbage collection. The process is gone, so a fresh lock is safe.
        meteor.lock = threading.Lock()


def _validate_ids(
    references: Mapping[ImageId, Sequence[str]], hypotheses: Mapping[ImageId, str]
) -> None:
    ref_ids, hyp_ids = set(references), set(hypotheses)
    if ref_ids != hyp_ids:
        no_hyp = sorted(map(repr, ref_ids - hyp_ids))[:5]
        no_ref = sorted(map(repr, hyp_ids - ref_ids))[:5]
        parts = []
        if no_hyp:
            parts.append(f"no hypothesis for image id(s) {', '.join(no_hyp)}")
        if no_ref:
            parts.append(f"no references for image id(s) {', '.join(no_ref)}")
        raise ValueError("coco_caption_scores: ids differ: " + "; ".join(parts))
    if not ref_ids:
        raise ValueError("coco_caption_scores: no images to evaluate")
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"coco_caption_scores: references[{k!r}] must be a non-empty list of strings"
            )
        if not isinstance(hypotheses[k], str):
            raise ValueError(f"coco_caption_scores: hypotheses[{k!r}] must be a string")


def coco_caption_scores(
    references: Mapping[ImageId, Sequence[str]],
    hypotheses: Mapping[ImageId, str],
    *,
    use_spice: bool | None = None,
    use_java: bool | None = None,
    timeout_s: float = 600.0,
) -> EvalResult:
    """Score captions with the official COCO caption protocol (``pycocoevalcap``).

    Steps, as in ``pycocoevalcap.eval.COCOEvalCap``: the raw reference and hypothesis strings,
    in Unicode NFC form (as :func:`captioner.data.tokenize.tokenize` reads captions), are
    tokenised with the Stanford PTBTokenizer (lowercased, punctuation removed), then
    BLEU-1..4 (``closest`` reference length), METEOR 1.5, ROUGE-L, CIDEr-D and, if available,
    SPICE are computed on the whole set. CIDEr's document frequencies come from the references
    given here, so score the full test split at once.

    Parts that cannot run are skipped, listed with their reason in ``EvalResult.skipped`` and
    announced by a single logged warning per call:

    * no Java (or ``use_java=False``): PTBTokenizer is replaced by :func:`simple_ptb_tokenize`,
      METEOR and SPICE are skipped; BLEU, ROUGE-L and CIDEr still run.
    * SPICE's Stanford CoreNLP jars not downloaded (see :func:`spice_jars_present`): SPICE is
      skipped (nothing is downloaded).
    * PTBTokenizer, METEOR or SPICE crashing or exceeding ``timeout_s``: that part is skipped
      (the tokenizer falls back to Python).

    Args:
        references: image id -> its reference captions (raw strings, at least one).
        hypotheses: image id -> the generated caption (raw string). Same ids as ``references``.
        use_spice: ``None`` runs SPICE when its jars are present, ``False`` never runs it,
            ``True`` requires it (raises if the jars or Java are missing).
        use_java: ``None`` uses Java when ``java`` is on ``PATH``, ``False`` never uses it,
            ``True`` requires it (raises if missing).
        timeout_s: seconds allowed to each Java step (tokenizer, METEOR).

    Returns:
        An :class:`EvalResult`; ``result.scores`` maps metric names to floats.

    Raises:
        ValueError: if the id sets differ (the message names missing ids) or a value is malformed.
        RuntimeError: if ``use_java=True`` or ``use_spice=True`` cannot be honoured.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _validate_ids(references, hypotheses)
    has_java = java_available()
    if use_java and not has_java:
        raise RuntimeError("use_java=True but no 'java' executable is on PATH")
    java = has_java if use_java is None else use_java
    skipped: dict[str, str] = {}
    # the user's choice first: it holds whatever the machine has
    no_java_reason = "use_java=False" if use_java is False else "Java not found on PATH"

    # 1. Tokenise all strings in one pass (one JVM start).
    ids = list(references)
    # NFC, as captioner's tokeniser reads captions: a decomposed "a" + U+0308 is the word "ä"
    flat = [unicodedata.normalize("NFC", c)
            for c in [c for k in ids for c in references[k]] + [hypotheses[k] for k in ids]]
    tokenizer = "python"
    if java:
        try:
            tokens = _ptb_tokenize(flat, timeout_s)
            tokenizer = "ptb"
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            skipped["PTBTokenizer"] = f"failed ({exc!r}); used the Python tokenizer"
    else:
        skipped["PTBTokenizer"] = f"{no_java_reason}; used the Python tokenizer"
    if tokenizer == "python":
        tokens = [simple_ptb_tokenize(c) for c in flat]
    gts: dict[ImageId, list[str]] = {}
    pos = 0
    for k in ids:
        n = len(references[k])
        gts[k] = tokens[pos : pos + n]
        pos += n
    res: dict[ImageId, list[str]] = {k: [tokens[pos + i]] for i, k in enumerate(ids)}

    # 2. Pure-Python scorers.
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})

    # 3. METEOR (Java subprocess).
    if not java:
        skipped["METEOR"] = no_java_reason
    else:
        try:
            scores["METEOR"] = _run_meteor(gts, res, timeout_s)
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            skipped["METEOR"] = f"failed: {exc}"

    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])

    # 4. SPICE (Java, needs the downloaded CoreNLP jars).
    if use_spice is False:
        skipped["SPICE"] = "use_spice=False"
    elif not java:
        if use_spice:
            raise RuntimeError(f"use_spice=True but Java is not used ({no_java_reason})")
        skipped["SPICE"] = no_java_reason
    elif not spice_jars_present():
        reason = (
            "Stanford CoreNLP 3.6.0 jars missing from pycocoevalcap/spice/lib (run "
            "`python -m pycocoevalcap.spice.get_stanford_models` with internet access)"
        )
        if use_spice:
            raise RuntimeError(f"use_spice=True but {reason}")
        skipped["SPICE"] = reason
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            skipped["SPICE"] = f"failed: {exc!r}"

    if skipped:
        logger.warning(
            "coco_caption_scores: skipped %s",
            "; ".join(f"{part} ({why})" for part, why in skipped.items()),
        )
    ordered = {k: scores[k] for k in COCO_METRIC_KEYS if k in scores}
    return EvalResult(scores=ordered, skipped=skipped, tokenizer=tokenizer)


def write_coco_results(hypotheses: Mapping[int, str], path: str | os.PathLike,
                       files: Mapping[int, str | os.PathLike] | None = None) -> None:
    """Write captions in the COCO results format, atomically.

    The file is ``[{"image_id": int, "caption": str}, ...]`` sorted by id, as expected by
    ``pycocotools.coco.COCO.loadRes`` and the COCO evaluation server (with ``files``, each row
    also names its image: ``"file_name"``, which ``loadRes`` carries along; ids of formats
    without their own, such as the Kaggle CSV layout, are running indices that only the file
    ties back to an image). It is written to a temporary file in the same directory and moved
    into place with ``os.replace``.

    Args:
        hypotheses: COCO image id (an int, or a string of digits) -> generated caption.
        path: destination ``.json`` file; parent directories are created.
        files: image id -> image file, for the ``"file_name"`` of each row.

    Raises:
        ValueError: if an id is not an integer, or ``files`` has none for it.
    """
    rows = []
    for k, caption in hypotheses.items():
        try:
            image_id = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"write_coco_results: image id {k!r} is not an integer") from None
        rows.append({"image_id": image_id, "caption": str(caption)})
        if files is not None:
            file = files.get(k, files.get(image_id))  # type: ignore[call-overload]
            if file is None:
                raise ValueError(f"write_coco_results: no file for image id {k!r}")
            rows[-1]["file_name"] = str(file)
    rows.sort(key=lambda r: r["image_id"])
    with atomic_write(path) as f:
        json.dump(rows, f, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Attention correctness
# ---------------------------------------------------------------------------------------------

Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1), half-open pixel coordinates


def _union_area(rects: Sequence[Rect]) -> float:
    """Area of the union of axis-aligned rectangles (coordinate compression on x)."""
    rects = [r for r in rects if r[2] > r[0] and r[3] > r[1]]
    if not rects:
        return 0.0
    xs = sorted({r[0] for r in rects} | {r[2] for r in rects})
    area = 0.0
    for xa, xb in zip(xs[:-1], xs[1:]):
        spans = sorted((r[1], r[3]) for r in rects if r[0] <= xa and r[2] >= xb)
        covered, end = 0.0, -np.inf
        for y0, y1 in spans:
            if y1 <= end:
                continue
            covered += y1 - max(y0, end)
            end = y1
        area += covered * (xb - xa)
    return area


def _clip(rect: Rect, window: Rect) -> Rect:
    return (max(rect[0], window[0]), max(rect[1], window[1]),
            min(rect[2], window[2]), min(rect[3], window[3]))


COVERAGE_SAMPLES = 16
"""Sample points per cell side where a Spatial Transformer moved the view (``16 x 16`` per cell)."""


def box_cell_coverage(
    boxes_xywh: Sequence[BoxXYWH], grid: tuple[int, int], image_size: tuple[int, int],
    theta: np.ndarray | None = None, edges: Edges | None = None,
) -> np.ndarray:
    """Fraction of each attention cell covered by the union of some boxes.

    Cell ``(r, c)`` of an ``H x W`` grid over an ``H_img x W_img`` image covers pixels
    ``[c * W_img / W, (c + 1) * W_img / W) x [r * H_img / H, (r + 1) * H_img / H)``; the
    coverage is then exact. With ``theta`` (a Spatial Transformer moved the view:
    :mod:`captioner.grid_frame`) the cell covers the parallelogram of the image it looked at
    (parts outside the image show zero padding and cover nothing); the coverage is then the
    fraction of ``COVERAGE_SAMPLES ** 2`` points spread evenly over the cell that land in a box.
    With ``edges`` (cells at their receptive fields' centres, :mod:`captioner.grid_frame`) the
    cells are those rectangles of the grid's frame instead of uniform tiles; a part of a cell
    outside the image covers nothing.

    Args:
        boxes_xywh: boxes ``(x, y, width, height)`` in pixels; overlapping boxes count once.
        grid: ``(H, W)``.
        image_size: ``(H_img, W_img)`` in pixels (note: height first, like ``grid``).
        theta: optional ``(2, 3)`` transform from the grid to the image.
        edges: optional cell boundaries ``(ys (H + 1,), xs (W + 1,))``, normalised.

    Returns:
        ``(H, W)`` array in ``[0, 1]``: covered area / cell area.
    """
    from captioner.grid_frame import grid_edges

    h, w = grid
    img_h, img_w = image_size
    if theta is not None:
        return _sampled_coverage(boxes_xywh, grid, image_size, theta, edges)
    if edges is None:  # the tiles' boundaries, exactly
        ys, xs = np.linspace(0.0, img_h, h + 1), np.linspace(0.0, img_w, w + 1)
    else:
        edges_y, edges_x = grid_edges(grid, edges)
        ys = (edges_y + 1.0) * img_h / 2.0  # (H + 1,) pixels
        xs = (edges_x + 1.0) * img_w / 2.0  # (W + 1,)
    rects = [(x, y, x + bw, y + bh) for x, y, bw, bh in boxes_xywh]
    cover = np.zeros((h, w))
    for r in range(h):
        for c in range(w):
            cell = (xs[c], ys[r], xs[c + 1], ys[r + 1])
            cell_area = (cell[2] - cell[0]) * (cell[3] - cell[1])
            cover[r, c] = _union_area([_clip(b, cell) for b in rects]) / cell_area
    return cover


def _sampled_coverage(boxes_xywh: Sequence[BoxXYWH], grid: tuple[int, int],
                      image_size: tuple[int, int], theta: np.ndarray,
                      edges: Edges | None = None) -> np.ndarray:
    """:func:`box_cell_coverage` through ``theta``, by points spread evenly over each cell."""
    from captioner.grid_frame import grid_edges, grid_to_image, to_pixels

    h, w = grid
    s = COVERAGE_SAMPLES
    edges_y, edges_x = grid_edges(grid, edges)
    within = (np.arange(s) + 0.5) / s  # (s,) fractions of a cell
    ys = (edges_y[:-1, None] + within * np.diff(edges_y)[:, None]).ravel()  # (H s,)
    xs = (edges_x[:-1, None] + within * np.diff(edges_x)[:, None]).ravel()  # (W s,)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (H s, W s)
    points = np.stack([xx.ravel(), yy.ravel()], -1)  # (H s W s, 2): s x s points per cell
    xy = to_pixels(grid_to_image(points, theta), image_size)  # (H s W s, 2) image pixels
    x, y = xy[:, 0], xy[:, 1]
    inside = np.zeros(len(xy), dtype=bool)
    img_h, img_w = image_size
    for bx, by, bw, bh in boxes_xywh:
        x0, y0 = max(float(bx), 0.0), max(float(by), 0.0)
        x1, y1 = min(float(bx + bw), float(img_w)), min(float(by + bh), float(img_h))
        inside |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    per_cell = inside.reshape(h, s, w, s)  # (H, s, W, s)
    return per_cell.mean(axis=(1, 3))  # (H, W)


def attention_correctness(
    alphas: Sequence[np.ndarray],
    words: Sequence[Sequence[str]],
    boxes: Sequence[Sequence[tuple[str, str, BoxXYWH]]],
    grid: tuple[int, int],
    image_sizes: Sequence[tuple[int, int]],
    object_words: Mapping[str, str] | None = None,
    thetas: Sequence[np.ndarray | None] | None = None,
    edges: Edges | None = None,
) -> dict[str, float]:
    """Attention mass inside the box of the object each generated word names.

    After Liu et al. (2017), "Attention Correctness in Neural Image Captioning": for every
    generated word that names an object present in the image - its shape word or its colour
    word - the score is the fraction of that step's attention mass that falls inside the
    object's box. Each step's map ``alphas[i][t]`` (``L = H * W`` weights, renormalised to sum
    to one) is read as an ``H x W`` grid; a cell contributes its weight times the fraction of
    its area covered by the box (area-weighted, not centre-in-box).

    Matching rules:

    * a word (after ``object_words`` mapping) matches every object of the image whose shape
      word or colour word equals it (case-insensitive);
    * when several objects match (e.g. "red" with two red objects), the target region is the
      **union** of their boxes: attending to any of them is correct;
    * words naming nothing in the image (including hallucinated objects) are not counted.

    ``chance`` is what uniform attention would score: the mean, over matched words, of the
    target region's area as a fraction of the image (of the cells' mean coverage when a Spatial
    Transformer moved the view, or with ``edges``: what the grid shows of the image is then no
    longer all of it).

    A model with a Spatial Transformer attends over a grid laid on the transformer's *output*;
    pass each image's grid-to-image transform in ``thetas`` (:meth:`ImageEncoder.grid_theta`,
    :mod:`captioner.grid_frame`) so that the boxes are met where each cell actually looked.

    Args:
        alphas: per image, the attention weights ``(T_i, L)`` with ``L = H * W``, row ``t``
            being the attention used to generate ``words[i][t]`` (extra trailing rows, e.g. for
            ``<end>``, are ignored).
        words: per image, the generated words ``(T_i,)``, without ``<start>``.
        boxes: per image, its objects as ``(shape_word, colour_word, (x, y, width, height))``
            with boxes in pixels.
        grid: attention grid ``(H, W)``.
        image_sizes: per image, ``(H_img, W_img)`` in pixels - height first, like ``grid``
            (a PIL ``Image.size`` is ``(W_img, H_img)``: reverse it).
        object_words: optional map from generated words to the shape / colour names used in
            ``boxes`` (synonyms, plurals: ``{"squares": "square", "crimson": "red"}``); words
            not in it are used as they are.
        thetas: optional, per image, its ``(2, 3)`` grid-to-image transform or ``None``.
        edges: optional cell boundaries ``(ys (H + 1,), xs (W + 1,))``, normalised, of every
            image's grid (:meth:`ImageEncoder.cell_edges
            <captioner.encoders.encoder.ImageEncoder.cell_edges>`: the cells at their
            receptive fields' centres; default: uniform tiles, as the paper reads them).

    Returns:
        ``{"attention_correctness": mean over matched words, "chance": mean target-area
        fraction, "num_words": number of matched words}``; the two means are ``nan`` when no
        word matched.

    Raises:
        ValueError: on inconsistent lengths or shapes.
    """
    n = len(alphas)
    if not (len(words) == len(boxes) == len(image_sizes) == n):
        raise ValueError(
            "attention_correctness: alphas, words, boxes and image_sizes differ in length "
            f"({n}, {len(words)}, {len(boxes)}, {len(image_sizes)})"
        )
    if thetas is not None and len(thetas) != n:
        raise ValueError(f"attention_correctness: {len(thetas)} thetas for {n} images")
    h, w = grid
    mapping = {k.lower(): v.lower() for k, v in (object_words or {}).items()}
    correct: list[float] = []
    chance: list[float] = []
    for i in range(n):
        alpha = np.asarray(alphas[i], dtype=np.float64)
        if alpha.ndim != 2 or alpha.shape[1] != h * w or alpha.shape[0] < len(words[i]):
            raise ValueError(
                f"attention_correctness: alphas[{i}] has shape {alpha.shape}, expected "
                f"(T >= {len(words[i])}, L = {h * w})"
            )
        by_name: dict[str, list[BoxXYWH]] = {}
        for shape_word, colour_word, box in boxes[i]:
            for name in {shape_word.lower(), colour_word.lower()}:
                by_name.setdefault(name, []).append(tuple(box))  # type: ignore[arg-type]
        img_h, img_w = image_sizes[i]
        cache: dict[str, tuple[np.ndarray, float]] = {}
        for t, word in enumerate(words[i]):
            key = mapping.get(word.lower(), word.lower())
            if key not in by_name:
                continue
            if key not in cache:
                target = by_name[key]
                theta = None if thetas is None else thetas[i]
                cover = box_cell_coverage(target, grid, (img_h, img_w), theta, edges)
                if theta is None and edges is None:
                    image_rect = (0.0, 0.0, float(img_w), float(img_h))
                    rects = [_clip((x, y, x + bw, y + bh), image_rect)
                             for x, y, bw, bh in target]
                    cache[key] = (cover, _union_area(rects) / (img_h * img_w))
                else:
                    cache[key] = (cover, float(cover.mean()))
            cover, area_fraction = cache[key]
            a = alpha[t].reshape(h, w)  # (H, W)
            total = a.sum()
            correct.append(float((a * cover).sum() / total) if total > 0 else 0.0)
            chance.append(area_fraction)
    return {
        "attention_correctness": float(np.mean(correct)) if correct else float("nan"),
        "chance": float(np.mean(chance)) if chance else float("nan"),
        "num_words": float(len(correct)),
    }
