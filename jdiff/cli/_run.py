"""The run directory: moved to :mod:`jdiff.runs._dir` (``jdiff.runs.rundir``); this
module keeps the old import path for the command modules."""

from jdiff.runs._dir import *  # noqa: F403
from jdiff.runs._dir import __all__ as __all__
from jdiff.runs._dir import report_line as report_line
