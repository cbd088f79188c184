"""``python -m jdiff.cli``: the ``jdiff`` command line."""

import sys

from jdiff.cli import main

sys.exit(main())
