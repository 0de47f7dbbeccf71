"""``captioner translate --ckpt M.ckpt [--beam-size K] [--alignment FIG.png] [--reference REF]
[SENTENCE...]``: translate sentences (arguments, or stdin lines) with a translation checkpoint,
one translation per line; optionally the source x target alignment figure (Bahdanau et al. 2015,
Figure 3) and sacreBLEU against reference lines (on stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_INPUT_ERROR, EXIT_OK, ToolError,
                                       apply_search_options, figure_errors, make_tool,
                                       positive_int, tool_parser)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = tool_parser("translate", "Translate sentences with a translation checkpoint "
                "(arguments, or one sentence per stdin line); one translation per line.")
    p.add_argument("sentences", nargs="*", metavar="SENTENCE",
                   help="sentences to translate (default: read stdin, one per line)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per batch (64)")
    p.add_argument("--alignment", default=None, metavar="FIG",
                   help="draw the attention of each translation, source x target words "
                        "(Bahdanau et al. 2015, Fig. 3; source words outside the vocabulary "
                        "marked '(<unk>)'); several sentences: FIG_<input line>.png (FIG_1.png, "
                        "FIG_2.png, ...; none for a blank line)")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="reference translations, one per input line: print sacreBLEU on stderr")
    return p.parse_args(argv)


def _alignment_path(out: str, line: int, sentences: int) -> Path:
    """``FIG`` itself when one sentence is translated (blank lines aside), else
    ``FIG_<line>`` (the 1-based input line, so that a blank line, which has no figure, does
    not shift the names of those after it)."""
    path = Path(out)
    return path if sentences == 1 else path.with_name(f"{path.stem}_{line}{path.suffix}")


def _names_a_file(text: str) -> bool:
    """Whether ``text`` is the path of a file (a long sentence without spaces, as Chinese or
    Thai is written, is no path: the system refuses it as too long, it is not an error)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _stdin_lines() -> list[str]:
    """The lines of standard input, decoded as UTF-8 whatever the locale (a stray byte is an
    error naming its line, not a source word made of a surrogate)."""
    from captioner.data.parallel_text import decode_lines

    buffer = getattr(sys.stdin, "buffer", None)
    raw = buffer.read() if buffer is not None else sys.stdin.read().encode("utf-8",
                                                                           "surrogateescape")
    return decode_lines(raw, "stdin")


def _run(args: argparse.Namespace) -> int:
    from captioner.data.parallel_text import ParallelDataError, read_lines
    from captioner.inference import CheckpointError
    from captioner.translate import Translator, sacrebleu_score

    try:
        translator = Translator.from_checkpoint(args.ckpt, device=args.device,
                                                precision=args.precision)
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    apply_search_options(args, translator, "translation")
    for n, sentence in enumerate(args.sentences, 1):
        try:
            sentence.encode("utf-8")
        except UnicodeEncodeError:  # bytes the locale could not decode, kept as surrogates
            raise ToolError(f"sentence argument {n} is not UTF-8 text") from None
        if " " not in sentence.strip() and _names_a_file(sentence):  # meant: its lines
            print(f"captioner translate: WARNING: sentence argument {n} names a file "
                  f"({sentence}), translated as a sentence; to translate its lines give it on "
                  "stdin (< FILE)", file=sys.stderr)
    try:
        sentences = args.sentences or _stdin_lines()
        references = read_lines(args.reference) if args.reference else None
    except ParallelDataError as e:  # stdin or the reference file cannot be read: input data
        raise ToolError(str(e), EXIT_INPUT_ERROR) from None
    if references is not None:
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

        for line, t in enumerate(translations, 1):
            if t is None:  # a blank input line
                continue
            path = _alignment_path(args.alignment, line, len(todo))
            with figure_errors(str(path)):
                figure = plot_alignment(t.source_labels, t.target_tokens, t.alphas, path,
                                        title=t.text or "(empty translation)")
            print(f"alignment: {figure}", file=sys.stderr)
    if references is not None:
        bleu = sacrebleu_score(texts, references, lowercase=translator.lowercase)
        print(f"{bleu.detail}\nsignature: {bleu.signature}", file=sys.stderr)
    return EXIT_OK


main = make_tool("translate", _parse, _run)
register_tool("translate", main)
