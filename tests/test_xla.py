"""The compile-time XLA setting (jdiff/_xla.py): added only where it is known to work,
never over the user's own choice."""

import os

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


def test_cpu_devices_one_per_core_never_over_user_choice():
    env = {"XLA_FLAGS": "--foo"}
    assert _xla.prefer_cpu_devices(env, cores=4)
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert not _xla.prefer_cpu_devices(env, cores=4) and env["XLA_FLAGS"].endswith("=8")
    env = {}
    assert not _xla.prefer_cpu_devices(env, cores=1) and "XLA_FLAGS" not in env
    env = {"JDIFF_XLA_DEFAULTS": "1"}
    assert not _xla.prefer_cpu_devices(env, cores=4) and "XLA_FLAGS" not in env
    # this test process's backends have started: its own environment is left alone
    import jax
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()
    before = os.environ.get("XLA_FLAGS")
    assert not _xla.prefer_cpu_devices() and os.environ.get("XLA_FLAGS") == before
    assert jax.device_count() >= 1
