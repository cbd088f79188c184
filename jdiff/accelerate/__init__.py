"""Faster sampling without retraining: accelerations of a trained model's network calls.

Each method is a value. The carried ones (feature caching, forecasting, early exit) keep
their memory in the sampler's ``lax.scan`` state through :func:`accelerate` /
:func:`sample` (:mod:`jdiff.accelerate._carry`), reading the model's intermediate
features through :func:`jdiff.models.internals`.
"""

from jdiff.accelerate._cache import (
    ConfidenceGate,
    DeepCache,
    TaylorSeer,
    calibrate,
    nonuniform_schedule,
    taylor_weights,
)
from jdiff.accelerate._carry import Accelerated, Method, accelerate, model_leaves, sample

__all__ = [
    "Method",
    "Accelerated",
    "accelerate",
    "sample",
    "model_leaves",
    "DeepCache",
    "TaylorSeer",
    "ConfidenceGate",
    "calibrate",
    "nonuniform_schedule",
    "taylor_weights",
]
