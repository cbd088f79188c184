"""Faster sampling without retraining: accelerations of a trained model's network calls.

Each method is a value. The carried ones (feature caching, forecasting, early exit) keep
their memory in the sampler's ``lax.scan`` state through :func:`accelerate` /
:func:`sample` (:mod:`jdiff.accelerate._carry`), reading the model's intermediate
features through :func:`jdiff.models.internals`.
"""

from jdiff.accelerate._carry import Accelerated, Method, accelerate, model_leaves, sample
from jdiff.accelerate._exit import (
    EarlyExit,
    early_exit,
    exit_heads,
    exit_loss,
    exit_outputs,
    load_exit_heads,
    save_exit_heads,
)

__all__ = [
    "Method",
    "Accelerated",
    "accelerate",
    "sample",
    "model_leaves",
    "EarlyExit",
    "early_exit",
    "exit_heads",
    "exit_outputs",
    "exit_loss",
    "save_exit_heads",
    "load_exit_heads",
]
