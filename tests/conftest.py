"""Shared fixtures: scoped float64, the solver zoo and small exact testbeds."""

from __future__ import annotations

import os
import shutil
import tempfile

# Compilation dominates this suite (hundreds of small programs, each run a few times), so
# XLA's optimization passes cost more than they save: measured on 2 cores, the training
# tests take 40% and the solver tests 25% less CPU time without them. Results are the same
# up to floating-point reassociation, which every tolerance here already allows for.
# Subprocesses inherit the setting. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# XLA's older CPU loop emitters compile these programs about twice as fast (jdiff/_xla.py),
# and its backend optimization level 0 faster again (_train_worker.TEST_XLA_FLAG).
from _train_worker import prefer_fast_test_compile  # noqa: E402

prefer_fast_test_compile()

# One persistent compilation cache for the whole run, shared by the xdist workers and the
# subprocesses they start (they inherit the environment set here in the controller): a
# program that several test files or processes compile is compiled once (measured on 2
# cores: 5% less CPU for the suite). The directory is the run's own and removed at the end;
# a cache the caller configured is used and left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"jdiff-tests-xla-{os.getpid()}")
    os.environ["JDIFF_TESTS_OWN_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jdiff import solvers as S  # noqa: E402

# The CLI turns on JAX's persistent compilation cache; in-process CLI tests would turn it
# on for the whole test process (and write every later program to disk). Tests that
# exercise the cache set their own JDIFF_CACHE_DIR.
os.environ.setdefault("JDIFF_CACHE_DIR", "off")

# Unit roundoff scales for tolerances: every float32 tolerance in the suite is a multiple of
# EPS32 justified by the computation (steps, reduction length, magnitude of the values), so
# that it holds on any x86 CPU whatever XLA's vectorization does, not just the one it was
# written on.
EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
EPS64 = float(np.finfo(np.float64).eps)  # 2.22e-16
NSIGMA = 5  # statistical checks: 5 standard errors (two-sided p ~ 6e-7 per checked quantity)


@pytest.fixture(scope="module")
def x64():
    """Run a module's tests (and its module fixtures that request this) in float64."""
    with jax.enable_x64(True):
        yield


# Solvers that are proven identical to another one by tests/test_solvers.py (to float64
# rounding) and so need no separate convergence run.
EQUIVALENT = {
    "euler(rho)",
    "dpm_solver-1",
    "dpm_solver++(1)",
    "deis-1",
    "unip-1",
    "unip-2",
    "unip-3",
    "deis-3(log_rho)",
    "ipndm_v-3",
}


def deterministic_zoo():
    """name -> (solver, order of convergence it must show on smooth problems)."""
    return {
        "ddim": (S.ddim(), 1),
        "euler(t)": (S.euler(), 1),
        "euler(rho)": (S.euler("rho"), 1),
        "heun(t)": (S.heun(), 2),
        "heun(rho)": (S.heun("rho"), 2),
        "dpm_solver-1": (S.dpm_solver(1), 1),
        "dpm_solver-2": (S.dpm_solver(2), 2),
        "dpm_solver-3": (S.dpm_solver(3), 3),
        "dpm_solver-2M": (S.dpm_solver(2, method="multistep"), 2),
        "dpm_solver-3M": (S.dpm_solver(3, method="multistep"), 3),
        "dpm_solver++(1)": (S.dpm_solver_pp(1), 1),
        "dpm_solver++(2S)": (S.dpm_solver_pp(2, method="singlestep"), 2),
        "dpm_solver++(3S)": (S.dpm_solver_pp(3, method="singlestep"), 3),
        "dpm_solver++(2M)": (S.dpm_solver_pp(2), 2),
        "dpm_solver++(2M,heun)": (S.dpm_solver_pp(2, solver_type="heun"), 2),
        "dpm_solver++(3M)": (S.dpm_solver_pp(3), 3),
        "deis-1": (S.deis(1), 1),
        "deis-2(t)": (S.deis(2), 2),
        "deis-3(t)": (S.deis(3), 3),
        "deis-3(rho)": (S.deis(3, basis="rho"), 3),
        "deis-3(log_rho)": (S.deis(3, basis="log_rho"), 3),
        "unip-1": (S.unipc(1, corrector=False), 1),
        "unip-2": (S.unipc(2, corrector=False), 2),
        "unip-3": (S.unipc(3, corrector=False), 3),
        "unipc-1(bh1)": (S.unipc(1, variant="bh1"), 2),
        "unipc-2(bh1)": (S.unipc(2, variant="bh1"), 3),
        "unipc-1(bh2)": (S.unipc(1), 2),
        "unipc-2(bh2)": (S.unipc(2), 3),
        "unipc-3(bh2)": (S.unipc(3), 4),
        "ipndm-2": (S.ipndm(2), 2),
        "ipndm-3": (S.ipndm(3), 2),  # fixed-step coefficients: order 2 on graded grids
        "ipndm-4": (S.ipndm(4), 2),
        "ipndm_v-3": (S.ipndm(3, variable_step=True), 3),
        "ipndm_v-4": (S.ipndm(4, variable_step=True), 4),
    }


def stochastic_zoo():
    return {
        "ddim(eta=0.5)": S.ddim(eta=0.5),
        "ddpm": S.ddpm(),
        "sde_dpm_solver++(1)": S.sde_dpm_solver_pp(1),
        "sde_dpm_solver++(2M)": S.sde_dpm_solver_pp(2),
        "euler_maruyama": S.euler_maruyama(),
    }


def assert_moments_match(x, mean, cov, nsigma=NSIGMA, bias=0.0):
    """Sample mean and covariance of ``x`` (``(n, d)``) equal ``mean`` and ``cov`` within
    ``nsigma`` standard errors computed from the sample itself (plus an absolute ``bias``
    allowance for a method's known systematic error).

    Standard error of the mean of coordinate i: ``std_i / sqrt(n)``; of the covariance
    entry (i, j): ``std((x_i - m_i)(x_j - m_j)) / sqrt(n)`` (the delta method for a mean
    of products; the n - 1 normalization is below the noise).
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = x.shape[0]
    m = x.mean(0)
    xc = x - m
    prod = xc[:, :, None] * xc[:, None, :]
    c = prod.sum(0) / (n - 1)
    se_m = x.std(0) / np.sqrt(n)
    se_c = prod.std(0) / np.sqrt(n)
    zm = np.abs(m - np.asarray(mean)) / (nsigma * se_m + bias)
    zc = np.abs(c - np.asarray(cov)) / (nsigma * se_c + bias)
    assert np.all(zm <= 1), f"mean {m} vs {mean}: |diff| / ({nsigma} se + {bias}) = {zm}"
    assert np.all(zc <= 1), f"cov {c} vs {cov}: |diff| / ({nsigma} se + {bias}) = {zc}"


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's own compilation cache (on the controller, or a run without xdist)."""
    own = os.environ.get("JDIFF_TESTS_OWN_XLA_CACHE")
    if own and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(own, ignore_errors=True)


# The files that take longest (measured on 2 cores; each runs whole on one xdist worker,
# `--dist loadfile`) are handed out first, so that the run does not end with one worker
# busy with a long file while the other idles.
LONG_FILES_FIRST = (
    "test_run_failures.py",
    "test_kill_resume.py",
    "test_train_parallel.py",
    "test_interop_e2e.py",
    "test_robustness.py",
    "test_solvers.py",
    "test_models.py",
    "test_solvers_low_nfe.py",
    "test_posterior_engine.py",
    "test_run_lock.py",
    "test_cli_runs.py",
    "test_cli.py",
    "test_accelerate_cache.py",
    "test_train_checkpoint.py",
    "test_lr_extension.py",
    "test_adjoint.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    # a stable sort: the order inside a file, and of the other files, is kept
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
