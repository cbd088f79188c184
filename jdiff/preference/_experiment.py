"""Preference and reward fine-tuning of the shipped digits model, one run per method.

Starts from the committed class-conditional digits U-Net (``presets.pretrained("digits")``)
and fine-tunes it so that samples drawn under a *prompt* (by default the unconditional
null label) score higher on a reward: the FD-digits classifier's probability of a target
class (``--reward class``), or the ink of the digit, a stroke-thickness score
(``--reward thickness``: the mean pixel intensity mapped to [0, 1]). Every method starts
from the same base parameters and sees data made from the base model's own samples (or,
for DDPO, from its current samples):

- ``dpo``: Diffusion-DPO on pairs (best / worst of two base samples per seed), LoRA
  adapters (rank 4) trained, the base held once as the frozen reference;
- ``mapo``: MaPO on the same pairs (reference-free, full fine-tuning);
- ``kto``: Diffusion-KTO on the unpaired candidates, the upper half by reward desirable;
- ``d3po``: D3PO on pairs of DDPM trajectories (step-wise, clipped ratios against the base);
- ``spo``: SPO on pairs of DDPM steps branched from one base state, ranked by the reward
  of each candidate's x0 prediction;
- ``ddpo``: DDPO, on-policy DDPM trajectories, per-condition advantages, clipped ratios;
- ``draft1``: DRaFT-1 (reward backprop through the last step, ``Truncated(1)``);
- ``draftlv``: DRaFT-LV (the last step re-noised twice);
- ``adjoint``: reward backprop through the whole sampler with ``Adjoint()``.

For each method it reports the mean reward of 256 samples before and after (the same
seeds, DPM-Solver++(2M) at NFE 10), the win rate of the fine-tuned model over the base
on those seeds, FD-digits of the samples against the 1797 real digits, and the wall
time of the fine-tuning (sampling its own data included). Results go to stdout and, with
``--out``, to a JSON file.

Run it as ``python experiments/preference_digits.py [options]`` or ``jdiff prefer
[options]`` (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jdiff
import jdiff.data
import jdiff.presets
from jdiff import preference as P
from jdiff import solvers as S
from jdiff import train as T

METHODS = ("dpo", "mapo", "kto", "d3po", "spo", "ddpo", "draft1", "draftlv", "adjoint")


def _positive(text: str) -> float:
    """``argparse`` type of ``--scale``: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def build_parser(p=None):
    """The options (added to ``p``, or a new parser)."""
    p = p or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--reward", choices=("class", "thickness"), default="class")
    p.add_argument("--target", type=int, default=3, help="target class of --reward class")
    p.add_argument("--prompt", default="null", help="'null' (unconditional) or a class label 0..9")
    p.add_argument("--eval", type=int, default=256, help="evaluation samples (same seeds for every model)")
    p.add_argument("--nfe", type=int, default=10, help="NFE of the evaluation sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=_positive, default=1.0, help="multiplies every method's number of updates")
    p.add_argument("--quick", action="store_true", help="tiny run (a smoke test; numbers meaningless)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def check_args(a):
    """The list of methods to run, after checking every option (ValueError naming it)."""
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown methods {bad}; choose from {','.join(METHODS)}")
    if not 0 <= a.target <= 9:
        raise ValueError(f"--target must be a class 0..9, got {a.target}")
    if a.prompt != "null" and not (a.prompt.isdigit() and 0 <= int(a.prompt) <= 9):
        raise ValueError(f"--prompt must be 'null' or a class 0..9, got {a.prompt!r}")
    if a.eval < 16 or a.nfe < 2 or not (math.isfinite(a.scale) and a.scale > 0):
        raise ValueError(
            f"--eval must be >= 16, --nfe >= 2 and --scale a finite number > 0, got {a.eval}, {a.nfe}, {a.scale}"
        )
    if a.out is not None:
        _check_out(a.out)
    return methods


def _check_out(out: str) -> None:
    """Refuse an ``--out`` that cannot be written, before any work (creates nothing)."""
    folder = os.path.dirname(os.path.abspath(out)) if out.strip() else ""
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not out.strip() or out.endswith(("/", os.sep)) or os.path.isdir(out):
        raise ValueError(f"--out must name a file, got {out!r}")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created: {folder} is not a writable directory")


class Setup:
    """Everything the methods share: the base model, the reward, the samplers."""

    def __init__(self, a):
        from jdiff.features.digits import digits_classifier

        den, cfg = jdiff.presets.pretrained("digits")
        self.den, self.params0 = den, den.params
        self.process = den.process
        self.num_classes = cfg.model.unet.num_classes
        o = cfg.objective
        self.loss_cfg = T.LossConfig(
            self.process, prediction=o.prediction, weighting=o.weighting, min_snr_gamma=o.min_snr_gamma
        )
        self.prompt = self.num_classes if a.prompt == "null" else int(a.prompt)
        self.shape = tuple(cfg.data.shape)
        clf = digits_classifier()
        self.clf = clf
        target = a.target
        if a.reward == "class":

            def reward(x, cond=None):
                return jax.nn.softmax(clf.apply(x)[1], axis=-1)[:, target]
        else:

            def reward(x, cond=None):
                return jnp.mean((jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0, axis=(1, 2, 3))

        self.reward = reward
        self.solver = S.dpm_solver_pp(2)
        self.grid = jdiff.time_grid(self.process, nfe=a.nfe, solver=self.solver)
        self.sde = S.ddpm()
        self.sde_grid = jdiff.time_grid(self.process, a.nfe)
        solver, grid, sde, sde_grid = self.solver, self.grid, self.sde, self.sde_grid

        @jax.jit
        def generate(params, x_T):
            cond = jnp.full((x_T.shape[0],), self.prompt, jnp.int32)
            x = jdiff.sample(solver, den.replace(params=params), x_T, grid, cond=cond)
            return x, reward(x)

        @jax.jit
        def trajectories(params, x_T, key):
            cond = jnp.full((x_T.shape[0],), self.prompt, jnp.int32)
            x, info = jdiff.sample(
                sde, den.replace(params=params), x_T, sde_grid, cond=cond, key=key, return_info=True, trajectory=True
            )
            return info.xs, reward(x)

        self.generate, self.trajectories = generate, trajectories
        self.x_eval = jdiff.prior_sample(self.process, jax.random.key(10_000 + a.seed), (a.eval, *self.shape))
        self.real = jdiff.data.digits()[0]

    def cond(self, n):
        return jnp.full((n,), self.prompt, jnp.int32)

    def evaluate(self, params, chunk=128):
        xs, rs = [], []
        for s in range(0, self.x_eval.shape[0], chunk):
            x, r = self.generate(params, self.x_eval[s : s + chunk])
            xs.append(np.asarray(x))
            rs.append(np.asarray(r))
        x, r = np.concatenate(xs), np.concatenate(rs)
        from jdiff.features.digits import fd_digits

        return r, fd_digits(x, self.real, self.clf)


def _adam(lr, clip=1.0):
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))


def _steps(n, a):
    return max(2, int(round(n * a.scale))) if not a.quick else 2


# ------------------------------------------------------------------ image-level


def base_pairs(st: Setup, a, n_pairs):
    """Two base samples per seed under the prompt, ranked by the reward."""
    key = jax.random.key(20_000 + a.seed)
    cands = []
    for k in range(2):
        x_T = jdiff.prior_sample(st.process, jax.random.fold_in(key, k), (n_pairs, *st.shape))
        x, r = st.generate(st.params0, x_T)
        cands.append((np.asarray(x), np.asarray(r)))
    xs = np.stack([c[0] for c in cands], 1)
    rs = np.stack([c[1] for c in cands], 1)
    return P.pairs_from_rewards(xs, rs, np.full((n_pairs,), st.prompt, np.int32)), xs, rs


def run_pairs(st: Setup, a, method):
    n_pairs = 32 if a.quick else 256
    pairs, xs, rs = base_pairs(st, a, n_pairs)
    batch = 16
    if method == "kto":
        flat_x, flat_r = xs.reshape(-1, *st.shape), rs.reshape(-1)
        data = P.LabelledSamples(flat_x, flat_r > np.median(flat_r), np.full((flat_x.shape[0],), st.prompt, np.int32))
        batch = 32
    else:
        data = pairs
    loader = P.preference_loader(data, batch, seed=a.seed, num_classes=st.num_classes + 1, shape=st.shape)
    apply = st.den.apply_fn
    if method == "dpo":  # LoRA adapters; the frozen base is the policy's base and the reference
        lora = P.lora_init(st.params0, 4, jax.random.key(a.seed))
        loss = P.make_preference_loss(
            apply, st.loss_cfg, "dpo", beta=2000.0, policy=lambda lo, base: P.lora_merge(base, lo)
        )
        params, opt, steps = lora, _adam(3e-3), _steps(120, a)
    elif method == "mapo":
        loss = P.make_preference_loss(apply, st.loss_cfg, "mapo", beta=0.1)
        params, opt, steps = st.params0, _adam(2e-5), _steps(80, a)
    else:
        loss = P.make_preference_loss(apply, st.loss_cfg, "kto", beta=2000.0)
        params, opt, steps = st.params0, _adam(2e-5), _steps(80, a)
    state = T.init_train_state(params, opt, a.seed, ema=False, frozen=st.params0)
    # the reference (frozen) is an argument of the compiled step, never copied or re-sent;
    # no donation: mapo/kto start from the very arrays of the base parameters
    step = T.make_train_step(loss, opt, ema_decay=None, donate=False)
    for _ in range(steps):
        state, m = step(state, next(loader))
    out = state.params
    if method == "dpo":
        out = jax.jit(P.lora_merge)(st.params0, out)
    return out, {k: float(v) for k, v in m.items()}


# -------------------------------------------------------------- trajectory-level


def run_d3po(st: Setup, a):
    n = 16 if a.quick else 96
    key = jax.random.key(30_000 + a.seed)
    trajs, rews = [], []
    for k in range(2):
        x_T = jdiff.prior_sample(st.process, jax.random.fold_in(key, k), (n, *st.shape))
        xs, r = st.trajectories(st.params0, x_T, jax.random.fold_in(key, 100 + k))
        trajs.append(xs)
        rews.append(r)
    w_first = rews[0] >= rews[1]
    sel = w_first[None, :, None, None, None]
    xw = jnp.where(sel, trajs[0], trajs[1])
    xl = jnp.where(sel, trajs[1], trajs[0])
    cond = st.cond(8)

    def lps(params, xs):
        return P.trajectory_log_probs(st.sde, st.den.replace(params=params), xs, st.sde_grid, cond=cond)

    opt = _adam(3e-5)

    @jax.jit
    def update(params, opt_state, xw, xl):
        ref_w, ref_l = lps(st.params0, xw), lps(st.params0, xl)

        def loss(p):
            return P.d3po_loss(lps(p, xw), lps(p, xl), ref_w, ref_l, beta=1.0, clip=0.2)

        (val, m), g = jax.value_and_grad(loss, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, m

    params, os_ = st.params0, opt.init(st.params0)
    rng = np.random.default_rng(a.seed)
    for _ in range(_steps(40, a)):
        i = rng.choice(n, 8, replace=False)
        params, os_, m = update(params, os_, xw[:, i], xl[:, i])
    return params, {k: float(v) for k, v in m.items()}


def run_spo(st: Setup, a):
    """Candidates branched from one DDPM state of a base trajectory at a random step,
    ranked by the reward of their x0 predictions (a step-aware preference)."""
    n = 16 if a.quick else 96
    key = jax.random.key(40_000 + a.seed)
    x_T = jdiff.prior_sample(st.process, key, (n, *st.shape))
    xs, _ = st.trajectories(st.params0, x_T, jax.random.fold_in(key, 1))
    N = xs.shape[0] - 1
    solver, grid = st.sde, st.sde_grid
    B = 8
    cond = st.cond(B)

    def state_at(x, i):
        s = solver.init(x, grid, st.process, key=jax.random.key(0))
        return s._replace(i=i)

    @jax.jit
    def branch(x_t, i, k):
        """Two candidates x_s from x_t under the base, and the reward of their x0 predictions."""
        new, std = solver.transition(st.den, state_at(x_t, i), cond)
        z = jax.random.normal(k, (2, *x_t.shape))
        cands = new.x[None] + std * z
        t_s = grid[i + 1]
        r = jnp.stack([st.reward(st.den(c, t_s, cond).x0) for c in cands])
        win = r[0] >= r[1]
        sel = win[:, None, None, None]
        return jnp.where(sel, cands[0], cands[1]), jnp.where(sel, cands[1], cands[0])

    def lp(params, x_t, i, x_s):
        return P.transition_log_prob(solver, st.den.replace(params=params), state_at(x_t, i), x_s, cond)[0]

    opt = _adam(3e-5)

    @jax.jit
    def update(params, opt_state, x_t, i, xw, xl):
        ref_w, ref_l = lp(st.params0, x_t, i, xw), lp(st.params0, x_t, i, xl)

        def loss(p):
            return P.spo_loss(lp(p, x_t, i, xw), lp(p, x_t, i, xl), ref_w, ref_l, beta=1.0, clip=0.2)

        (val, m), g = jax.value_and_grad(loss, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, m

    params, os_ = st.params0, opt.init(st.params0)
    rng = np.random.default_rng(a.seed)
    for s in range(_steps(60, a)):
        i = int(rng.integers(0, N - 1))  # not the last step (its std is tiny)
        rows = rng.choice(n, B, replace=False)
        x_t = xs[i, rows]
        xw, xl = branch(x_t, jnp.int32(i), jax.random.fold_in(key, 1000 + s))
        params, os_, m = update(params, os_, x_t, jnp.int32(i), xw, xl)
    return params, {k: float(v) for k, v in m.items()}


# lr 1e-4 with 64 samples moved the policy too far in one step (at the second update of
# the first round: mean ratio 1.19, approx. KL 0.27 per transition, 68% of the ratios
# clipped), so the defaults stay those of the first version (32 samples, lr 3e-5)
DDPO = {"samples": 32, "rounds": 12, "updates": 2, "lr": 3e-5, "clip": 1e-2, "adv_clip": 5.0}


def run_ddpo(st: Setup, a, **over):
    """DDPO (Black et al., ICLR 2024, Sec. 4.3): each round samples fresh DDPM
    trajectories from the current policy, normalizes their rewards into advantages (one
    group: every sample shares the prompt), clips them to +-``adv_clip`` and takes
    ``updates`` Adam steps of the clipped surrogate on the whole batch.

    The first step of a round is exactly on-policy: its reference log-probabilities are
    the policy's own, computed in the same program and held constant, so every ratio is
    exactly 1 and the step is the REINFORCE gradient ``-A grad log p``. The later steps
    of the round compare against those first-step log-probabilities (the same compiled
    program, so the ratio moves only with the parameters, not with float32 differences
    between the sampler's program and the gradient's)."""
    c = {**DDPO, **over}
    B = 8 if a.quick else c["samples"]
    opt = _adam(c["lr"])
    cond = st.cond(B)
    key = jax.random.key(50_000 + a.seed)

    def lps(params, xs):
        return P.trajectory_log_probs(st.sde, st.den.replace(params=params), xs, st.sde_grid, cond=cond)

    @jax.jit
    def update(params, opt_state, xs, old, adv, on_policy):
        def loss(p):
            # the last grid interval has a tiny noise scale (std ~ 1e-3): its log-density's
            # gradient is ~1/std larger than the other steps' and would swamp them under
            # global-norm clipping, so it is left out of the surrogate
            lp = lps(p, xs)[:-1]
            ref = jnp.where(on_policy, jax.lax.stop_gradient(lp), old)  # ddpo_loss(lp, None) when on-policy
            val, m = P.ddpo_loss(lp, ref, adv, clip=c["clip"])
            return val, (m, jax.lax.stop_gradient(lp))

        (val, (m, lp)), g = jax.value_and_grad(loss, has_aux=True)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, m, lp

    params, os_ = st.params0, opt.init(st.params0)
    rounds = _steps(c["rounds"], a)
    rewards = []
    for rnd in range(rounds):
        k = jax.random.fold_in(key, rnd)
        x_T = jdiff.prior_sample(st.process, k, (B, *st.shape))
        xs, r = st.trajectories(params, x_T, jax.random.fold_in(k, 1))
        rewards.append(float(jnp.mean(r)))
        adv = jnp.clip(P.normalize_advantages(r, cond), -c["adv_clip"], c["adv_clip"])
        old = jnp.zeros((xs.shape[0] - 2, B), jnp.float32)
        for u in range(c["updates"]):
            params, os_, m, lp = update(params, os_, xs, old, adv, jnp.bool_(u == 0))
            if u == 0:
                old = lp
        if c.get("log"):
            c["log"](rnd, rewards[-1], {k: float(v) for k, v in m.items()})
    out = {k: float(v) for k, v in m.items()}
    out["train_reward_first_round"], out["train_reward_last_round"] = rewards[0], rewards[-1]
    return params, out


# ------------------------------------------------------------ reward backprop


def run_backprop(st: Setup, a, method):
    B = 4 if a.quick else 16
    cond = st.cond(B)
    key = jax.random.key(60_000 + a.seed)
    if method == "adjoint":
        B = 4 if a.quick else 8
        cond = st.cond(B)
        solver, grid = st.solver, jdiff.time_grid(st.process, nfe=6, solver=st.solver)
        lr, steps = 1e-5, _steps(15, a)
    else:
        solver, grid = st.solver, st.grid
        lr, steps = 1e-5, _steps(40, a)
    opt = _adam(lr)

    def loss(p, x_T, k):
        den = st.den.replace(params=p)
        if method == "draft1":
            return P.reward_loss(st.reward, solver, den, x_T, grid, cond=cond, gradient=jdiff.Truncated(1))
        if method == "draftlv":
            return P.draft_lv_loss(st.reward, solver, den, x_T, grid, k, cond=cond, n=2)
        return P.reward_loss(st.reward, solver, den, x_T, grid, cond=cond, gradient=jdiff.Adjoint())

    @jax.jit
    def update(params, opt_state, x_T, k):
        (val, m), g = jax.value_and_grad(loss, has_aux=True)(params, x_T, k)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, m

    params, os_ = st.params0, opt.init(st.params0)
    for s in range(steps):
        k = jax.random.fold_in(key, s)
        x_T = jdiff.prior_sample(st.process, k, (B, *st.shape))
        params, os_, m = update(params, os_, x_T, jax.random.fold_in(k, 1))
    return params, {k: float(v) for k, v in m.items()}


def run_method(st, a, method):
    if method in ("dpo", "mapo", "kto"):
        return run_pairs(st, a, method)
    if method == "d3po":
        return run_d3po(st, a)
    if method == "spo":
        return run_spo(st, a)
    if method == "ddpo":
        return run_ddpo(st, a)
    return run_backprop(st, a, method)


def main(argv=None):
    """Parse ``argv`` and :func:`run_all`; returns the results dict."""
    a = build_parser().parse_args(argv)
    return run_all(a, check_args(a))


def run_all(a, methods):
    """Evaluate the base model, fine-tune with each method, evaluate each; print a table
    and write ``a.out`` (JSON) when given. Returns ``{method: results}``."""
    if a.quick:
        a.eval = min(a.eval, 32)
    t0 = time.perf_counter()
    st = Setup(a)
    r0, fd0 = st.evaluate(st.params0)
    print(
        f"preference fine-tuning of the digits model: reward {a.reward}"
        + (f" (class {a.target})" if a.reward == "class" else "")
        + f", prompt {a.prompt}, {a.eval} evaluation samples (dpm++2m NFE {a.nfe})",
        flush=True,
    )
    setup_s = time.perf_counter() - t0
    print(f"base: mean reward {r0.mean():.4f}, FD-digits {fd0:.3f} (setup + evaluation {setup_s:.1f} s)")
    rows = {"base": {"reward": float(r0.mean()), "fd_digits": fd0}}
    head = ("method", "reward before", "after", "win rate", "FD-digits", "x base", "wall s")
    widths = (8, 13, 8, 9, 10, 7, 7)
    print(" ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for method in methods:
        t1 = time.perf_counter()
        params, metrics = run_method(st, a, method)
        params = jax.block_until_ready(params)
        wall = time.perf_counter() - t1
        r1, fd1 = st.evaluate(params)
        win = float(np.mean(r1 > r0) + 0.5 * np.mean(r1 == r0))
        rows[method] = {
            "reward_before": float(r0.mean()),
            "reward_after": float(r1.mean()),
            "win_rate": win,
            "fd_digits": fd1,
            "fd_ratio": fd1 / fd0,
            "wall_s": wall,
            "last_metrics": metrics,
        }
        print(
            f"{method:8s} {r0.mean():13.4f} {r1.mean():8.4f} {win:9.3f} {fd1:10.3f} {fd1 / fd0:7.2f} {wall:7.1f}",
            flush=True,
        )
    if a.out:
        # the options only (a command line's namespace also holds its functions)
        options = {k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, type(None)))}
        text = json.dumps({"args": options, "results": rows}, indent=2)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return rows
