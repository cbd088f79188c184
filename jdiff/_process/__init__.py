from jdiff._process._base import *  # noqa: F403  (temporary: the split follows)
from jdiff._process._base import _as_float, _fdtype, _register, same_process  # noqa: F401
