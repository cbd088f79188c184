"""``python -m jdiff``: the ``jdiff`` command line (see :mod:`jdiff.cli`)."""

import sys

from jdiff.cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
