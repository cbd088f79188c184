"""Deprecated alias of :mod:`jdiff.inverse_problems` (the inverse-problems package was
renamed so that it is not mistaken for :mod:`jdiff.inversion`, data to noise). Importing
it warns; every name is the one of :mod:`jdiff.inverse_problems`."""

import warnings

from jdiff.inverse_problems import *  # noqa: F403
from jdiff.inverse_problems import __all__  # noqa: F401

warnings.warn(
    "jdiff.inverse is deprecated: use jdiff.inverse_problems (the same names)", DeprecationWarning, stacklevel=2
)
