from jdiff.likelihood._ode import *  # noqa: F403  (temporary: the split follows)
from jdiff.likelihood._ode import __all__, _node_weights  # noqa: F401
