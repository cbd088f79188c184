"""Faster sampling without retraining (issue 25): model stitching, adaptive guidance and
stream batching; see docs/accelerate.md."""

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
]
