"""captioner.messages.one_line: a library's message on one line, file names intact."""

from captioner.messages import one_line


def test_line_breaks_become_one_space_and_other_whitespace_stays():
    text = "captions.txt line 92 (x  y.jpg):\n  image file not found:\r\n\t/data/x  y.jpg\u2028end"
    assert one_line(text) == ("captions.txt line 92 (x  y.jpg): image file not found: "
                              "/data/x  y.jpg end")  # the two spaces of the name are kept


def test_no_cut_without_a_limit_and_a_marked_cut_with_one():
    long = "/data/" + "a" * 500 + "/captions.txt: line 3"
    assert one_line(ValueError(long)) == long  # the file and line at the end survive
    assert one_line(long, 20) == "/data/aaaaaaaaaaaaaa ..."
    assert one_line("short", 20) == "short"


def test_first_line_joins_a_header_line_with_the_reason_it_introduces():
    """jsonargparse's first line is often only ``Parser key "decoder":``; the reason follows."""
    from captioner.messages import first_line

    error = ValueError('Parser key "decoder":\n  Parameter \'query_dim\' has no type.\n  more')
    assert first_line(error) == ("ValueError: Parser key \"decoder\": Parameter 'query_dim' has "
                                 "no type.")
    assert first_line(ValueError("one line: and more\nnext")) == "ValueError: one line: and more"
    assert first_line(ValueError("\n\n")) == "ValueError"
    # another library's header line is not joined with the traceback under it
    unpickler = RuntimeError('Weights only load failed:\nTraceback (most recent call last):\n'
                             '  File "x.py", line 1')
    assert first_line(unpickler) == "RuntimeError: Weights only load failed:"
