"""Values of a run configuration by type hint: parsing ``key=value`` text, checking
and coercing JSON values, and the library's processes by name with their settings.
Generic over dataclass fields; nothing here knows the sections of a run."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

import jdiff
from jdiff.runs._errors import ConfigError

__all__ = ["PROCESSES", "make_process"]

# The processes built into the library, by the name a config gives them.
PROCESSES = {
    "vp_linear": jdiff.vp_linear,
    "vp_cosine": jdiff.vp_cosine,
    "vp_discrete": jdiff.vp_discrete,
    "sub_vp": jdiff.sub_vp,
    "ve": jdiff.ve,
    "edm": jdiff.edm,
    "rectified_flow": jdiff.rectified_flow,
}
# Process fields that follow from other settings (a discrete process's table).
_PROCESS_DERIVED = {"name", "log_alphas", "num_train_steps", "zero_terminal_snr"}


# ------------------------------------------------------------------------- types


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp, name: str = "") -> str:
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a, name) for a in typing.get_args(tp))
    if origin is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin is tuple:
        return f"tuple[{_type_name(typing.get_args(tp)[0])}, ...]"
    if tp is type(None):
        return "none"
    if tp is Any:
        return "dtype" if name.endswith("dtype") else "str"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}
_NONE = {"none", "null", ""}


def _did_you_mean(word, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _parse_dtype(s: str, key: str):
    import jax.numpy as jnp

    if s.lower() in _NONE:
        return None
    try:
        return jnp.dtype(s)
    except TypeError:
        raise ConfigError(f"{key}: expected a dtype name (float32, bfloat16, float16) or none, got {s!r}") from None


def _parse_value(text: str, tp, key: str, name: str):
    s = text.strip()
    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if s.lower() in _NONE and len(args) < len(typing.get_args(tp)):
            return None
        for a in args:
            try:
                return _parse_value(text, a, key, name)
            except ConfigError as e:
                last = e
        if len(args) == 1:
            raise last
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if s not in choices:
            raise ConfigError(
                f"{key}: invalid choice {s!r}{_did_you_mean(s, choices)}; valid choices: {', '.join(map(str, choices))}"
            )
        return s
    if origin is tuple:
        elem = typing.get_args(tp)[0]
        items = [p.strip() for p in s.strip("()[]").split(",") if p.strip()]
        return tuple(_parse_value(p, elem, key, name) for p in items)
    if tp is Any:
        return _parse_dtype(s, key) if name.endswith("dtype") else s
    if tp is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(s.replace("_", ""))
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                f = None
            if f is not None and math.isfinite(f) and f.is_integer() and "e" in s.lower():
                return int(f)
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            v = float(s)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"{key}: expected a finite number, got {text!r}")
        return v
    if tp is str:
        return s
    raise ConfigError(f"{key}: cannot be set from the command line (type {_type_name(tp)})")


def _from_json(value, tp, key: str, name: str):
    """Check (and lightly coerce: int -> float, list -> tuple, dtype names) a JSON value."""
    origin = typing.get_origin(tp)
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is type(None):
                continue
            try:
                return _from_json(value, a, key, name)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_from_json(v, typing.get_args(tp)[0], key, name) for v in value)
    elif tp is Any:
        if name.endswith("dtype"):
            return None if value is None else _parse_dtype(str(value), key)
        return value
    elif tp is bool:
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


def _to_json(v, name: str = ""):
    if isinstance(v, jdiff.Process):
        return {"name": v.name, **_process_settings(v)}
    if dataclasses.is_dataclass(v):
        return {f.name: _to_json(getattr(v, f.name), f.name) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_to_json(x) for x in v]
    if name.endswith("dtype") and v is not None:
        import numpy as np

        return np.dtype(v).name
    return v


# --------------------------------------------------------------------- processes


def _process_fields(p) -> dict:
    hints = _hints(type(p))
    return {f.name: hints[f.name] for f in dataclasses.fields(p) if f.name not in _PROCESS_DERIVED}


def _process_settings(p) -> dict:
    return {k: _to_json(getattr(p, k)) for k in _process_fields(p)}


def make_process(name: str, settings: dict | None = None, key: str = "objective.process"):
    """The library process ``name`` (a key of :data:`PROCESSES`) with ``settings``
    replacing its fields."""
    if name not in PROCESSES:
        raise ConfigError(
            f"{key}: unknown process {name!r}{_did_you_mean(name, PROCESSES)}; valid processes: {', '.join(PROCESSES)}"
        )
    p = PROCESSES[name]()
    settings = dict(settings or {})
    if not settings:
        return p
    fields = _process_fields(p)
    vals = {}
    for k, v in settings.items():
        if k not in fields:
            raise ConfigError(f"{key}.{k}: {name} has no setting {k!r}; its settings: {', '.join(fields)}")
        vals[k] = _from_json(v, fields[k], f"{key}.{k}", k)
    try:
        return dataclasses.replace(p, **vals)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None
