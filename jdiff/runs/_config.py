"""The configuration of a run: the library's own config dataclasses in one tree, one
generic ``key=value`` parser over their fields and type hints (:mod:`._values`), and a
JSON round trip. The ``jdiff`` command line's ``--set`` goes through
:func:`apply_overrides`.

::

    name       preset name (informational)
    data       jdiff.data.DataConfig
    model      kind (unet | mlp | dit), init_seed, and jdiff.models.UNetConfig /
               MLPResNetConfig / DiTConfig under model.unet / model.mlp / model.dit
    objective  jdiff.train.LossConfig; objective.process is a process by name
               (objective.process=vp_cosine) with its settings as sub-keys
               (objective.process.t_max=1.0)
    optim      jdiff.train.OptimizerConfig
    ema        jdiff.train.EMAConfig
    train      jdiff.train.TrainConfig
    sample     jdiff.SamplingConfig

Fields that follow from the data (image size, channels, vector size, number of
classes) are filled by :func:`fill_from_data`, never set by the user. Nothing here
starts a JAX backend.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Literal

import jdiff
from jdiff._generate import SamplingConfig
from jdiff.data._config import DataConfig
from jdiff.models import DiTConfig, MLPResNetConfig, UNetConfig
from jdiff.runs._errors import ConfigError
from jdiff.runs._values import (
    PROCESSES,
    _did_you_mean,
    _from_json,
    _hints,
    _parse_value,
    _process_fields,
    _process_settings,
    _to_json,
    _type_name,
    make_process,
)
from jdiff.train._config import EMAConfig, OptimizerConfig, TrainConfig
from jdiff.train._objectives import LossConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "RunConfig",
    "PROCESSES",
    "apply_overrides",
    "parse_override",
    "set_value",
    "config_to_dict",
    "config_from_dict",
    "flatten_config",
    "config_diff",
    "describe_keys",
    "validate_config",
    "fill_from_data",
    "unchecked",
    "make_process",
    "DERIVED_KEYS",
]


def unchecked(cls, **kw):
    """An instance of the frozen dataclass ``cls`` with ``kw`` set, without running its
    checks (for fields that :func:`fill_from_data` completes later)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in kw:
            v = kw[f.name]
        elif f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}: missing {f.name}")
        object.__setattr__(obj, f.name, v)
    return obj


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network (``kind``; its section is used) and its parameter seed."""

    kind: Literal["unet", "mlp", "dit"] = "unet"
    init_seed: int = 0
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    mlp: MLPResNetConfig = dataclasses.field(default_factory=lambda: MLPResNetConfig(dim=2))
    dit: DiTConfig = dataclasses.field(default_factory=DiTConfig)

    @property
    def network(self):
        """The config of the selected network."""
        return getattr(self, self.kind)


def _default_objective():
    return LossConfig(process=jdiff.vp_cosine())


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "custom"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    objective: LossConfig = dataclasses.field(default_factory=_default_objective)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)


# Keys filled from the data or fixed by the command line: not settable.
_DATA_FIELDS = ("image_size", "in_channels", "out_channels", "num_classes", "dim")
DERIVED_KEYS = frozenset(
    [f"model.{k}.{n}" for k in ("unet", "mlp", "dit") for n in _DATA_FIELDS]
    + ["objective.num_classes", "objective.data_key", "objective.label_key", "objective.model_rng"]
)


# ------------------------------------------------------------------------- keys


def _leaf_keys(obj, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = prefix + f.name
        if key in DERIVED_KEYS:
            continue
        if isinstance(v, jdiff.Process):
            out.append(key)
            out.extend(f"{key}.{k}" for k in _process_fields(v))
        elif dataclasses.is_dataclass(v):
            out.extend(_leaf_keys(v, key + "."))
        else:
            out.append(key)
    return out


def _unknown_key(key: str, root, obj, prefix: str) -> ConfigError:
    valid = _leaf_keys(obj, prefix)
    hint = _did_you_mean(key, _leaf_keys(root))
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


def _replace(obj, **kw):
    new = copy.copy(obj)
    for k, v in kw.items():
        object.__setattr__(new, k, v)
    return new


def set_value(cfg, key: str, text: str):
    """A copy of ``cfg`` with ``key`` set from the string ``text``, parsed by the
    field's type hint. Checks run in :func:`validate_config`."""
    if key in DERIVED_KEYS:
        raise ConfigError(f"{key} is filled from the data (or by jdiff itself); it cannot be set")

    def walk(obj, parts, prefix):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        part = parts[0]
        if part not in fields:
            raise _unknown_key(key, cfg, obj, prefix)
        cur = getattr(obj, part)
        last = len(parts) == 1
        if isinstance(cur, jdiff.Process):
            if last:
                return _replace(obj, **{part: make_process(text.strip(), key=key)})
            if len(parts) > 2:
                raise ConfigError(f"unknown config key {key!r}")
            settings = _process_settings(cur)
            fields_p = _process_fields(cur)
            if parts[1] not in fields_p:
                raise ConfigError(
                    f"{key}: {cur.name} has no setting {parts[1]!r}{_did_you_mean(parts[1], fields_p)}; "
                    f"its settings: {', '.join(fields_p)}"
                )
            value = _parse_value(text, fields_p[parts[1]], key, parts[1])
            settings[parts[1]] = _to_json(value)
            return _replace(obj, **{part: make_process(cur.name, settings, key=prefix + part)})
        if dataclasses.is_dataclass(cur):
            if last:
                sub = ", ".join(_leaf_keys(cur, prefix + part + "."))
                raise ConfigError(f"{prefix + part!r} is a section, not a value; its keys: {sub}")
            return _replace(obj, **{part: walk(cur, parts[1:], prefix + part + ".")})
        if not last:
            raise ConfigError(f"{prefix + part!r} is a value, not a section (in override {key!r})")
        tp = _hints(type(obj))[part]
        return _replace(obj, **{part: _parse_value(text, tp, key, part)})

    return walk(cfg, key.split("."), "")


def apply_overrides(cfg: RunConfig, overrides, *, validate: bool = True) -> RunConfig:
    """Apply ``["a.b=c", ...]`` to ``cfg`` (which is not modified), then
    :func:`validate_config`."""
    for text in overrides or ():
        key, value = parse_override(text)
        cfg = set_value(cfg, key, value)
    if validate:
        cfg = validate_config(cfg)
    return cfg


# --------------------------------------------------------------------- JSON


def config_to_dict(cfg) -> dict:
    return _to_json(cfg)


def config_from_dict(d: dict, cls=RunConfig, prefix: str = "", *, validate: bool = True):
    """Rebuild a configuration from :func:`config_to_dict` output (e.g. a run's
    ``config.json``), checking every key and type."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected an object, got {d!r}")
    base = _default(cls)
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    vals = {}
    for k, v in d.items():
        key = prefix + k
        if k not in fields:
            raise _unknown_key(key, _default(RunConfig), base, prefix)
        cur = getattr(base, k)
        if isinstance(cur, jdiff.Process):
            if not isinstance(v, dict) or "name" not in v:
                raise ConfigError(f"{key}: expected an object with a process name, got {v!r}")
            v = dict(v)
            vals[k] = make_process(v.pop("name"), v, key=key)
        elif dataclasses.is_dataclass(cur):
            vals[k] = config_from_dict(v, type(cur), key + ".", validate=False)
        else:
            vals[k] = _from_json(v, hints[k], key, k)
    obj = _replace(base, **vals)
    if validate and cls is RunConfig:
        obj = validate_config(obj)
    return obj


def _default(cls):
    if cls is LossConfig:
        return _default_objective()
    if cls is MLPResNetConfig:
        return MLPResNetConfig(dim=2)
    return cls()


def flatten_config(cfg) -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf value (JSON form)."""
    out = {}

    def walk(v, prefix):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = v

    walk(config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def config_diff(a, b, *, skip_derived: bool = True) -> dict[str, tuple]:
    """``{key: (a_value, b_value)}`` for the leaves that differ (keys filled from the
    data left out)."""
    fa, fb = flatten_config(a), flatten_config(b)
    keys = sorted(set(fa) | set(fb))
    return {
        k: (fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k) and not (skip_derived and k in DERIVED_KEYS)
    }


def describe_keys(cfg: RunConfig | None = None) -> str:
    """Every settable key with its type and current value, one per line."""
    cfg = RunConfig() if cfg is None else cfg
    lines = []

    def walk(obj, prefix):
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            key = prefix + f.name
            if key in DERIVED_KEYS:
                continue
            v = getattr(obj, f.name)
            if isinstance(v, jdiff.Process):
                lines.append(f"  {key} = {json.dumps(v.name)}  [{{{','.join(PROCESSES)}}}]")
                ph = _process_fields(v)
                for k, tp in ph.items():
                    lines.append(f"  {key}.{k} = {json.dumps(_to_json(getattr(v, k)))}  [{_type_name(tp, k)}]")
            elif dataclasses.is_dataclass(v):
                walk(v, key + ".")
            else:
                lines.append(f"  {key} = {json.dumps(_to_json(v, f.name))}  [{_type_name(hints[f.name], f.name)}]")

    walk(cfg, "")
    return "\n".join(lines)


# ------------------------------------------------------------------- filling, checks


def fill_from_data(cfg: RunConfig, shape, num_classes: int) -> RunConfig:
    """``cfg`` with the fields that follow from the data set: the network's input size
    and channels, the number of classes (model and objective); no label dropout
    without classes."""
    shape = tuple(int(s) for s in shape)
    m = cfg.model
    if len(shape) == 3:
        unet = _replace(m.unet, image_size=shape[0], in_channels=shape[2], num_classes=num_classes)
        dit = _replace(m.dit, image_size=shape[0], in_channels=shape[2], num_classes=num_classes)
        m = _replace(m, unet=unet, dit=dit)
    else:
        m = _replace(m, mlp=_replace(m.mlp, dim=shape[0], num_classes=num_classes))
    o = cfg.objective
    o = _replace(o, num_classes=num_classes or None, label_dropout=o.label_dropout if num_classes else 0.0)
    return _replace(cfg, model=m, objective=o)


def _recheck(obj, prefix: str):
    """Rebuild every dataclass bottom-up so that its own checks run."""
    vals = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, jdiff.Process):
            vals[f.name] = _recheck(v, f"{prefix}{f.name}.")
    try:
        new = dataclasses.replace(obj, **vals)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix[:-1] or 'config'}: {e}") from None
    return new


# Integer settings of a network that are not sizes (everything else there is a size).
_NOT_SIZES = frozenset({"init_seed", "num_classes"})


def _check_leaves(cfg) -> None:
    for key, v in flatten_config(cfg).items():
        name = key.rsplit(".", 1)[-1]
        if name.endswith("dropout") and isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
            raise ConfigError(f"{key} must be a probability in [0, 1), got {v}")
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if key.startswith("model.") and is_int and name not in _NOT_SIZES and v < 1:
            raise ConfigError(f"{key} is a size and must be positive, got {v}")


def _hinted_shape_and_classes(d: DataConfig) -> tuple[tuple, int]:
    """The example shape and (an estimate of) the number of classes, without loading
    image files."""
    if not d.class_conditional:
        return d.shape, 0
    if d.source == "digits" or d.source == "cifar10":
        return d.shape, 10
    if d.source == "toy":
        from jdiff.data import toy

        _, y = toy(d.toy_name, min(d.toy_size, 64), d.toy_seed)
        return d.shape, 0 if y is None else int(max(y)) + 1
    return d.shape, 1  # labels of files are known once they are read


def validate_config(cfg: RunConfig, *, num_classes: int | None = None) -> RunConfig:
    """Run every section's own checks and the cross-section checks; returns the
    configuration with the data-derived fields filled (from the data configuration, or
    ``num_classes`` when the data are loaded). Raises :class:`ConfigError`."""
    _check_leaves(cfg)
    d, m, t, opt = cfg.data, cfg.model, cfg.train, cfg.optim
    try:
        d.validate()
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    if d.source == "toy" and m.kind != "mlp":
        raise ConfigError(f"data.source=toy gives 2-D vectors: use model.kind=mlp, not {m.kind}")
    if d.source != "toy" and m.kind == "mlp":
        raise ConfigError(f"data.source={d.source} gives images: use model.kind=unet or dit, not {m.kind}")
    shape, nc = _hinted_shape_and_classes(d)
    cfg = fill_from_data(cfg, shape, nc if num_classes is None else num_classes)
    cfg = _recheck(cfg, "")
    net = cfg.model.network
    if hasattr(net, "validate"):
        try:
            net.validate()
        except ValueError as e:
            raise ConfigError(f"model.{m.kind}: {e}") from None
    if t.batch_size % opt.accum_steps:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by optim.accum_steps ({opt.accum_steps})"
        )
    n = d.num_examples_hint()
    if n is not None and t.batch_size > n:
        raise ConfigError(f"train.batch_size ({t.batch_size}) is larger than the data set ({n} examples)")
    return cfg
