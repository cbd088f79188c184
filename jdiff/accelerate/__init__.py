"""Faster sampling without retraining the model (see docs/accelerate.md).

Each method is a value. The carried ones (feature caching, forecasting, early exit) keep
their memory in the sampler's ``lax.scan`` state through :func:`accelerate` /
:func:`sample` (:mod:`jdiff.accelerate._carry`), reading the model's intermediate
features through :func:`jdiff.models.internals`. Model stitching (:func:`stitch`) is a
denoiser value, adaptive guidance a guidance wrapper or a solver that carries its
decision (:func:`adaptive_guidance`, :func:`adaptive_solver`), and stream batching its
own loop over staggered slots (:func:`stream`).
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
from jdiff.accelerate._exit import (
    EarlyExit,
    early_exit,
    exit_heads,
    exit_loss,
    exit_outputs,
    load_exit_heads,
    save_exit_heads,
)
from jdiff.accelerate._guidance import (
    AdaptiveGuidance,
    AdaptiveGuidanceSolver,
    adaptive_guidance,
    adaptive_solver,
    guidance_similarity,
    switch_step,
)
from jdiff.accelerate._stitch import StitchCalls, Stitched, stitch, stitch_calls, stitch_threshold
from jdiff.accelerate._stream import StreamInfo, StreamThroughput, stream, stream_throughput

__all__ = [
    "Method",
    "Accelerated",
    "accelerate",
    "sample",
    "model_leaves",
    "Stitched",
    "stitch",
    "stitch_threshold",
    "StitchCalls",
    "stitch_calls",
    "guidance_similarity",
    "switch_step",
    "AdaptiveGuidance",
    "adaptive_guidance",
    "AdaptiveGuidanceSolver",
    "adaptive_solver",
    "stream",
    "StreamInfo",
    "StreamThroughput",
    "stream_throughput",
    "EarlyExit",
    "early_exit",
    "exit_heads",
    "exit_outputs",
    "exit_loss",
    "save_exit_heads",
    "load_exit_heads",
    "DeepCache",
    "TaylorSeer",
    "ConfidenceGate",
    "calibrate",
    "nonuniform_schedule",
    "taylor_weights",
]
