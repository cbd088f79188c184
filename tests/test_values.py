"""Solvers, wrappers and denoisers are values: equal settings give equal, hashable
objects, and sampling with freshly built equal ones compiles once."""

import jax.numpy as jnp
import pytest

import jdiff
from jdiff import solvers as S
from jdiff import wrappers as W
from jdiff._sample import _run

PROC = jdiff.vp_linear()


def _net(x, t):
    return 0.5 * x * t[:, None]


def _fresh_denoiser():
    # a new lambda object every call, from one definition: must compare equal
    return jdiff.denoiser(lambda x, t, c: _net(x, t), PROC, "eps")


class _Compiles:
    """New entries in the cache of the sampler's internal jit (``_run``)."""

    def __enter__(self):
        self.start = _run._cache_size()
        return self

    @property
    def count(self):
        return _run._cache_size() - self.start

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", S.names())
def test_registry_names_round_trip(name):
    s = S.get(name)
    assert s.name == name  # every registry name is canonical
    assert S.get(s.name) == s and hash(S.get(s.name)) == hash(s)
    assert S.get(name) is not s  # a fresh object, equal by value


def test_settings_beyond_the_name_round_trip():
    for s in [
        S.ddim(eta=0.25),
        S.dpm_solver_pp(2, solver_type="heun"),
        S.dpm_solver(3, lower_order_final=False),
        S.unipc(2, prediction="noise", lower_order_final=False),
        S.deis(2, basis="rho", lower_order_final=False),
        S.ipndm(3, variable_step=True, lower_order_final=True),
        S.sde_dpm_solver_pp(2, solver_type="heun"),
    ]:
        assert S.get(s.name) == s, s.name
    assert S.get("unipc3-bh2") == S.unipc(3) and S.get("ddim", eta=1.0) == S.ddpm()


def test_equal_settings_equal_values_different_settings_differ():
    assert S.unipc(2) == S.unipc(2) and hash(S.unipc(2)) == hash(S.unipc(2))
    assert S.unipc(2) != S.unipc(3) and S.unipc(2) != S.unipc(2, variant="bh1")
    assert S.deis(3) == S.deis(3) and S.deis(3) != S.deis(3, basis="rho")
    assert S.ddim(0.0) == S.ddim(0) and S.ddim(0.5) != S.ddim(0.25)
    assert len({S.heun(), S.heun(), S.heun("rho"), S.euler()}) == 3
    d1, d2 = _fresh_denoiser(), _fresh_denoiser()
    assert d1.apply_fn is not d2.apply_fn and d1 == d2 and hash(d1) == hash(d2)
    g1, g2 = W.guidance(d1, jnp.asarray(2.0), 0), W.guidance(d2, jnp.asarray(2.0), 0)
    assert g1 == g2 and hash(g1) == hash(g2)
    assert W.guidance(d1, 3.0, 0) != g1  # a different scale (a leaf) is a different value ...
    assert hash(W.guidance(d1, 3.0, 0)) == hash(g1)  # ... with the same static part
    assert W.static_threshold(d1) == W.static_threshold(d2)
    assert W.static_threshold(d1) != W.static_threshold(d1, -2.0, 2.0)
    assert W.dynamic_threshold(d1, 0.9) == W.dynamic_threshold(d2, 0.9) != W.dynamic_threshold(d1, 0.99)


def test_denoiser_functions_compare_by_definition_and_closure():
    def make(scale):
        return jdiff.denoiser(lambda x, t, c: scale * x, PROC, "eps")

    a, b = jnp.ones(()), jnp.ones(())
    assert make(a) == make(a)  # same closure contents (by identity)
    assert make(a) != make(b)  # equal values but different objects: not assumed equal
    assert make(2.0) != make(3.0)
    assert jdiff.denoiser(lambda x, t, c: x, PROC) != jdiff.denoiser(lambda x, t, c: -x, PROC)


def test_fresh_equal_solvers_denoisers_and_wrappers_compile_once():
    x_T = jnp.ones((2, 7))  # a shape no other test uses: the first call compiles
    with _Compiles() as c:
        for _ in range(3):
            jdiff.sample(S.unipc(2), _fresh_denoiser(), x_T, nfe=6)
        assert c.count == 1
        jdiff.sample(S.unipc(3), _fresh_denoiser(), x_T, nfe=6)  # another setting: compiles
        assert c.count == 2
    with _Compiles() as c:
        for scale in (2.0, 2.0, 3.0):  # the scale is data: no new compile for a new value
            guided = W.guidance(W.static_threshold(_fresh_denoiser()), jnp.asarray(scale), 0.0)
            jdiff.sample(S.unipc(2), guided, x_T, nfe=6, cond=jnp.ones(2))
        assert c.count == 1
        guided = W.guidance(W.static_threshold(_fresh_denoiser(), -2.0, 2.0), jnp.asarray(2.0), 0.0)
        jdiff.sample(S.unipc(2), guided, x_T, nfe=6, cond=jnp.ones(2))  # another threshold: compiles
        assert c.count == 2
