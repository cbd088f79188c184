"""The run configuration: moved to :mod:`jdiff.runs` (:mod:`jdiff.runs._config`); this
module keeps the old import path for the command modules."""

from jdiff.runs._config import *  # noqa: F403
from jdiff.runs._config import __all__ as __all__
