"""Error messages on one line, file names and all.

The commands answer a data or configuration error with one line on stderr that names the file,
line or field. An underlying library's message may span lines (a YAML mark, a list of
mismatched weights); :func:`one_line` joins them without touching the rest, so that a file
name with two spaces or a tab is still the file's name, and shortens only where a limit is
asked for (long lists such as a state dict's mismatched keys); :func:`first_line` keeps a
reason's first line only (with jsonargparse's key lines, the key and the reason). No Lightning
or torch here.
"""

from __future__ import annotations

import re

_LINE_BREAKS = re.compile(r"[ \t]*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+[ \t]*")


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """``error``'s text with each run of line breaks (and the blanks around it) made one space.

    Args:
        error: an exception (its ``str``) or a text.
        limit: at most this many characters, ``" ..."`` marking a cut; ``None``: the whole text.

    Returns:
        The text on one line; other whitespace kept as it is.
    """
    text = _LINE_BREAKS.sub(" ", str(error).strip())
    if limit is not None and len(text) > limit:
        return text[:limit].rstrip() + " ..."
    return text


#: a jsonargparse line that ends naming the key or class whose reason follows (``Parser key
#: "x":``, ``Problem with given class_path 'pkg.Class':``)
_KEY_LINE = re.compile(r"(?:Parser key \"[^\"]+\"|Problem with given class_path '[^']+'):$")
#: jsonargparse's words between a key and the reason it refused its value
_JSONARGPARSE_WORDING = re.compile(r"Type \S.*? expects a function or a callable class: "
                                   r"|Does not validate against any of the Union subtypes ")
#: the whole section jsonargparse quotes after the value it names
_GOT_NAMESPACE = re.compile(r"\. Got value: Namespace\(.*$")


def first_line(error: BaseException, limit: int = 200) -> str:
    """``"Type: "`` and the first line of ``error``'s text (at most ``limit`` characters): for a
    library's reason whose later lines are a traceback or a long explanation (torch's
    unpickler, jsonargparse); the type alone where the text is empty. jsonargparse's lines
    that only name a key (``Parser key "decoder":``) are joined with the line after them, and
    its wording is cut to the keys and the reason: ``Parser key "decoder": Parser key "gate":
    Expected a typing.Literal['scalar', 'vector', 'none']. Got value: sigmoid``."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    end = 0
    while end + 1 < len(lines) and _KEY_LINE.search(lines[end]):
        end += 1
    said = " ".join(lines[:end + 1])
    said = _JSONARGPARSE_WORDING.sub("", said)
    said = _GOT_NAMESPACE.sub("", said)
    return f"{type(error).__name__}: {said[:limit]}"
