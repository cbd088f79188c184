"""Training: objectives, the pure train step, data parallelism on a mesh, checkpoints.

- :mod:`~jdiff.train._objectives`: denoising score matching for every process and
  parameterization (eps, x0, v, score, flow matching), EDM preconditioning and
  weighting, min-SNR-gamma, time samplers, classifier-free-guidance label dropout,
  and :func:`make_loss_fn`. The seam for new objectives: :func:`noise_batch` draws
  each sample's ``(t, eps, x_t)`` from its own key, :func:`prediction_fn` evaluates
  the network at the process time, and a loss may take frozen parameters (a reference
  model, a teacher) as ``loss_fn(params, batch, key, frozen=...)``.
- :mod:`~jdiff.train._step`: :class:`TrainState`, :func:`make_optimizer` (clipping +
  AdamW + warmup/cosine), gradient accumulation, EMA, :func:`train_step`.
- :mod:`~jdiff.train._parallel`: one 1-D ``data`` mesh over all devices of all hosts,
  :func:`shard_batch`, :func:`replicate`, :func:`is_main_process`.
- :mod:`~jdiff.train._checkpoint`: orbax :class:`Checkpointer` with exact resume,
  corruption fallback, configuration-mismatch errors, :class:`SigtermFlag`.
- :mod:`~jdiff.train._loop`: :func:`train` / :func:`train_iter`; its callbacks
  (:mod:`~jdiff.train._callbacks`): :class:`MetricsLog`, :class:`Progress`,
  :class:`StopSignals`, :class:`StopAt`.
- :mod:`~jdiff.train._run`: a run's record: atomic ``config.json``, append-only
  ``history.jsonl``, the learning-rate plan from the history, resume rules, trimming
  ``metrics.jsonl`` on resume.

The model is any pure ``apply(params, x, t, cond, key=None) -> out`` with ``out.shape
== x.shape`` and a parameter pytree (e.g. from ``flax.nnx.split``).
"""

from jdiff.train._callbacks import Callback, MetricsLog, Progress, StopAt, StopSignals, as_callback, metrics_row
from jdiff.train._checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointWriteError,
    NoUsableCheckpointError,
    Restored,
    SigtermFlag,
    tree_checksum,
    tree_description,
)
from jdiff.train._config import EMAConfig, OptimizerConfig, TrainConfig
from jdiff.train._loop import TrainResult, log_metrics, train, train_iter
from jdiff.train._objectives import (
    PRECONDITIONINGS,
    TIME_SAMPLINGS,
    WEIGHTINGS,
    LossConfig,
    Noised,
    drop_labels,
    edm_coefficients,
    edm_objective,
    edm_precondition,
    flow_matching_objective,
    loss_weight,
    make_loss_fn,
    min_snr_weight,
    noise_batch,
    prediction_fn,
    sample_times,
    x0_jacobian,
)
from jdiff.train._parallel import (
    DATA_AXIS,
    data_sharding,
    initialize_distributed,
    is_main_process,
    make_mesh,
    process_batch_slice,
    replicate,
    replicated_sharding,
    shard_batch,
    sync_flag,
)
from jdiff.train._run import (
    CONFIG_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    RESUMABLE_KEYS,
    ResumeConfigError,
    RunRecordError,
    append_history,
    check_resume_config,
    flatten_config,
    history_entry,
    read_config,
    read_history,
    schedule_plan,
    trim_metrics,
    write_config,
    write_json_atomic,
)
from jdiff.train._step import (
    TrainState,
    ema_decay_at,
    ema_update,
    init_train_state,
    lr_schedule,
    make_optimizer,
    make_train_step,
    state_key,
    train_step,
)

__all__ = [
    "Callback",
    "MetricsLog",
    "Progress",
    "StopAt",
    "StopSignals",
    "as_callback",
    "metrics_row",
    "OptimizerConfig",
    "EMAConfig",
    "TrainConfig",
    "CheckpointCorruptError",
    "Checkpointer",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "NoUsableCheckpointError",
    "Restored",
    "SigtermFlag",
    "tree_checksum",
    "tree_description",
    "TrainResult",
    "log_metrics",
    "train",
    "train_iter",
    "PRECONDITIONINGS",
    "TIME_SAMPLINGS",
    "WEIGHTINGS",
    "LossConfig",
    "drop_labels",
    "edm_coefficients",
    "edm_objective",
    "edm_precondition",
    "flow_matching_objective",
    "loss_weight",
    "make_loss_fn",
    "min_snr_weight",
    "Noised",
    "noise_batch",
    "prediction_fn",
    "sample_times",
    "x0_jacobian",
    "DATA_AXIS",
    "data_sharding",
    "initialize_distributed",
    "is_main_process",
    "make_mesh",
    "process_batch_slice",
    "replicate",
    "replicated_sharding",
    "shard_batch",
    "sync_flag",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "METRICS_FILE",
    "RESUMABLE_KEYS",
    "ResumeConfigError",
    "RunRecordError",
    "append_history",
    "check_resume_config",
    "flatten_config",
    "history_entry",
    "read_config",
    "read_history",
    "schedule_plan",
    "trim_metrics",
    "write_config",
    "write_json_atomic",
    "TrainState",
    "ema_decay_at",
    "ema_update",
    "init_train_state",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "state_key",
    "train_step",
]
