"""What a training request means for its run directory (:func:`plan_training`): a new
run, or the resumption of the run there with its recorded configuration, every value
checked before anything is created."""

from __future__ import annotations

import dataclasses
import os
import shlex

from jdiff.runs import _dir as R
from jdiff.runs._build import writable_path
from jdiff.runs._config import RunConfig, apply_overrides, config_to_dict
from jdiff.runs._errors import RunError
from jdiff.runs._presets import get_preset, preset_names
from jdiff.train import _run as record

__all__ = ["TrainRequest", "plan_training"]


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """A checked training request (see :func:`plan_training`).

    Attributes:
      cfg: the configuration to train with.
      out: the run directory.
      saved: the run's recorded configuration (a dict) when ``out`` has checkpoints,
        else ``None``.
      replaced: ``config.json`` is missing or unreadable and ``cfg`` was given in its
        place (``replace_config``).
      changes: the allowed settings changed on resume ``{key: (saved, requested)}``.
      preset, overrides, resume, replace_config: what was asked (the arguments of
        :func:`plan_training`), so that the request can be planned again under the run's
        lock.
    """

    cfg: RunConfig
    out: str
    saved: dict | None = None
    replaced: bool = False
    changes: dict = dataclasses.field(default_factory=dict)
    preset: str | None = None
    overrides: tuple = ()
    resume: bool = False
    replace_config: bool = False

    def replan(self) -> TrainRequest:
        """The same request planned again against the run directory as it is now (a
        request built by hand, with no preset and no resume, is returned as it is)."""
        if self.preset is None and not self.resume:
            return self
        return plan_training(
            self.preset, self.overrides, out=self.out, resume=self.resume, replace_config=self.replace_config
        )


def _original_command(out: str) -> str | None:
    """The command line that started the run in ``out`` (its first recorded start),
    without ``--resume``; ``None`` if the history records none."""
    for e in record.read_history(out):
        if e.get("event") == "started" and e.get("argv"):
            argv = [a for a in e["argv"] if a != "--resume"]
            return shlex.join(argv)
    return None


def _no_checkpoint_yet(out: str) -> RunError:
    ckpt_dir = os.path.join(out, R.CKPT_DIR)
    started = _original_command(out)
    if started is None:
        return RunError(
            f"--resume: no checkpoint found in {ckpt_dir}: nothing of a run has been saved there yet; "
            "start the run with its original command (without --resume)"
        )
    return RunError(
        f"--resume: no checkpoint found in {ckpt_dir}: nothing was saved yet (the run stopped before its "
        f"first checkpoint); start it again with the original command, without --resume: {started}"
    )


def plan_training(
    preset: str | None = None,
    overrides=(),
    *,
    out: str | None = None,
    resume: bool = False,
    replace_config: bool = False,
) -> TrainRequest:
    """The configuration to train with and the run directory, every value checked;
    creates nothing and starts no JAX backend.

    Arguments:
      preset: a preset name (:func:`jdiff.runs.get_preset`): the run's full
        configuration with ``overrides`` (``["key=value", ...]``). Without it,
        ``resume`` continues the run in ``out`` with its recorded configuration (and the
        overrides).
      out: the run directory (default ``runs/<preset>``). When it holds checkpoints the
        run there is resumed; the configuration may then differ from the recorded one
        only in settings a run may change (:data:`jdiff.runs.rundir.RESUMABLE_KEYS`).
      resume: continue the run in ``out`` (it must hold a checkpoint).
      replace_config: the run's ``config.json`` is missing or unreadable and
        ``preset`` + ``overrides`` are its full configuration.

    Returns:
      a :class:`TrainRequest`. Raises :class:`RunError` (:class:`ConfigError` for the
      configuration) saying what is wrong.
    """
    overrides = tuple(overrides or ())
    if replace_config and preset is None:
        raise RunError(
            "--replace-config takes the run's full configuration from the command line: give --preset NAME "
            "and every --set the run was trained with"
        )
    # The full configuration given (a preset and overrides), if any.
    given = apply_overrides(get_preset(preset), overrides) if preset is not None else None
    if out is not None:
        writable_path(out, "--out", directory=True)
    if resume:
        if out is None:
            raise RunError("--resume needs --out DIR (the run to continue)")
        if not os.path.isdir(out):
            raise RunError(f"run directory not found: {out}")
        if not R.checkpoint_steps(out):
            raise _no_checkpoint_yet(out)
    elif given is None:
        raise RunError(f"give a preset: jdiff train NAME (one of: {', '.join(preset_names())}) or --resume --out DIR")
    if out is None:
        out = os.path.join("runs", given.name)
        writable_path(out, "run directory", directory=True)
    asked = dict(preset=preset, overrides=overrides, resume=resume, replace_config=replace_config)
    if not R.checkpoint_steps(out):
        if replace_config:
            raise RunError(f"--replace-config: {out} has no checkpoint, so there is no run to resume")
        return TrainRequest(given, out, **asked)  # a new run (or one killed before its first checkpoint)
    # Resuming (asked for, or implied by checkpoints in out): the run's recorded
    # configuration decides; a missing one only with the full configuration and replace_config.
    replacement = config_to_dict(given) if replace_config else None
    try:
        saved, replaced = R.read_config_dict(out, replacement=replacement)
    except RunError as e:
        raise RunError(
            f"{e} (if you have it, resume with: jdiff train --out {out} --resume --preset NAME "
            "[--set KEY=VALUE ...] --replace-config)"
        ) from None
    base = R.config_of(saved, os.path.join(out, R.CONFIG_FILE))
    if preset is not None and preset != base.name and not replaced:
        raise RunError(f"{out} holds a run of preset {base.name!r}, not {preset!r}")
    # resume continues with the recorded configuration (and the overrides); a full configuration
    # given again (a preset without resume, or replace_config) is compared with the record.
    cfg = apply_overrides(base, overrides) if (resume and not replace_config) else given
    changes = R.check_resumable(saved, cfg, out)
    return TrainRequest(cfg, out, saved, replaced, changes, **asked)
