"""``python -m captioner ...``: the ``captioner`` command."""

import sys

from captioner.cli import main

sys.exit(main())
