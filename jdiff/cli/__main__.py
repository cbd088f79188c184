"""``python -m jdiff.cli``: the ``jdiff`` command line."""

import sys

from jdiff.cli import console_main

sys.exit(console_main())
