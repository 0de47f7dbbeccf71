"""scripts/attention_table.py: the table of attention variants (its runs are the experiment,
docs/attention_table.md); here the writing of undefined scores."""

from __future__ import annotations

import argparse
import math

from tests.conftest import load_script


def test_undefined_scores_read_n_a_in_the_table() -> None:
    """Attention correctness is undefined (NaN; ``null`` in the JSON, read back with
    ``--merge``) for captions without a box word: the table says ``n/a`` for both."""
    module = load_script("attention_table")
    args = argparse.Namespace(num_train=10, num_val=3, epochs=1, seed=0)
    rows = [("a", "soft", {"bleu4": 0.25, "attention_correctness": math.nan,
                           "attention_chance": 0.1, "seconds": 3.2}),
            ("b", "hard", {"bleu4": 0.5, "attention_correctness": None,
                           "attention_chance": 0.125, "seconds": 7.0})]
    table = module.markdown(rows, args).splitlines()
    assert table[-2] == "| a | soft | 0.2500 | n/a | 0.100 | 3 |"
    assert table[-1] == "| b | hard | 0.5000 | n/a | 0.125 | 7 |"
