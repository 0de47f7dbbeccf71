"""``captioner translate --ckpt M.ckpt [--beam-size K] [--alignment FIG.png] [--reference REF]
[SENTENCE...]``: translate sentences (arguments, or stdin lines) with a translation checkpoint,
one translation per line; optionally the source x target alignment figure (Bahdanau et al. 2015,
Figure 3) and sacreBLEU against reference lines (on stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_OK, ToolError, figure_errors, make_tool, positive_int,
                                       tool_parser)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = tool_parser("translate", "Translate sentences with a translation checkpoint "
                "(arguments, or one sentence per stdin line); one translation per line.")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE",
                   help="sentences to translate (default: read stdin, one per line)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per batch (64)")
    p.add_argument("--alignment", default=None, metavar="FIG",
                   help="draw the attention of each translation, source x target words "
                        "(Bahdanau et al. 2015, Fig. 3); several sentences: FIG_1.png, FIG_2.png")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="reference translations, one per input line: print sacreBLEU on stderr")
    return p.parse_args(argv)


def _alignment_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(1, n + 1)]


def _run(args: argparse.Namespace) -> int:
    from captioner.inference import CheckpointError
    from captioner.translate import Translator, sacrebleu_score

    try:
        translator = Translator.from_checkpoint(args.ckpt, device=args.device,
                                                precision=args.precision)
        if args.beam_stop:
            translator.search["beam_stop"] = args.beam_stop
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    sentences = args.sentences or [line.rstrip("\r\n") for line in sys.stdin]
    if sentences and not args.sentences:
        sentences[0] = sentences[0].removeprefix("\ufeff")  # a byte-order mark is no word
    references = None
    if args.reference:
        try:
            references = Path(args.reference).read_text(encoding="utf-8-sig").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ToolError(f"{args.reference}: cannot read references ({e})") from None
        if references and references[-1] == "":
            references.pop()
        if len(references) != len(sentences):
            raise ToolError(f"{args.reference}: {len(references)} reference lines for "
                            f"{len(sentences)} sentences")
    todo = [s for s in sentences if s.strip()]  # a blank line is answered by a blank line
    done = iter(translator.translate(todo, beam_size=args.beam_size, max_length=args.max_length,
                                     batch_size=args.batch_size))
    translations = [next(done) if s.strip() else None for s in sentences]
    texts = [t.text if t is not None else "" for t in translations]
    for text in texts:
        print(text)
    sys.stdout.flush()
    if args.alignment:
        from captioner.visualize import plot_alignment

        shown = [t for t in translations if t is not None]
        for t, path in zip(shown, _alignment_paths(args.alignment, len(shown))):
            with figure_errors(str(path)):
                figure = plot_alignment(t.source_tokens, t.target_tokens, t.alphas, path,
                                        title=t.text or "(empty translation)")
            print(f"alignment: {figure}", file=sys.stderr)
    if references is not None:
        bleu = sacrebleu_score(texts, references, lowercase=translator.lowercase)
        print(f"{bleu.detail}\nsignature: {bleu.signature}", file=sys.stderr)
    return EXIT_OK


main = make_tool("translate", _parse, _run)
register_tool("translate", main)
