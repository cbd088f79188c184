"""Value checks in the user's terms (issue 28, points 2, 3, 4 and 6): an ``nfe`` that
disagrees with an explicit grid, checks inside a sharded jit that raise instead of
hanging, traced guidance scales and network times, and eager calls that raise
``ValueError`` with the check's message (:func:`jdiff.check_message` under jit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _train_worker import subprocess_env
from conftest import EPS32

import jdiff
from jdiff import presets
from jdiff import solvers as S
from jdiff import wrappers as W

PROC = jdiff.vp_linear()
X = jax.random.normal(jax.random.key(0), (4, 2))


def _den():
    """A conditional linear denoiser (cond scales the noise estimate)."""
    return jdiff.denoiser(lambda x, t, c: 0.5 * x * (1.0 + 0.1 * c[:, None]), PROC, "eps")


# ------------------------------------------------------------- nfe with a grid
def test_nfe_that_disagrees_with_the_grid_raises():
    den = jdiff.denoiser(lambda x, t, c: 0.5 * x, PROC, "eps")
    grid = jdiff.time_grid(PROC, 10)
    with pytest.raises(ValueError, match=r"^nfe=17 disagrees with the grid: dpm\+\+2m makes 10 denoiser evaluations"):
        jdiff.sample(S.get("dpm++2m"), den, X, grid, nfe=17)
    with pytest.raises(ValueError, match=r"^nfe=17 disagrees with the grid: heun makes 20 denoiser evaluations"):
        jdiff.sample(S.heun(), den, X, grid, nfe=17)
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        jdiff.sample(S.ddim(), den, X, grid, nfe=2.5)
    # the NFE the grid gives, or the nfe the grid was built from, is accepted
    a = jdiff.sample(S.get("dpm++2m"), den, X, grid, nfe=10)
    np.testing.assert_array_equal(a, jdiff.sample(S.get("dpm++2m"), den, X, grid))
    for nfe in (10, 11):  # the grid time_grid builds for a budget: 5 steps of 2 calls
        g_heun = jdiff.time_grid(PROC, nfe=nfe, solver=S.heun())
        assert g_heun.shape == (6,)
        jdiff.sample(S.heun(), den, X, g_heun, nfe=nfe)
    # a singlestep solver spends the target on the grid (its own check refuses the impossible)
    _, info = jdiff.sample(S.get("dpm++3s"), den, X, jdiff.time_grid(PROC, 4), nfe=9, return_info=True)
    assert int(info.nfe) == 9
    with pytest.raises(ValueError, match="cannot spend exactly 13"):
        jdiff.sample(S.get("dpm++3s"), den, X, jdiff.time_grid(PROC, 4), nfe=13)
    # a traced grid: the target must fit one of its possible end cases
    with pytest.raises(ValueError, match="nfe=17 disagrees"):
        jax.jit(lambda g: jdiff.sample(S.ddim(), den, X, g, nfe=17))(grid)


# ------------------------------------------------------------- sharded jit
_SHARDED = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import jdiff
    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    proc = jdiff.vp_linear()
    den = jdiff.denoiser(lambda x, t, c: 0.5 * x, proc, "eps")
    run = jax.jit(lambda x: jnp.mean(jdiff.sample(jdiff.solvers.ddim(), den, x, nfe=3)))  # a collective after
    for row in (0, 3, 5, 7):  # the NaN on devices 0, 1, 2 and 3
        x = np.ones((8, 2), np.float32)
        x[row, 1] = np.nan
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        t0 = time.time()
        try:
            jax.block_until_ready(run(xs))
            print("no error", row)
            sys.exit(3)
        except jax.errors.JaxRuntimeError as e:
            print(f"row {row}: {time.time() - t0:.2f} s: {jdiff.check_message(e)}", flush=True)
        try:  # eagerly: checked before anything runs (only the reduced flag reaches the host)
            jdiff.sample(jdiff.solvers.ddim(), den, xs, nfe=3)
            sys.exit(4)
        except ValueError as e:
            print(f"eager {row}: {e}", flush=True)
    x = jax.device_put(np.ones((8, 2), np.float32), NamedSharding(mesh, P("data")))
    print("good input:", float(run(x)))
    """
)


def test_nan_x_T_in_a_sharded_jit_raises_on_the_caller_and_exits_normally():
    """Four fake devices, x_T sharded over them with one NaN row inside the caller's jit
    (a collective after the sampler): a Python exception carrying the check's message
    reaches the caller in seconds whichever device holds the NaN, and the process then
    exits normally (with equinox.error_if it hung in an all-reduce and aborted).
    Eagerly the sharded x_T is refused with ValueError before anything runs."""
    env = subprocess_env(devices=4)
    proc = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("row ")]
    assert len(lines) == 4, proc.stdout
    for ln in lines:
        seconds = float(ln.split(": ")[1].split(" s")[0])
        assert seconds < 10.0, ln
        assert ln.endswith("x_T of shape (8, 2) has non-finite values (NaN or inf)"), ln
    eager = [ln for ln in proc.stdout.splitlines() if ln.startswith("eager ")]
    assert len(eager) == 4 and all(ln.endswith("non-finite values (NaN or inf)") for ln in eager), proc.stdout
    assert "good input: " in proc.stdout
    assert "may be stuck" not in proc.stderr and "CheckFailed" not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------- traced scales
def _fails(fn, *args, match):
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(fn(*args))
    msg = jdiff.check_message(info.value)
    assert msg is not None and msg.startswith(match), (msg, str(info.value)[:300])


def test_traced_guidance_scale_that_is_not_finite_raises():
    den, c = _den(), jnp.arange(4, dtype=jnp.float32)

    def cfg(w):
        return jdiff.sample(S.ddim(), W.guidance(den, w, 0.0), X, nfe=3, cond=c)

    def auto(w):
        return jdiff.sample(S.ddim(), W.autoguidance(den, den, w), X, nfe=3, cond=c)

    def per_sample(w):
        return jdiff.sample(S.ddim(), W.guidance(den, jnp.ones(4).at[2].set(w), 0.0), X, nfe=3, cond=c)

    def sched(w):
        scale = W.schedule(jnp.asarray([1.0, 0.5, 0.0]), jnp.asarray([2.0, w, 1.0]))
        return jdiff.sample(S.ddim(), W.guidance(den, scale, 0.0), X, nfe=3, cond=c)

    def classifier(w):
        g = W.classifier_guidance(den, lambda x, t: jnp.stack([x[:, 0], -x[:, 0]], 1), w, labels=jnp.zeros(4, int))
        return jdiff.sample(S.ddim(), g, X, nfe=3, cond=c)

    for fn, match in (
        (cfg, "the guidance scale must be finite"),
        (auto, "the guidance scale must be finite"),
        (per_sample, "the guidance scale must be finite"),
        (classifier, "the guidance scale must be finite"),
        (sched, "a guidance scale must be finite"),
    ):
        run = jax.jit(fn)
        for bad in (np.nan, np.inf, -np.inf):  # before: 100% NaN samples
            _fails(run, jnp.float32(bad), match=match)
        # a finite traced scale gives the eager result (up to the rounding of w - 1,
        # folded as a constant eagerly: a few float32 roundings of values <= 100)
        np.testing.assert_allclose(run(jnp.float32(2.0)), fn(2.0), rtol=16 * EPS32, atol=16 * EPS32)


def test_traced_network_times_that_are_not_finite_raise():
    den = jdiff.denoiser(lambda x, t, c: 0.5 * x, PROC, "eps")
    grid = jdiff.time_grid(PROC, 4)

    def run(net):
        return jdiff.sample(S.ddim(), W.network_time(den, grid, net), X, grid)

    _fails(jax.jit(run), grid.at[1].set(jnp.nan), match="net_grid must be finite times in")
    _fails(jax.jit(run), grid.at[2].set(7.0), match="net_grid must be finite times in")
    np.testing.assert_allclose(jax.jit(run)(grid), run(grid), rtol=16 * EPS32, atol=16 * EPS32)


# ------------------------------------------------------------- messages
def test_check_message_under_jit_and_valueerror_eagerly():
    """Under the caller's jit a failed check is a JaxRuntimeError whose first line is
    XLA's; check_message returns the check's own line. Eagerly, a check that only the
    compiled program can make (labels inside the model) raises ValueError with it."""
    x = X.at[1, 0].set(jnp.nan)
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.block_until_ready(jax.jit(lambda x: jdiff.sample(S.ddim(), _den(), x, nfe=2, cond=jnp.ones(4)))(x))
    assert str(info.value).splitlines()[0].startswith("INTERNAL")
    assert jdiff.check_message(info.value) == "x_T of shape (4, 2) has non-finite values (NaN or inf)"
    assert jdiff.check_message(ValueError("other")) is None
    assert jdiff.check_message(jdiff.CheckFailed("mine")) == "mine"

    def apply(x, t, c):  # a model checking its own labels, as jdiff's models do
        c = jdiff._checks.error_if(c, (c < 0) | (c > 9), "class labels must lie in [0, 9]")
        return 0.5 * x * c[:, None]

    den = jdiff.denoiser(apply, PROC, "eps")
    with pytest.raises(ValueError, match=r"^class labels must lie in \[0, 9\]$"):
        jdiff.sample(S.ddim(), den, X, nfe=2, cond=jnp.asarray([0, 1, 12, 3]))
    # generate (eager, over all devices) reports the same check the same way
    with pytest.raises(ValueError, match=r"^class labels must lie in \[0, 9\]$"):
        jdiff.generate(S.ddim(), den, 4, X.shape[1:], nfe=2, cond=np.asarray([0, 1, 12, 3]))


def test_digits_model_out_of_range_labels_raise_valueerror():
    den, cfg = presets.pretrained("digits")
    x_T = jdiff.prior_sample(den.process, jax.random.key(0), (2, *cfg.data.shape))
    with pytest.raises(ValueError, match=r"^class labels must lie in \[0, 9\], or equal 10"):
        jdiff.sample(S.ddim(), den, x_T, nfe=1, cond=jnp.asarray([3, 11], jnp.int32))
