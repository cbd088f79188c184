"""Named run configurations (``jdiff train NAME``, :func:`get_preset`).

A preset is a :class:`jdiff.runs.RunConfig` built from the library's own config
dataclasses (:class:`jdiff.data.DataConfig`, :class:`jdiff.models.UNetConfig`, ...,
:class:`jdiff.train.LossConfig`, :class:`jdiff.train.OptimizerConfig`,
:class:`jdiff.SamplingConfig`). :func:`get_preset` returns one by name;
``--set key=value`` overrides go through :func:`jdiff.runs.apply_overrides`.
Trained models of presets ship with the package (:func:`jdiff.runs.pretrained`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import jdiff
from jdiff._generate import SamplingConfig
from jdiff.data._config import DataConfig
from jdiff.models import DiTConfig, MLPResNetConfig, UNetConfig
from jdiff.runs._config import ModelConfig, RunConfig, unchecked, validate_config
from jdiff.runs._errors import ConfigError
from jdiff.train._config import EMAConfig, OptimizerConfig, TrainConfig
from jdiff.train._objectives import LossConfig

__all__ = ["PRESETS", "preset_names", "preset_summaries", "get_preset"]


def _objective(**kw) -> LossConfig:
    # num_classes comes from the data (filled when the configuration is validated)
    return unchecked(LossConfig, **kw)


def _digits_unet(**kw) -> UNetConfig:
    base = dict(
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        head_channels=16,
        dropout=0.1,
        scale_shift=True,
        resblock_updown=True,
    )
    return UNetConfig(**(base | kw))


def _digits() -> RunConfig:
    """Class-conditional U-Net (0.8M) on the 8x8 scikit-learn digits; < 10 min on 2 CPU cores."""
    return RunConfig(
        name="digits",
        data=DataConfig(source="digits", resolution=8, channels=1, class_conditional=True),
        model=ModelConfig(kind="unet", unet=_digits_unet()),
        objective=_objective(
            process=jdiff.vp_cosine(), prediction="v", weighting="min_snr", min_snr_gamma=5.0, label_dropout=0.1
        ),
        optim=OptimizerConfig(lr=2e-3, warmup_steps=100, schedule="cosine", final_lr=1e-5, clip_norm=1.0),
        ema=EMAConfig(decay=0.995, warmup=True),
        train=TrainConfig(steps=1500, batch_size=128, log_every=10, checkpoint_every=250, keep=2, grid_every=500),
        sample=SamplingConfig(solver="dpm_solver_pp", order=2, nfe=25, num=100, guidance=1.5),
    )


def _toy2d() -> RunConfig:
    """Rectified flow with an MLP-ResNet on two moons (unconditional)."""
    return RunConfig(
        name="toy2d",
        data=DataConfig(source="toy", toy_name="moons", toy_size=20000, class_conditional=False),
        model=ModelConfig(kind="mlp", mlp=MLPResNetConfig(dim=2, width=128, num_blocks=3, mlp_ratio=2)),
        objective=_objective(process=jdiff.rectified_flow(), prediction="flow", label_dropout=0.0),
        optim=OptimizerConfig(lr=3e-3, warmup_steps=50, schedule="cosine", final_lr=1e-5, clip_norm=1.0),
        ema=EMAConfig(decay=0.99, warmup=True),
        train=TrainConfig(steps=2000, batch_size=256, log_every=10, checkpoint_every=500, keep=2, grid_every=500),
        sample=SamplingConfig(solver="heun", order=0, nfe=20, num=2000, guidance=1.0),
    )


def _checkerboard() -> RunConfig:
    """VP-cosine eps prediction on the checkerboard, a harder 2-D set."""
    cfg = _toy2d()
    return RunConfig(
        name="checkerboard",
        data=DataConfig(source="toy", toy_name="checkerboard", toy_size=20000, class_conditional=False),
        model=ModelConfig(kind="mlp", mlp=MLPResNetConfig(dim=2, width=256, num_blocks=4, mlp_ratio=2)),
        objective=_objective(process=jdiff.vp_cosine(), prediction="eps", label_dropout=0.0),
        optim=cfg.optim,
        ema=cfg.ema,
        train=TrainConfig(steps=4000, batch_size=256, log_every=10, checkpoint_every=500, keep=2, grid_every=500),
        sample=SamplingConfig(solver="dpm_solver_pp", order=2, nfe=20, num=2000),
    )


def _digits16() -> RunConfig:
    """The digits preset on 16x16 bilinear upsampled images (about 4x the compute)."""
    cfg = _digits()
    return RunConfig(
        name="digits16",
        data=DataConfig(source="digits", resolution=16, channels=1, class_conditional=True),
        model=ModelConfig(kind="unet", unet=_digits_unet(channel_mult=(1, 2, 2))),
        objective=cfg.objective,
        optim=cfg.optim,
        ema=cfg.ema,
        train=cfg.train,
        sample=cfg.sample,
    )


def _digits_dit() -> RunConfig:
    """Class-conditional DiT (1.87M; patch 2: 16 tokens, width 128, depth 6) on the digits data and objective.

    About 20 min at 1.5 steps/s on 2 CPU cores (49 min when shared with other jobs); the
    shipped model of :func:`jdiff.runs.pretrained` ``("digits_dit")``."""
    cfg = _digits()
    dit = DiTConfig(patch_size=2, hidden_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, time_scale=1000.0)
    return RunConfig(
        name="digits_dit",
        data=cfg.data,
        model=ModelConfig(kind="dit", dit=dit),
        objective=cfg.objective,
        optim=OptimizerConfig(lr=1e-3, warmup_steps=100, schedule="cosine", final_lr=1e-5, clip_norm=1.0),
        ema=cfg.ema,
        train=TrainConfig(steps=1800, batch_size=64, log_every=10, checkpoint_every=300, keep=2, grid_every=900),
        sample=cfg.sample,
    )


def _digits_small() -> RunConfig:
    """The digits preset with a 16-channel U-Net (206k, 3.9x fewer FLOPs per call): the small model of T-Stitch.

    Same process, prediction, time input and classes as ``digits``, so it can stand in
    for it on part of a trajectory; shipped as :func:`jdiff.runs.pretrained` ``("digits_small")``."""
    cfg = _digits()
    return RunConfig(
        name="digits_small",
        data=cfg.data,
        model=ModelConfig(kind="unet", unet=_digits_unet(base_channels=16)),
        objective=cfg.objective,
        optim=cfg.optim,
        ema=cfg.ema,
        train=cfg.train,
        sample=cfg.sample,
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "digits": _digits,
    "digits16": _digits16,
    "toy2d": _toy2d,
    "checkerboard": _checkerboard,
    "digits_dit": _digits_dit,
    "digits_small": _digits_small,
}


def preset_names() -> list[str]:
    """The names of the presets, in the order ``jdiff presets`` lists them."""
    return list(PRESETS)


def preset_summaries() -> dict[str, str]:
    """``{name: one-line description}`` of the presets (the first line of each
    preset's docstring)."""
    return {name: ((fn.__doc__ or "").strip().splitlines() or [""])[0] for name, fn in PRESETS.items()}


def get_preset(name: str) -> RunConfig:
    """Preset ``name``, validated (data-derived fields filled); :class:`ConfigError`
    with the valid names otherwise."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {', '.join(PRESETS)}")
    return validate_config(PRESETS[name]())
