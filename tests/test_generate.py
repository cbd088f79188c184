"""jdiff.generate: samples independent of the batch size and of the number of devices."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import _train_worker as W
import jax.numpy as jnp
import numpy as np

import jdiff

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, jdiff

    def net(params, x, t, cond):
        return jnp.tanh(params["w"] * x) * (1.0 + 0.1 * cond[:, None]) + t[:, None]

    den = jdiff.Denoiser(apply_fn=net, params={"w": jnp.float32(0.7)}, process=jdiff.vp_cosine(), prediction="eps")
    labels = np.arange(13) % 3
    out = {}
    for solver in ("dpm++2m", "sde-dpm++2m"):
        out[solver] = jdiff.generate(jdiff.solvers.get(solver), den, 13, (4,), nfe=6, seed=5, cond=labels,
                                     batch_size=BATCH)
    np.savez(PATH, devices=jax.device_count(), **out)
    """
)


def _run(n_devices: int, batch: int, path):
    env = W.subprocess_env(devices=n_devices)
    code = SCRIPT.replace("BATCH", str(batch)).replace("PATH", repr(str(path)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(path)


def _tol(x):
    # float32 rounding of a few dozen operations per step and sample, 6 steps
    return dict(rtol=0, atol=64 * 6 * np.finfo(np.float32).eps * max(1.0, float(np.abs(x).max())))


def test_batch_size_does_not_change_samples():
    den = jdiff.Denoiser(
        apply_fn=lambda p, x, t, c: jnp.tanh(p * x) + t[:, None], params=jnp.float32(0.5), process=jdiff.vp_cosine()
    )
    solver = jdiff.solvers.get("sde-dpm++2m")
    a = jdiff.generate(solver, den, 11, (3,), nfe=5, seed=1, batch_size=0)
    b = jdiff.generate(solver, den, 11, (3,), nfe=5, seed=1, batch_size=4)
    c = jdiff.generate(solver, den, 11, (3,), nfe=5, seed=2, batch_size=4)
    assert a.shape == (11, 3) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, **_tol(a))
    assert not np.allclose(a, c)
    # the first 5 samples of 11 are the 5 samples of a run of 5
    d = jdiff.generate(solver, den, 5, (3,), nfe=5, seed=1)
    np.testing.assert_allclose(a[:5], d, **_tol(a))


def test_eight_devices_equal_one(tmp_path):
    one = _run(1, 0, tmp_path / "one.npz")
    eight = _run(8, 4, tmp_path / "eight.npz")
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    for k in ("dpm++2m", "sde-dpm++2m"):
        assert one[k].shape == (13, 4)
        np.testing.assert_allclose(one[k], eight[k], **_tol(one[k]))
