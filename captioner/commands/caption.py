r"""``captioner caption --ckpt M.ckpt [--beam-size K] [--max-length N] [--batch-size B] [--json]
PATH...``: caption image files and folders (recursively), ``path<TAB>caption`` per line or a
JSON array. In the lines, a path's backslash, tab, newline and carriage return are written
``\\``, ``\t``, ``\n``, ``\r`` (:func:`tsv_field`): every line is one image, and splits at
its only tab into the path and the caption."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from captioner.cli import register_tool
from captioner.commands.common import (EXIT_INPUT_ERROR, EXIT_OK, load_captioner, make_tool,
                                       positive_int, silence_stdout, tool_parser)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = tool_parser("caption", "Caption image files and folders (searched recursively).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (16)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of {image, caption, words, tokens, score}")
    return p.parse_args(argv)


#: what :func:`tsv_field` writes for each character that would break a line apart
_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(text: str) -> str:
    r"""``text`` with backslash, tab, newline and carriage return escaped (``\\``, ``\t``,
    ``\n``, ``\r``, as PostgreSQL's text format writes them)."""
    return text.translate(_TSV_ESCAPES)


def _run(args: argparse.Namespace) -> int:
    captioner = load_captioner(args)
    encoding = sys.stdout.encoding or "utf-8"
    captioned = failed = 0
    if args.json:
        print("[", end="")
    # each batch is written as it is done: an interrupted run keeps what it captioned, and the
    # JSON array is closed whatever ends the run, so that it stays valid
    try:
        for captions, errors in captioner.iter_caption_paths(
                args.paths, beam_size=args.beam_size, max_length=args.max_length,
                batch_size=args.batch_size):
            failed += len(errors)  # (before they are printed: stderr may be the closed pipe)
            for path, reason in errors:  # one line each, escaped as the captions' paths are
                print(f"captioner caption: {tsv_field(str(path))}: {tsv_field(reason)}",
                      file=sys.stderr)
            for c in captions:
                if args.json:
                    row = {"image": str(c.path), "caption": c.text, "words": c.words,
                           "tokens": c.tokens, "score": c.score}
                    separator = ",\n " if captioned else "\n "
                    print(separator + _json_row(row, encoding), end="")
                else:
                    print(f"{tsv_field(str(c.path))}\t{c.text}")
                captioned += 1
            sys.stdout.flush()
    except BrokenPipeError:  # `| head` (`2>&1 | head`: stderr too): a failure still says 1
        silence_stdout(stderr=True)
        return EXIT_INPUT_ERROR if failed else EXIT_OK
    finally:
        if args.json:
            with contextlib.suppress(OSError):  # (a closed pipe: nothing to close)
                print("\n]" if captioned else "]")
        with contextlib.suppress(OSError):
            sys.stdout.flush()
    if failed:
        print(f"captioner caption: {failed} path(s) not captioned, {captioned} captioned",
              file=sys.stderr)
        return EXIT_INPUT_ERROR
    return EXIT_OK


def _json_row(row: dict[str, object], encoding: str) -> str:
    """``row`` as JSON on one line: its non-ASCII characters as they are where ``encoding``
    (stdout's) can write all of them, else the whole row's escaped (``\\u00f1``; a path that
    is not UTF-8, a console without some of the characters), so the JSON stays valid."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(row)
    return text


main = make_tool("caption", _parse, _run)
register_tool("caption", main)
