"""The compile-time XLA setting (jdiff/_xla.py): added only where it is known to work,
never over the user's own choice."""

from jdiff import _xla


def test_flag_added_only_for_tested_jaxlib_and_never_over_user_choice(monkeypatch):
    known = _xla._jaxlib_minor() in _xla._TESTED_JAXLIB
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert _xla.prefer_fast_cpu_compile(env) is known
    want = "--xla_force_host_platform_device_count=2" + (f" {_xla.FAST_COMPILE_FLAG}" if known else "")
    assert env["XLA_FLAGS"] == want
    # already set (either way) by the user: untouched
    env = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=true"}
    assert not _xla.prefer_fast_cpu_compile(env) and env["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true"
    # opt-out
    env = {"JDIFF_XLA_DEFAULTS": "1"}
    assert not _xla.prefer_fast_cpu_compile(env) and "XLA_FLAGS" not in env
    # an unknown jaxlib release: the flag might abort XLA, so it is not added
    monkeypatch.setattr(_xla, "_jaxlib_minor", lambda: (99, 0))
    env = {}
    assert not _xla.prefer_fast_cpu_compile(env) and "XLA_FLAGS" not in env
