"""Grid files: grids saved in a small JSON file tied to a model, a process, a solver and an NFE."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import solvers as S
from jdiff.runs import flatten_params

FORMAT = "jdiff-grids"


# ---------------------------------------------------------------------- grid files
def model_fingerprint(denoiser) -> str:
    """A short hash of what the denoiser computes: its parameters (a
    :class:`~jdiff.Denoiser`'s ``params``, a testbed's mixture) and its process.

    Raises:
      TypeError: for an object whose parameters cannot be found (pass ``model=`` by hand).
    """
    h = hashlib.sha256()
    inner = denoiser
    while hasattr(inner, "inner") and not hasattr(inner, "params"):
        h.update(type(inner).__name__.encode())  # a wrapper (guidance): its kind and scale count
        scale = getattr(inner, "scale", None)
        if scale is not None and np.ndim(scale) == 0 and not isinstance(scale, jax.core.Tracer):
            h.update(repr(float(scale)).encode())
        inner = inner.inner
    mix = getattr(inner, "mixture", None)
    if mix is not None:
        for a in (mix.weights, mix.means, mix.stds):
            h.update(np.ascontiguousarray(np.asarray(a, np.float64)).tobytes())
    elif getattr(inner, "params", None) is not None:
        for k, v in sorted(flatten_params(inner.params).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    else:
        raise TypeError(f"cannot fingerprint a {type(denoiser).__name__}: pass model='<an id>' explicitly")
    h.update(repr(denoiser.process).encode())
    return h.hexdigest()[:16]


def save_grids(path: str, entries: Sequence[dict], *, model: str, process) -> None:
    """Write grids to a JSON file tied to ``model`` (an id, e.g. :func:`model_fingerprint`)
    and ``process``. Each entry holds ``solver`` (a registry name), ``nfe``, ``grid`` and
    optionally ``method``, ``net_grid`` (LD3's decoupled network times, same length as
    ``grid``) and measured errors. Entries of an existing file for the same
    model and process are kept unless replaced (same solver and NFE).

    Raises:
      ValueError: an existing file for another model or process, a grid that is not
        strictly decreasing or not finite.
    """
    old = check_grid_file(path, model=model, process=process)
    new = []
    for e in entries:
        g = np.asarray(e["grid"], np.float64)
        if g.ndim != 1 or g.size < 2 or not np.all(np.isfinite(g)) or not np.all(np.diff(g) < 0):
            raise ValueError(f"grid for {e.get('solver')} nfe {e.get('nfe')} is not strictly decreasing: {g}")
        row = dict(e, solver=str(e["solver"]), nfe=int(e["nfe"]), grid=[float(v) for v in g])
        if e.get("net_grid") is not None:
            ng = np.asarray(e["net_grid"], np.float64)
            if ng.shape != g.shape or not np.all(np.isfinite(ng)):
                raise ValueError(
                    f"net_grid for {e.get('solver')} nfe {e.get('nfe')} must be finite and of the grid's shape "
                    f"{g.shape}, got {ng.tolist()}"
                )
            row["net_grid"] = [float(v) for v in ng]
        new.append(row)
    keys = {(e["solver"], e["nfe"]) for e in new}
    merged = [e for e in old if (e["solver"], e["nfe"]) not in keys] + new
    out = {"format": FORMAT, "version": 1, "model": model, "process": repr(process), "grids": merged}
    tmp = path + ".tmp"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def check_grid_file(path: str, *, model: str, process) -> list:
    """Check, before any work, that grids for ``model`` and ``process`` can be saved to
    ``path``: a new file whose folder can be made, or an existing grid file for the same
    model and process. Returns the grids it already holds (``[]`` for a new file).

    Raises:
      ValueError: ``path`` is a folder, an existing file that is not a jdiff grid file
        (not JSON, another format) or holds grids for another model or process.
    """
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a grid file")
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"cannot create the grid file {path}: {parent} is not a writable directory")
        return []
    data = read_grids(path)
    if data["model"] != model or data["process"] != repr(process):
        raise ValueError(
            f"{path} holds grids for model {data['model']} / {data['process']}, not {model} / {process!r}: "
            "choose another file"
        )
    return data["grids"]


def read_grids(path: str) -> dict:
    """The raw content of a grid file (checked for its format)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no grid file at {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read grid file {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("grids"), list):
        raise ValueError(f"{path} is not a jdiff grid file")
    return data


def load_grid(
    path: str, *, denoiser=None, model: str | None = None, process=None, solver, nfe: int, with_net: bool = False
):
    """The grid stored in ``path`` for ``solver`` at ``nfe``, checked against the model.

    Args:
      path: a file written by :func:`save_grids` / :func:`tune`.
      denoiser: the model it will be used with (its :func:`model_fingerprint` and
        process are checked); or give ``model`` and ``process``.
      solver: a :class:`~jdiff.solvers.Solver` or registry name.
      nfe: the number of model calls.
      with_net: also return the stored network times (None when the entry has none).

    Returns:
      A float32 ``jnp`` array, usable as ``jdiff.sample(solver, denoiser, x_T, grid)``;
      with ``with_net``, ``(grid, net_grid)``: a ``net_grid`` is used through
      ``jdiff.wrappers.network_time(denoiser, grid, net_grid)``.

    Raises:
      ValueError: the file was made for another model or process, or holds no grid for
        this solver and NFE (the message lists those it holds).
    """
    data = read_grids(path)
    if denoiser is not None:
        model = model_fingerprint(denoiser) if model is None else model
        process = denoiser.process if process is None else process
    if model is None or process is None:
        raise ValueError("give the denoiser (or model and process) the grid is for")
    if data["model"] != model:
        raise ValueError(f"{path} was made for model {data['model']}, not {model}")
    if data["process"] != repr(process):
        raise ValueError(f"{path} was made for process {data['process']}, not {process!r}")
    name = (S.get(solver) if isinstance(solver, str) else solver).name
    for e in data["grids"]:
        if e["solver"] == name and int(e["nfe"]) == int(nfe):
            grid = jnp.asarray(e["grid"], jnp.float32)
            if not with_net:
                return grid
            net = e.get("net_grid")
            return grid, None if net is None else jnp.asarray(net, jnp.float32)
    have = ", ".join(f"{e['solver']}@{e['nfe']}" for e in data["grids"])
    raise ValueError(f"{path} has no grid for {name} at nfe {nfe}; it has: {have}")
