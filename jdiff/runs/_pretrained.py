"""Trained models shipped with jdiff: :func:`pretrained` loads one as a ready denoiser,
:func:`export_pretrained` writes one from a ``jdiff train`` run directory.

A shipped model is a folder under ``jdiff/assets/`` (``digits_unet``, ``digits_dit``,
``digits_small_unet``: :data:`PRETRAINED`) holding

- ``params.npz``: the parameters (the EMA ones by default) as float32 arrays named by
  their path in the model (``down/0/conv/kernel``, ...), read without pickle;
- ``config.json``: the run's resolved configuration (:func:`jdiff.runs.config_to_dict`),
  ``run.json``: data shape and number of classes (and the rest of the run's facts);
- the record of how it was made: ``metrics.jsonl`` (the loss history), ``history.jsonl``,
  ``loss.png`` and ``TRAINED.md`` (the exact command, the machine, the time it took).

``jdiff train <preset>`` reproduces the model (the same configuration and seeds; the
weights agree to floating-point reproducibility on the same software and machine).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import shutil
import zipfile

import jax
import numpy as np

from jdiff.runs import _dir as R
from jdiff.runs._build import build_run, denoiser_apply, run_denoiser, to_host
from jdiff.runs._config import config_from_dict, config_to_dict

__all__ = ["PRETRAINED", "pretrained", "pretrained_dir", "export_pretrained", "flatten_params", "unflatten_params"]

# preset name -> folder under jdiff/assets
PRETRAINED = {"digits": "digits_unet", "digits_dit": "digits_dit", "digits_small": "digits_small_unet"}
PARAMS_FILE = "params.npz"
RECORD_FILES = ("metrics.jsonl", "history.jsonl", "loss.png")


def pretrained_dir(name: str) -> str:
    """The folder of the shipped model ``name`` (a key of :data:`PRETRAINED`)."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model named {name!r}; shipped models: {', '.join(PRETRAINED)}")
    return os.fspath(importlib.resources.files("jdiff").joinpath("assets", PRETRAINED[name]))


def _path_names(path) -> str:
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    if len(names) > 1 and names[-1] == "value":  # an NNX Variable's own field
        names = names[:-1]
    return "/".join(names)


def flatten_params(params) -> dict[str, np.ndarray]:
    """``{"path/in/model": array}`` of a parameter pytree (e.g. an ``nnx.State``)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {_path_names(p): leaf for p, leaf in flat}
    if len(out) != len(flat):
        raise ValueError("parameter paths are not unique once joined with '/'")
    return out


def unflatten_params(arrays: dict, target, where: str = "params"):
    """The pytree of ``target`` (arrays or shapes) filled from ``arrays`` (as written by
    :func:`flatten_params`), every key, shape and dtype checked.

    Raises:
      ValueError: missing or unexpected keys, a shape or dtype that differs from
        ``target``'s, non-finite values (the message names ``where`` and the key)."""
    expected = flatten_params(target)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: parameters do not match the model: {len(missing)} missing {missing[:5]}, "
            f"{len(extra)} unexpected {extra[:5]}"
        )
    values = []
    for k, leaf in expected.items():
        a = np.asarray(arrays[k])
        if a.shape != tuple(leaf.shape) or a.dtype != np.dtype(leaf.dtype):
            raise ValueError(
                f"{where}: {k} is {a.dtype}{list(a.shape)}, the model needs {leaf.dtype}{list(leaf.shape)}"
            )
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: {k} holds non-finite values")
        values.append(a)
    return jax.tree.unflatten(jax.tree.structure(target), values)


def _read_json(path: str, where: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{where}: missing {os.path.basename(path)} ({path})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read {path}: {e}") from e


@functools.lru_cache(maxsize=8)
def _abstract_run(cfg_json: str, shape: tuple, num_classes: int):
    """The model of a configuration, shapes only (built once per configuration: loading
    the same model again reuses it)."""
    cfg = config_from_dict(json.loads(cfg_json))
    return build_run(cfg, with_data=False, data_shape=shape, num_classes=num_classes, abstract=True)


def pretrained(name: str = "digits", *, guidance: float = 1.0, path=None):
    """A trained denoiser shipped with jdiff, ready for :func:`jdiff.sample` and
    :func:`jdiff.generate`.

    Args:
      name: the preset whose trained model to load (``"digits"``: the class-conditional
        U-Net of ``jdiff train digits``, 8x8x1 images in [-1, 1], labels 0..9;
        ``"digits_dit"``: a DiT on the same data and objective; ``"digits_small"``: a
        U-Net with about 4x fewer FLOPs per call, interchangeable with ``"digits"``).
      guidance: classifier-free guidance scale (Ho & Salimans, 2022): 1 is the
        conditional model alone; another value wraps the denoiser in
        :func:`jdiff.wrappers.guidance`.
      path: a folder written by :func:`export_pretrained` to load instead.

    Returns:
      ``(denoiser, config)``: a :class:`jdiff.Denoiser` (or its guidance wrapper) taking
      int32 labels as ``cond``, and the run's :class:`jdiff.runs.RunConfig` (the data
      shape is ``config.data.shape``, the number of classes
      ``config.model.network.num_classes``).

    Raises:
      ValueError: unknown name, a missing or malformed file (the message names it),
        parameters that do not fit the configured model, or a non-finite guidance.

    Example::

        den, cfg = jdiff.presets.pretrained("digits")
        labels = jnp.arange(100) % 10
        x = jdiff.generate(jdiff.solvers.get("dpm++2m"), den, 100, cfg.data.shape, nfe=10, cond=labels)
    """
    folder = pretrained_dir(name) if path is None else os.fspath(path)
    where = f"pretrained model {folder!r}"
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"pretrained: guidance must be a finite number, got {guidance!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"{where}: no such folder")
    cfg_dict = _read_json(os.path.join(folder, "config.json"), where)
    info = _read_json(os.path.join(folder, "run.json"), where)
    try:
        cfg = config_from_dict(cfg_dict)
        shape, num_classes = tuple(int(s) for s in info["data_shape"]), int(info["num_classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad config.json / run.json: {e}") from e
    params_path = os.path.join(folder, PARAMS_FILE)
    try:
        with np.load(params_path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ValueError(f"{where}: missing {PARAMS_FILE}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{where}: cannot read {params_path}: {e}") from e
    try:
        run = _abstract_run(json.dumps(config_to_dict(cfg), sort_keys=True), shape, num_classes)
    except (TypeError, ValueError) as e:  # RunError and ConfigError are ValueErrors
        raise ValueError(f"{where}: bad config.json / run.json: {e}") from e
    params = unflatten_params(arrays, run.params, where=params_path)
    den = run_denoiser(denoiser_apply(run), run, params, float(guidance))
    return den, run.cfg


def export_pretrained(run_dir, out_dir, *, step: int | None = None, ema: bool = True, command: str = "", notes=""):
    """Write a ``jdiff train`` run's (EMA) parameters and record as a shipped model folder.

    Args:
      run_dir: the run directory; step: its checkpoint (default: the newest).
      out_dir: the folder to write (created; its files replaced).
      ema: export the EMA parameters (else the raw trained ones).
      command: the command that trained the run, written to ``TRAINED.md``;
      notes: more lines for ``TRAINED.md`` (machine, wall time, ...).

    Returns:
      The path of the written ``params.npz``.

    Raises:
      RunError: no such run or checkpoint; ValueError: no EMA parameters.
    """
    cfg, info, run, state, got = R.load_run_state(os.fspath(run_dir), step)
    params = state.ema_params if ema else state.params
    if params is None:
        raise ValueError(f"{run_dir}: the run has no EMA parameters; export with ema=False")
    arrays = {k: np.asarray(v) for k, v in flatten_params(to_host(params)).items()}
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, PARAMS_FILE)
    np.savez_compressed(out, **arrays)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
        f.write("\n")
    info = dict(info, data_shape=list(run.data_shape), num_classes=run.num_classes, step=int(got), ema=bool(ema))
    with open(os.path.join(out_dir, "run.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    for name in RECORD_FILES:
        src = os.path.join(os.fspath(run_dir), name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
    n = sum(int(np.prod(a.shape)) for a in arrays.values())
    lines = [
        f"# {cfg.name}: trained model shipped with jdiff",
        "",
        f"Parameters: {'EMA' if ema else 'raw'} weights of step {got}, {n:,} values ({PARAMS_FILE}, float32).",
        "",
        "Trained with:",
        "",
        f"    {command}" if command else "    (command not recorded)",
        "",
    ]
    if notes:
        lines += [str(notes).rstrip(), ""]
    lines += [
        "Loss history: metrics.jsonl (one line per logged step), history.jsonl (the run's events), loss.png.",
        "Load with `jdiff.presets.pretrained(...)`.",
        "",
    ]
    with open(os.path.join(out_dir, "TRAINED.md"), "w") as f:
        f.write("\n".join(lines))
    return out
