"""Score translation files with captioner's sacreBLEU (``captioner.translate.sacrebleu_score``).

The same BLEU as ``val/bleu``, ``captioner test`` and ``captioner translate --reference``: corpus
sacreBLEU, ``13a`` tokens, lowercased by default, a ``<unk>`` in a hypothesis scored as one token.
Each hypothesis file holds one detokenised translation per line of the reference file.

    python scripts/score_translations.py --reference ../shared/data/multi30k/test_2016_flickr.en \
        runs/multi30k_eval/ep6_beam5.txt --json scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.atomic import atomic_write
from captioner.data.parallel_text import ParallelDataError, read_lines
from captioner.translate import sacrebleu_score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hypotheses", nargs="+", type=Path, help="translation files")
    p.add_argument("--reference", required=True, type=Path, help="reference file")
    p.add_argument("--cased", action="store_true", help="case-sensitive BLEU")
    p.add_argument("--json", type=Path, default=None, help="write the scores here")
    args = p.parse_args(argv)

    try:
        references = read_lines(args.reference)
        hypotheses_of = {path: read_lines(path) for path in args.hypotheses}
    except ParallelDataError as e:  # missing, or not UTF-8: one line naming file and line
        print(e, file=sys.stderr)
        return 2
    scores = {}
    for path in args.hypotheses:
        hypotheses = hypotheses_of[path]
        if len(hypotheses) != len(references):
            print(f"{path}: {len(hypotheses)} lines for {len(references)} references",
                  file=sys.stderr)
            return 2
        bleu = sacrebleu_score(hypotheses, references, lowercase=not args.cased)
        unk = sum(h.count("<unk>") for h in hypotheses)
        scores[str(path)] = {"bleu": bleu.score, "detail": bleu.detail,
                             "signature": bleu.signature, "unk_in_hypotheses": unk}
        print(f"{path}\t{bleu.detail}\t<unk>: {unk}")
    if args.json:
        with atomic_write(args.json) as f:
            f.write(json.dumps({"reference": str(args.reference), "scores": scores},
                               indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
