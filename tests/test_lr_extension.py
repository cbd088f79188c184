"""Continuing a run with a changed total step count: the learning-rate schedule goes on
from where it was (jdiff.train.lr_schedule(..., extensions=...)), without a jump."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdiff import train as T

PEAK, FINAL, WARM, TOTAL = 2e-3, 1e-5, 100, 1500


def _values(sched, n):
    return np.asarray(jax.vmap(sched)(jnp.arange(n)), np.float64)


def _check_continuous_and_monotone(orig, ext, at, new_total):
    o, e = _values(orig, at + 1), _values(ext, new_total + 50)
    # up to and including at_step (the lr of the first update after the change) the
    # extended schedule is the original one
    np.testing.assert_allclose(e[: at + 1], o[: at + 1], rtol=1e-6)
    # no jump: the change across at_step is no larger than the original's last change or
    # the steepest slope of a cosine over the new remaining steps
    bound = max(abs(o[at] - o[at - 1]), (PEAK - FINAL) * np.pi / (2 * (new_total - at)))
    assert abs(e[at + 1] - e[at]) <= bound * 1.001
    # monotone decay to final_lr at the new total, then constant
    tail = e[at:]
    assert np.all(np.diff(tail) <= 1e-6 * PEAK)
    np.testing.assert_allclose(e[new_total:], FINAL, rtol=1e-5)
    assert e[new_total - 1] > FINAL or o[at] <= FINAL * (1 + 1e-6)


def test_without_extensions_unchanged_bit_for_bit():
    plain = optax.warmup_cosine_decay_schedule(0.0, PEAK, WARM, TOTAL, FINAL)
    for sched in (
        T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL),
        T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL, extensions=()),
    ):
        np.testing.assert_array_equal(_values(sched, TOTAL + 10), _values(plain, TOTAL + 10))


@pytest.mark.parametrize("at,new_total", [(1000, 3000), (1000, 1200), (700, 1500)])
def test_extension_mid_run_is_continuous_and_decays_to_final(at, new_total):
    orig = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL)
    ext = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL, extensions=[(at, new_total)])
    _check_continuous_and_monotone(orig, ext, at, new_total)
    if new_total == TOTAL:  # "extending" to the same total re-plans the same cosine
        np.testing.assert_allclose(_values(ext, 1600), _values(orig, 1600), rtol=2e-5)


def test_extension_of_a_finished_run_stays_at_final_lr():
    # The case of the issue: a finished cosine run continued to 3000 restarted at 1.05e-3.
    orig = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL)
    ext = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL, extensions=[(TOTAL, 3000)])
    e = _values(ext, 3001)
    np.testing.assert_allclose(e[TOTAL:], FINAL, rtol=1e-6)
    np.testing.assert_array_equal(e[:TOTAL], _values(orig, TOTAL))


def _sched(*exts):
    return T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL, extensions=exts)


def test_extensions_chain():
    exts = [(600, 2000), (1200, 4000), (1200, 3000), (2500, 2600)]
    sched = _sched(*exts)
    e = _values(sched, 3000)
    prev = _sched(*exts[:1])
    _check_continuous_and_monotone(_sched(), prev, 600, 2000)
    # the second and third change are at the same step: the later one wins
    mid = _sched((600, 2000), (1200, 3000))
    np.testing.assert_allclose(e[:2500], _values(mid, 2500), rtol=1e-6)
    _check_continuous_and_monotone(prev, mid, 1200, 3000)
    _check_continuous_and_monotone(mid, sched, 2500, 2600)
    assert np.all(np.diff(e[WARM:]) <= 1e-6 * PEAK)


def test_extension_during_warmup_moves_the_end_of_the_decay():
    ext = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, final_lr=FINAL, extensions=[(50, 3000)])
    plain = T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=3000, final_lr=FINAL)
    np.testing.assert_array_equal(_values(ext, 3100), _values(plain, 3100))


def test_constant_schedule_stays_constant_and_bad_extensions_are_rejected():
    c = T.lr_schedule(PEAK, warmup_steps=10, extensions=[(500, 2000)])
    np.testing.assert_array_equal(_values(c, 100), _values(T.lr_schedule(PEAK, warmup_steps=10), 100))
    for bad in ([(100, 100)], [(900, 2000), (800, 3000)], [(-1, 10)]):
        with pytest.raises(ValueError, match="extension"):
            T.lr_schedule(PEAK, warmup_steps=WARM, total_steps=TOTAL, extensions=bad)
    with pytest.raises(ValueError, match="float learning_rate"):
        T.make_optimizer(optax.constant_schedule(1e-3), extensions=[(1, 5)])


def test_optimizer_state_of_the_original_schedule_continues_with_the_extended_one():
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    kw = dict(warmup_steps=5, total_steps=20, final_lr=1e-4, clip_norm=None)
    orig = T.make_optimizer(1e-2, **kw)
    ext = T.make_optimizer(1e-2, extensions=[(20, 40)], **kw)
    grad = lambda p, i: jax.tree.map(lambda w: jnp.sin(w * (i + 1)), p)  # noqa: E731

    def run(tx, p, state, steps):
        for i in steps:
            u, state = tx.update(grad(p, i), state, p)
            p = optax.apply_updates(p, u)
        return p, state

    p20, s20 = run(orig, params, orig.init(params), range(20))
    # the state is the same pytree, and the extended optimizer computes the same first 20 steps
    q20, r20 = run(ext, params, ext.init(params), range(20))
    assert jax.tree.structure(s20) == jax.tree.structure(r20)
    np.testing.assert_allclose(np.asarray(q20["w"]), np.asarray(p20["w"]), rtol=1e-6)
    p25, _ = run(ext, p20, s20, range(20, 25))
    q25, _ = run(ext, q20, r20, range(20, 25))
    np.testing.assert_allclose(np.asarray(p25["w"]), np.asarray(q25["w"]), rtol=1e-6)
    # and it moved at the extended schedule's learning rate (final_lr here), not a restarted one
    step_size = np.max(np.abs(np.asarray(p25["w"]) - np.asarray(p20["w"])))
    assert 0 < step_size < 5 * 5 * 1e-4
