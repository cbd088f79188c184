"""Shared pieces of the commands: the user-error type, the compilation cache, building
data, process and model from a :class:`~jdiff.cli.RunConfig`, the sampling denoiser."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from jdiff.cli._config import ConfigError, RunConfig, validate_config

__all__ = ["CLIError", "enable_compilation_cache", "Run", "build_run", "build_model", "make_solver", "denoiser"]


class CLIError(Exception):
    """An error in the user's request: printed as one line, exit status 2
    (``multiline=True``: a first line, then one indented line per item)."""

    def __init__(self, message: str, *, multiline: bool = False):
        super().__init__(message)
        self.multiline = multiline


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``$JDIFF_CACHE_DIR`` (default
    ``~/.cache/jdiff/jax``; ``JDIFF_CACHE_DIR=off`` disables it), caching every program
    (no minimum compile time or size), so a second run of a command does not compile
    again. Returns the directory (None when disabled)."""
    import jax

    path = os.environ.get("JDIFF_CACHE_DIR")
    if path is not None and path.strip().lower() in ("", "off", "0", "none"):
        return None
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "jdiff", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return jax.config.jax_compilation_cache_dir


@dataclasses.dataclass
class Run:
    """Everything built from a configuration (see :func:`build_run`)."""

    cfg: RunConfig
    process: Any
    model: Any
    apply: Any
    params: Any
    data_shape: tuple
    num_classes: int
    x: Any = None
    labels: Any = None


def build_model(cfg: RunConfig, *, abstract: bool = False):
    """The NNX model of ``cfg.model`` (its data-derived fields filled), or with
    ``abstract`` its shapes and dtypes only."""
    from flax import nnx

    from jdiff import models as M

    m = cfg.model
    cls = {"unet": M.UNet, "mlp": M.MLPResNet, "dit": M.DiT}[m.kind]
    try:
        if abstract:
            return nnx.eval_shape(lambda: cls(m.network, rngs=nnx.Rngs(m.init_seed)))
        return cls(m.network, rngs=nnx.Rngs(m.init_seed))
    except (ValueError, TypeError) as e:
        raise CLIError(f"model.kind={m.kind}: {e}") from e


def build_run(
    cfg: RunConfig, *, with_data: bool = True, data_shape=None, num_classes: int | None = None, abstract: bool = False
) -> Run:
    """Data (optional), process and model of ``cfg`` (``abstract``: parameter shapes
    only, e.g. as the target of a checkpoint restore)."""
    from jdiff import models as M

    x = labels = None
    if with_data:
        try:
            x, labels, num_classes = cfg.data.load()
        except (ValueError, OSError) as e:
            raise CLIError(f"data.source={cfg.data.source}: {e}") from e
        data_shape = tuple(x.shape[1:])
    elif data_shape is None or num_classes is None:
        raise ValueError("give with_data=True, or data_shape and num_classes")
    try:
        cfg = validate_config(cfg, num_classes=int(num_classes))
    except ConfigError as e:
        raise CLIError(str(e)) from e
    model = build_model(cfg, abstract=abstract)
    apply, params = M.functional(model)
    shape = tuple(int(s) for s in data_shape)
    return Run(cfg, cfg.objective.process, model, apply, params, shape, int(num_classes), x, labels)


def make_solver(cfg_sample):
    try:
        return cfg_sample.make_solver()
    except ValueError as e:
        raise CLIError(f"sample.solver={cfg_sample.solver}: {e}") from e


def denoiser_apply(run: Run):
    """``(apply_fn, prediction, time_input)`` of the trained network as a denoiser (build
    once per command: the function is part of the compiled program's identity)."""
    from jdiff import train as T

    o = run.cfg.objective
    if o.precondition == "edm":
        return T.edm_precondition(run.apply, run.process, o.sigma_data), "x0", "t"
    return run.apply, o.prediction, o.time_input


def denoiser(parts, run: Run, params, guidance: float):
    import jdiff

    apply_fn, prediction, time_input = parts
    den = jdiff.Denoiser(
        apply_fn=apply_fn, params=params, process=run.process, prediction=prediction, time_input=time_input
    )
    if run.num_classes and guidance != 1.0:
        den = jdiff.wrappers.guidance(den, guidance, run.num_classes)
    return den


def check_solver_nfe(run: Run, solver, nfe: int, grid_kind: str) -> None:
    """Fail early (and clearly) on a solver / NFE combination that cannot work."""
    import jdiff

    try:
        jdiff.time_grid(run.process, nfe=nfe, solver=solver, kind=grid_kind)
        n = solver.num_steps(nfe)
    except ValueError as e:
        raise CLIError(f"{solver.name} at nfe={nfe}: {e}") from e
    if n < solver.min_steps:
        raise CLIError(
            f"{solver.name} needs at least {solver.min_steps} steps; nfe={nfe} gives {n}: raise --nfe or lower --order"
        )


def to_host(tree):
    """A replicated (possibly multi-host) pytree as local numpy arrays."""
    import jax
    import numpy as np

    def get(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    return jax.tree.map(get, tree)


def writable_path(path: str, what: str, *, directory: bool) -> None:
    """Raise :class:`CLIError` unless ``path`` can be created or written as a directory
    (``directory``) or a file, without creating anything."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p):
        if directory and not os.path.isdir(p):
            raise CLIError(f"{what} {path} exists and is not a directory")
        if not directory and os.path.isdir(p):
            raise CLIError(f"{what} {path} is a directory")
        if not os.access(p if directory else os.path.dirname(p), os.W_OK):
            raise CLIError(f"{what} {path} is not writable")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CLIError(f"{what} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{what} {path} cannot be created: {parent} is not writable")


def positive(v: int | None, name: str, minimum: int = 1) -> None:
    if v is not None and v < minimum:
        raise CLIError(f"{name} must be >= {minimum}, got {v}")


def sequence(x) -> Sequence:
    return list(x or [])
