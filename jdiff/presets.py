"""Named run configurations and the shipped trained models: the names of
:mod:`jdiff.runs` under the module path earlier code imports (``jdiff.presets``).

:func:`get_preset` returns a preset by name; ``--set key=value`` overrides go through
:func:`apply_overrides`; :func:`pretrained` (``"digits"``) returns a shipped model as
``(denoiser, config)`` without training.
"""

from __future__ import annotations

from jdiff.runs import (
    PRESETS,
    PRETRAINED,
    PROCESSES,
    ConfigError,
    RunConfig,
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    describe_keys,
    export_pretrained,
    flatten_config,
    get_preset,
    parse_override,
    preset_names,
    pretrained,
    pretrained_dir,
    validate_config,
)

__all__ = [
    "ConfigError",
    "RunConfig",
    "PRESETS",
    "PROCESSES",
    "preset_names",
    "get_preset",
    "apply_overrides",
    "parse_override",
    "config_to_dict",
    "config_from_dict",
    "flatten_config",
    "config_diff",
    "describe_keys",
    "validate_config",
    "PRETRAINED",
    "pretrained",
    "pretrained_dir",
    "export_pretrained",
]
