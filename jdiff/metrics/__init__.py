from jdiff.metrics._stats import *  # noqa: F403  (temporary: the split follows)
from jdiff.metrics._stats import __all__  # noqa: F401
