"""Run configurations for the ``jdiff`` command line: nested dataclasses, named presets,
type-checked ``key=value`` overrides and a JSON round trip.

A configuration is a :class:`RunConfig` with one section per concern::

    data       what to train on (digits, a 2-D toy set, an .npz file, an image folder, CIFAR-10)
    model      which network (unet / mlp / dit) and its sizes
    objective  process, parameterization, weighting, time sampling, CFG label dropout
    optim      AdamW: learning rate, warmup, cosine decay, clipping, accumulation
    ema        EMA decay of the parameters
    train      steps, batch size, logging, checkpoints, sample-grid interval
    sample     the sampler used for the grids written during training (and the
               defaults of ``jdiff sample``)

:func:`get_preset` returns a fresh copy of a named preset; :func:`apply_overrides`
applies ``"section.key=value"`` strings, parsing each value according to the field's
type (``int``, ``float``, ``bool``, ``str`` with a fixed set of choices, ``X | None``,
``tuple[int, ...]``) and raising :class:`ConfigError` with the valid choices for an
unknown key, a bad value or an invalid combination. Nothing here touches JAX devices,
so a configuration can be resolved before ``jax.distributed.initialize``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "ConfigError",
    "DataConfig",
    "UNetSpec",
    "MLPSpec",
    "DiTSpec",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "EMAConfig",
    "TrainLoopConfig",
    "SampleConfig",
    "RunConfig",
    "PRESETS",
    "preset_names",
    "get_preset",
    "apply_overrides",
    "parse_override",
    "config_to_dict",
    "config_from_dict",
    "flatten_config",
    "config_diff",
    "validate_config",
    "PROCESSES",
    "SOLVER_NAMES",
]


class ConfigError(ValueError):
    """A bad preset name, override key or value, or an inconsistent configuration."""


PROCESSES = ("vp_linear", "vp_cosine", "sub_vp", "ve", "edm", "rectified_flow")
SOLVER_NAMES = (
    "ddim",
    "ddpm",
    "euler",
    "heun",
    "euler_maruyama",
    "dpm_solver",
    "dpm_solver_pp",
    "sde_dpm_solver_pp",
    "deis",
    "ipndm",
    "unipc",
)
GRID_KINDS = ("default", "uniform", "logsnr", "quadratic", "karras")


def _choices(*values, doc: str = ""):
    return dataclasses.field(default=values[0], metadata={"choices": values, "doc": doc})


def _f(default, doc: str = "", **kw):
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return dataclasses.field(default=default, metadata={"doc": doc, **kw})


# ------------------------------------------------------------------------- sections


@dataclasses.dataclass
class DataConfig:
    """What to train on. Images are NHWC in [-1, 1]; 2-D toy points are (N, 2)."""

    source: str = _choices("digits", "toy", "npz", "image_folder", "cifar10", doc="data source")
    resolution: int = _f(8, "image side; digits: 8 or an upsampled multiple of 8; npz/image_folder: required size")
    channels: int = _f(1, "image channels the model expects (1 or 3); npz/image_folder files must match")
    upsample: str = _choices("bilinear", "nearest", doc="digits upsampling method when resolution > 8")
    toy_name: str = _choices("moons", "checkerboard", "8gaussians", "swissroll", doc="2-D toy set")
    toy_size: int = _f(20000, "number of toy points")
    toy_seed: int = _f(0, "seed of the toy point set")
    path: str = _f("", "file or folder for npz / image_folder / cifar10")
    class_conditional: bool = _f(True, "use the data's labels (if any) for a class-conditional model")
    shuffle_seed: int = _f(0, "seed of the loader's per-epoch shuffling")


@dataclasses.dataclass
class UNetSpec:
    """A DDPM++/ADM-style U-Net (jdiff.models.UNet); image size, channels and classes
    come from the data."""

    base_channels: int = _f(32, "channels of the first level")
    channel_mult: tuple[int, ...] = _f((1, 2), "per-level channel multipliers (one 2x downsampling between levels)")
    num_res_blocks: int = _f(2, "residual blocks per level")
    attn_resolutions: tuple[int, ...] = _f((4,), "resolutions with self-attention")
    head_channels: int | None = _f(16, "channels per attention head (none: one head)")
    dropout: float = _f(0.1, "dropout rate in residual blocks")
    emb_mult: int = _f(4, "embedding width = emb_mult * base_channels")
    scale_shift: bool = _f(True, "ADM scale-shift norm conditioning")
    resblock_updown: bool = _f(True, "resample inside residual blocks")
    time_embedding: str = _choices("sinusoidal", "fourier", doc="time features")
    time_scale: float = _f(1000.0, "multiplies the time input (1000 for t in [0, 1])")


@dataclasses.dataclass
class MLPSpec:
    """A residual MLP (jdiff.models.MLPResNet) for vectors."""

    width: int = _f(256, "residual stream width")
    num_blocks: int = _f(4, "residual blocks")
    mlp_ratio: int = _f(2, "hidden width = mlp_ratio * width")
    dropout: float = _f(0.0, "dropout rate")
    time_embedding: str = _choices("sinusoidal", "fourier", doc="time features")
    time_scale: float = _f(1000.0, "multiplies the time input")


@dataclasses.dataclass
class DiTSpec:
    """A Diffusion Transformer (jdiff.models.DiT)."""

    patch_size: int = _f(2, "patch side")
    hidden_dim: int = _f(128, "transformer width")
    depth: int = _f(4, "transformer blocks")
    num_heads: int = _f(4, "attention heads")
    mlp_ratio: float = _f(4.0, "MLP hidden width / hidden_dim")
    dropout: float = _f(0.0, "dropout rate")
    time_scale: float = _f(1000.0, "multiplies the time input")


@dataclasses.dataclass
class ModelConfig:
    kind: str = _choices("unet", "mlp", "dit", doc="network family (its section below is used)")
    dtype: str = _choices("float32", "bfloat16", doc="compute dtype")
    unet: UNetSpec = dataclasses.field(default_factory=UNetSpec)
    mlp: MLPSpec = dataclasses.field(default_factory=MLPSpec)
    dit: DiTSpec = dataclasses.field(default_factory=DiTSpec)
    init_seed: int = _f(0, "seed of the parameter initialization")


@dataclasses.dataclass
class ObjectiveConfig:
    """The training objective (jdiff.train.LossConfig)."""

    process: str = _choices(*PROCESSES, doc="forward process")
    prediction: str = _choices("eps", "x0", "v", "score", "flow", doc="what the network predicts")
    weighting: str = _choices("none", "min_snr", "edm", doc="loss weighting")
    min_snr_gamma: float = _f(5.0, "gamma of min-SNR weighting")
    time_sampling: str = _choices("uniform", "logit_normal", "log_normal", doc="training time distribution")
    logit_mean: float = _f(0.0, "logit-normal mean")
    logit_std: float = _f(1.0, "logit-normal std")
    p_mean: float = _f(-1.2, "log-normal mean of ln(sigma/alpha)")
    p_std: float = _f(1.2, "log-normal std")
    time_input: str = _choices("t", "sigma", "rho", "log_rho", doc="what the network receives as time")
    precondition: str = _choices("none", "edm", doc="EDM preconditioning (needs prediction=x0)")
    sigma_data: float = _f(0.5, "data std for EDM preconditioning / weighting")
    label_dropout: float = _f(0.1, "probability of the null label (classifier-free guidance training)")


@dataclasses.dataclass
class OptimConfig:
    """clip_by_global_norm + AdamW under linear warmup and cosine decay."""

    lr: float = _f(1e-3, "peak learning rate")
    warmup_steps: int = _f(100, "linear warmup steps (at most train.steps - 1 are used)")
    schedule: str = _choices("cosine", "constant", doc="after warmup: cosine decay to final_lr, or constant")
    final_lr: float = _f(0.0, "learning rate at the last step (cosine)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    clip_norm: float | None = _f(1.0, "global-norm gradient clipping (none: off)")
    accum_steps: int = _f(1, "gradient accumulation micro-batches per step")


@dataclasses.dataclass
class EMAConfig:
    decay: float | None = _f(0.999, "EMA decay of the parameters (none: no EMA)")
    warmup: bool = _f(True, "use min(decay, (1 + n) / (10 + n))")


@dataclasses.dataclass
class TrainLoopConfig:
    steps: int = _f(1000, "total optimizer steps")
    batch_size: int = _f(128, "global batch size (all processes together)")
    seed: int = _f(0, "seed of the training randomness (times, noise, dropout)")
    log_every: int = _f(10, "append a metrics line every this many steps")
    checkpoint_every: int = _f(500, "save a checkpoint every this many steps (and at the end)")
    keep: int = _f(3, "checkpoints to keep")
    grid_every: int = _f(500, "write a sample grid every this many steps (0: only at the end)")
    async_checkpointing: bool = _f(True, "write checkpoints in the background")


@dataclasses.dataclass
class SampleConfig:
    solver: str = _choices(*SOLVER_NAMES, doc="sampler (jdiff.solvers)")
    order: int = _f(0, "solver order (0: the solver's default)")
    nfe: int = _f(20, "model evaluations per sample")
    grid_kind: str = _choices(*GRID_KINDS, doc="time-grid spacing")
    num: int = _f(64, "samples in a grid")
    guidance: float = _f(1.0, "classifier-free guidance scale (1: conditional model alone)")
    ema: bool = _f(True, "sample with the EMA parameters")
    seed: int = _f(0, "seed of the prior noise")


@dataclasses.dataclass
class RunConfig:
    name: str = _f("custom", "preset name (informational)")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


# -------------------------------------------------------------------------- presets


def _digits() -> RunConfig:
    """Class-conditional U-Net (0.8M) on the 8x8 scikit-learn digits; < 10 min on 2 CPU cores.

    Sized so that a 2-core CPU trains it to recognisable samples (docs/training.md)."""
    return RunConfig(
        name="digits",
        data=DataConfig(source="digits", resolution=8, channels=1, class_conditional=True),
        model=ModelConfig(
            kind="unet",
            unet=UNetSpec(
                base_channels=32,
                channel_mult=(1, 2),
                num_res_blocks=1,
                attn_resolutions=(4,),
                head_channels=16,
                dropout=0.1,
            ),
        ),
        objective=ObjectiveConfig(
            process="vp_cosine", prediction="v", weighting="min_snr", min_snr_gamma=5.0, label_dropout=0.1
        ),
        optim=OptimConfig(lr=2e-3, warmup_steps=100, schedule="cosine", final_lr=1e-5, clip_norm=1.0),
        ema=EMAConfig(decay=0.995, warmup=True),
        train=TrainLoopConfig(steps=1500, batch_size=128, log_every=10, checkpoint_every=250, keep=2, grid_every=500),
        sample=SampleConfig(solver="dpm_solver_pp", order=2, nfe=25, num=100, guidance=1.5),
    )


def _toy2d() -> RunConfig:
    """Rectified flow with an MLP-ResNet on two moons (unconditional)."""
    return RunConfig(
        name="toy2d",
        data=DataConfig(source="toy", toy_name="moons", toy_size=20000, class_conditional=False),
        model=ModelConfig(kind="mlp", mlp=MLPSpec(width=128, num_blocks=3, mlp_ratio=2)),
        objective=ObjectiveConfig(process="rectified_flow", prediction="flow", label_dropout=0.0),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, schedule="cosine", final_lr=1e-5, clip_norm=1.0),
        ema=EMAConfig(decay=0.99, warmup=True),
        train=TrainLoopConfig(steps=2000, batch_size=256, log_every=10, checkpoint_every=500, keep=2, grid_every=500),
        sample=SampleConfig(solver="heun", order=0, nfe=20, num=2000, guidance=1.0),
    )


def _checkerboard() -> RunConfig:
    """VP-cosine eps prediction on the checkerboard, a harder 2-D set."""
    cfg = _toy2d()
    cfg.name = "checkerboard"
    cfg.data.toy_name = "checkerboard"
    cfg.model.mlp = MLPSpec(width=256, num_blocks=4, mlp_ratio=2)
    cfg.objective = ObjectiveConfig(process="vp_cosine", prediction="eps", label_dropout=0.0)
    cfg.train.steps = 4000
    cfg.sample = SampleConfig(solver="dpm_solver_pp", order=2, nfe=20, num=2000)
    return cfg


def _digits16() -> RunConfig:
    """The digits preset on 16x16 bilinear upsampled images (about 4x the compute)."""
    cfg = _digits()
    cfg.name = "digits16"
    cfg.data.resolution = 16
    cfg.model.unet = UNetSpec(
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), head_channels=16, dropout=0.1
    )
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "digits": _digits,
    "digits16": _digits16,
    "toy2d": _toy2d,
    "checkerboard": _checkerboard,
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> RunConfig:
    """A fresh copy of preset ``name``; :class:`ConfigError` lists the presets otherwise."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ------------------------------------------------------------------- field helpers


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"tuple[{_type_name(typing.get_args(tp)[0])}, ...]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}


def _parse_scalar(text: str, tp, key: str):
    s = text.strip()
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(s.replace("_", ""), 0) if s.lower().startswith(("0x", "0o", "0b")) else int(s.replace("_", ""))
        except ValueError:
            try:  # allow 1e3 when it is an exact integer
                f = float(s)
            except ValueError:
                f = None
            if f is not None and f.is_integer() and "e" in s.lower():
                return int(f)
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(s)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if tp is str:
        return s
    raise ConfigError(f"{key}: cannot parse a value of type {_type_name(tp)}")


def _parse_value(text: str, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null", ""):
            return None
        errors = []
        for a in args:
            try:
                return _parse_value(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    if origin is tuple:
        (elem, *_) = typing.get_args(tp)
        s = text.strip().strip("()[]")
        items = [p for p in (q.strip() for q in s.split(",")) if p]
        return tuple(_parse_value(p, elem, key) for p in items)
    return _parse_scalar(text, tp, key)


def _check_type(value, tp, key: str):
    """Check (and lightly coerce: int -> float, list -> tuple) a value of JSON origin."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_) = typing.get_args(tp)
        return tuple(_check_type(v, elem, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _valid_keys(obj, prefix: str = "") -> list[str]:
    out = []
    for name in _fields(obj):
        v = getattr(obj, name)
        if dataclasses.is_dataclass(v):
            out.extend(_valid_keys(v, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def _unknown_key(key: str, obj, prefix: str) -> ConfigError:
    valid = _valid_keys(obj, prefix)
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys {where}: {', '.join(valid)}")


def parse_override(text: str) -> tuple[str, str]:
    """``"a.b=c"`` -> ``("a.b", "c")``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, value


def set_value(cfg: RunConfig, key: str, text: str) -> None:
    """Set ``cfg.<key>`` from the string ``text``, parsed and checked by the field's type."""
    parts = key.split(".")
    obj = cfg
    prefix = ""
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            raise _unknown_key(key, obj, prefix)
        f = fields[part]
        cur = getattr(obj, part)
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(cur):
            if last:
                raise ConfigError(
                    f"{key!r} is a section, not a value; its keys: {', '.join(_valid_keys(cur, key + '.'))}"
                )
            obj, prefix = cur, prefix + part + "."
            continue
        if not last:
            raise ConfigError(f"{'.'.join(parts[: i + 1])!r} is a value, not a section (in override {key!r})")
        tp = _hints(type(obj))[part]
        value = _parse_value(text, tp, key)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: invalid choice {value!r}; valid choices: {', '.join(map(str, choices))}")
        setattr(obj, part, value)
        return


def apply_overrides(cfg: RunConfig, overrides) -> RunConfig:
    """Apply ``["a.b=c", ...]`` to a copy of ``cfg``, then :func:`validate_config`."""
    cfg = copy.deepcopy(cfg)
    for text in overrides or ():
        key, value = parse_override(text)
        set_value(cfg, key, value)
    validate_config(cfg)
    return cfg


# ------------------------------------------------------------------- JSON round trip


def config_to_dict(cfg) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def config_from_dict(d: dict, cls=RunConfig, prefix: str = ""):
    """Rebuild a configuration from :func:`config_to_dict` output (e.g. a run's
    ``config.json``), checking every key and type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected an object, got {d!r}")
    obj = cls()
    hints = _hints(cls)
    fields = _fields(obj)
    for k, v in d.items():
        key = prefix + k
        if k not in fields:
            raise _unknown_key(key, obj, prefix)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            setattr(obj, k, config_from_dict(v, type(cur), key + "."))
            continue
        value = _check_type(v, hints[k], key)
        choices = fields[k].metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{key}: invalid choice {value!r}; valid choices: {', '.join(map(str, choices))}")
        setattr(obj, k, value)
    return obj


def flatten_config(cfg) -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf value."""
    out = {}

    def walk(v, prefix):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = v

    walk(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def config_diff(a, b) -> dict[str, tuple]:
    """``{key: (a_value, b_value)}`` for the leaves that differ."""
    fa, fb = flatten_config(a), flatten_config(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def describe_keys(cfg: RunConfig | None = None) -> str:
    """Every key with its type, current value and help, one per line."""
    cfg = RunConfig() if cfg is None else cfg
    lines = []

    def walk(obj, prefix):
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
                continue
            choices = f.metadata.get("choices")
            tp = "{" + ",".join(map(str, choices)) + "}" if choices else _type_name(hints[f.name])
            doc = f.metadata.get("doc", "")
            lines.append(
                f"  {prefix}{f.name} = {json.dumps(config_to_dict(v) if isinstance(v, tuple) else v)}"
                f"  [{tp}]  {doc}".rstrip()
            )

    walk(cfg, "")
    return "\n".join(lines)


# ------------------------------------------------------------------------ validation


def validate_config(cfg: RunConfig) -> None:
    """Cross-field checks that a single field's type cannot express."""
    errs = []
    d, m, o, opt, t, s = cfg.data, cfg.model, cfg.objective, cfg.optim, cfg.train, cfg.sample

    def need(cond, msg):
        if not cond:
            errs.append(msg)

    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
    need(t.keep >= 1, f"train.keep must be >= 1, got {t.keep}")
    need(t.grid_every >= 0, f"train.grid_every must be >= 0, got {t.grid_every}")
    need(t.seed >= 0 and d.shuffle_seed >= 0 and m.init_seed >= 0 and s.seed >= 0, "seeds must be >= 0")
    need(opt.accum_steps >= 1, f"optim.accum_steps must be >= 1, got {opt.accum_steps}")
    need(
        t.batch_size % max(opt.accum_steps, 1) == 0,
        f"train.batch_size ({t.batch_size}) must be divisible by optim.accum_steps ({opt.accum_steps})",
    )
    need(opt.lr > 0, f"optim.lr must be positive, got {opt.lr}")
    need(opt.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {opt.warmup_steps}")
    need(opt.clip_norm is None or opt.clip_norm > 0, f"optim.clip_norm must be positive or none, got {opt.clip_norm}")
    need(
        cfg.ema.decay is None or 0.0 <= cfg.ema.decay < 1.0, f"ema.decay must be in [0, 1) or none, got {cfg.ema.decay}"
    )
    need(0.0 <= o.label_dropout <= 1.0, f"objective.label_dropout must be in [0, 1], got {o.label_dropout}")
    need(o.precondition != "edm" or o.prediction == "x0", "objective.precondition=edm needs objective.prediction=x0")
    need(s.nfe >= 1, f"sample.nfe must be >= 1, got {s.nfe}")
    need(s.num >= 1, f"sample.num must be >= 1, got {s.num}")
    need(s.order >= 0, f"sample.order must be >= 0 (0: default), got {s.order}")
    if d.source == "toy":
        need(m.kind == "mlp", f"data.source=toy gives 2-D vectors: use model.kind=mlp, not {m.kind}")
        need(d.toy_size >= t.batch_size, f"data.toy_size ({d.toy_size}) must be at least train.batch_size")
    else:
        need(
            m.kind in ("unet", "dit"), f"data.source={d.source} gives images: use model.kind=unet or dit, not {m.kind}"
        )
        need(d.channels in (1, 3), f"data.channels must be 1 or 3, got {d.channels}")
        need(d.resolution >= 1, f"data.resolution must be positive, got {d.resolution}")
        if d.source == "digits":
            need(d.channels == 1, f"the digits are grayscale: data.channels must be 1, got {d.channels}")
            need(d.resolution % 8 == 0, f"digits: data.resolution must be a multiple of 8, got {d.resolution}")
        if d.source in ("npz", "image_folder"):
            need(bool(d.path), f"data.source={d.source} needs data.path")
        if d.source == "cifar10":
            need(d.channels == 3 and d.resolution == 32, "cifar10 is 32x32 RGB: data.channels=3, data.resolution=32")
    if m.kind == "unet":
        u = m.unet
        levels = len(u.channel_mult)
        need(levels >= 1, "model.unet.channel_mult must not be empty")
        if levels and d.source != "toy":
            need(
                d.resolution % (1 << (levels - 1)) == 0,
                f"data.resolution {d.resolution} must be divisible by 2^{levels - 1} for {levels} U-Net levels",
            )
            res = tuple(d.resolution >> i for i in range(levels))
            bad = [r for r in u.attn_resolutions if r not in res]
            need(not bad, f"model.unet.attn_resolutions {list(bad)} are not among the U-Net's resolutions {list(res)}")
    if m.kind == "dit" and d.source != "toy":
        need(
            d.resolution % m.dit.patch_size == 0,
            f"data.resolution {d.resolution} must be divisible by model.dit.patch_size {m.dit.patch_size}",
        )
    if errs:
        raise ConfigError("invalid configuration: " + "; ".join(errs))
