r"""Preference losses as pure functions of the model's and the reference's predictions.

Every loss takes per-sample quantities the caller computed with the policy and a frozen
reference (denoising errors for the image-level losses, transition log-probabilities
for the trajectory losses) and returns ``(loss, metrics)``: a scalar to minimize and a
dict of batch means. :func:`make_preference_loss` turns them into a ``loss_fn(params,
batch, keys, frozen=...)`` for :func:`jdiff.train.train_step`, built on the public
noising seam :func:`jdiff.train.noise_batch` (the winner and the loser of a pair get the
same time and noise).

Sign conventions. The denoising error ``L = mean_features (F(x_t, t) - target)^2`` of a
sample stands in for its negative log-likelihood (the ELBO, up to a weighting, Ho et
al. 2020), so the implicit log-ratio of the policy to the reference on a sample is

    u(x) = -c (L_theta(x) - L_ref(x)),     c = 1/2 (``half=True``) or 1,

and the implicit reward is ``beta * u``. Every loss is written on ``u``.

References:
  Rafailov et al., "Direct Preference Optimization", NeurIPS 2023 (DPO).
  Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
    CVPR 2024 (Diffusion-DPO).
  Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", AISTATS 2024 (IPO); Zhao et al., "SLiC-HF", 2023 (the hinge loss).
  Hong et al., "Margin-aware Preference Optimization for Aligning Diffusion Models
    without Reference", 2024 (MaPO).
  Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", ICML
    2024; Li et al., "Aligning Diffusion Models by Optimizing Human Utility", NeurIPS
    2024 (Diffusion-KTO).
  Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward
    Model", CVPR 2024 (D3PO).
  Liang et al., "Step-aware Preference Optimization: Aligning Preference with Denoising
    Performance at Each Step", 2024 (SPO).
  Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024 (DDPO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "DPO_KINDS",
    "per_sample_error",
    "diffusion_dpo_loss",
    "mapo_loss",
    "kto_loss",
    "stepwise_dpo_loss",
    "d3po_loss",
    "spo_loss",
    "ddpo_loss",
    "normalize_advantages",
]

DPO_KINDS = ("sigmoid", "hinge", "ipo")


def _positive(name, value):
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _same_shape(**arrays):
    shapes = {k: jnp.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"expected per-sample (B,) arrays of one shape, got {shapes}")


def per_sample_error(out, target):
    """``mean_features (out - target)^2`` per sample: ``(B,)``, at least float32."""
    out, target = jnp.asarray(out), jnp.asarray(target)
    dt = jnp.result_type(out.dtype, target.dtype, jnp.float32)
    d = out.astype(dt) - target.astype(dt)
    return jnp.mean(jnp.square(d).reshape(d.shape[0], -1), axis=1)


def _accuracy(margin):
    """Fraction of positive margins, a tie counting one half (0.5 when policy == reference)."""
    return jnp.mean((margin > 0).astype(margin.dtype) + 0.5 * (margin == 0).astype(margin.dtype))


def diffusion_dpo_loss(err_w, err_l, ref_err_w, ref_err_l, *, beta: float = 5000.0, half: bool = True, kind="sigmoid"):
    r"""Diffusion-DPO (Wallace et al., CVPR 2024, Eq. 14) and its hinge and IPO variants.

    With ``u_w, u_l`` the implicit log-ratios of winner and loser (module docstring),
    ``h = u_w - u_l = -c ((L_w - L_l) - (Lref_w - Lref_l))`` and the implicit reward
    margin ``m = beta h``:

    - ``"sigmoid"``: ``-log sigmoid(m) = -log sigmoid(-c beta ((L_w - L_l) - (Lref_w -
      Lref_l)))``, the form of the public Diffusion-DPO code (errors averaged over the
      features, ``c = 1/2`` with ``half=True``): the paper's Eq. 14 with a rescaled
      ``beta`` (below);
    - ``"hinge"``: ``max(0, 1 - m)`` (SLiC-HF's hinge on DPO's margin);
    - ``"ipo"``: ``(h - 1 / (2 beta))^2`` (IPO, Azar et al. 2024; ``beta`` is its ``tau``
      inverse, as in DPO's ``beta``).

    The beta convention: public Diffusion-DPO code multiplies by ``-beta/2`` with
    ``beta = 5000`` for Stable Diffusion 1.5 (``half=True``, the default here); the same
    objective written without the 1/2 uses ``beta = 2500`` (``half=False``). The two
    spellings give the identical loss: ``(beta, half=True) == (beta/2, half=False)``.

    Relation to the paper's Eq. 14. With ``S = ||eps - eps_theta(x_t, t)||_2^2`` summed
    over the ``D`` dimensions of a sample (``Sref`` the same for the reference), Eq. 14 is

        -E_{(x0^w, x0^l), t ~ U(0, T), x_t^w ~ q(x_t|x0^w), x_t^l ~ q(x_t|x0^l)}
            log sigmoid(-beta_14 T omega(lambda_t) ((S_w - Sref_w) - (S_l - Sref_l))),

    ``omega(lambda_t)`` a weighting (constant in the paper's practice). Here
    ``L = w(t) S / D``: :func:`per_sample_error` is a mean over the dimensions, and
    ``w(t)`` the training weighting of :func:`jdiff.preference.make_preference_loss`
    (1 for an eps-prediction without weighting). So ``m = -(c beta w(t) / D)
    ((S_w - Sref_w) - (S_l - Sref_l))``, and the loss of a pair is Eq. 14's integrand
    exactly when

        beta_14 T omega(lambda_t) = c beta w(t) / D:

    with ``half=True`` and ``w = 1``, ``beta`` here is ``2 D T omega beta_14``. (Stable
    Diffusion 1.5's 4x64x64 latents have ``D = 16384``, so the public ``beta = 5000`` is
    ``beta_14 T omega = 0.153``.) The expectation: the loss is the batch mean over
    pairs, one draw of ``(t, eps)`` per pair, so an unbiased estimate of an expectation
    over pairs, times and noise, with ``t`` from the training time sampler: Eq. 14's
    when that sampler is uniform. Another sampler ``p(t)`` gives the expectation over
    ``p(t)``, which no ``omega`` reproduces (``omega`` sits inside the log-sigmoid, a
    density of ``t`` outside it). The winner and the loser of a pair share ``t`` and
    the noise ``eps`` (:func:`jdiff.preference.make_preference_loss`, as the public
    code), where Eq. 14 writes separate draws of ``x_t^w`` and ``x_t^l``: sharing is
    one coupling of those draws. The Jensen step that yields Eq. 14 holds for every
    coupling, so both are upper bounds of the same objective (the one before that
    step), but with different values, since ``log sigmoid`` is not linear.

    Args:
      err_w, err_l: ``(B,)`` per-sample denoising errors of the policy on winners and
        losers at the same ``(t, eps)`` (:func:`per_sample_error`).
      ref_err_w, ref_err_l: the same for the frozen reference.
      beta: the KL strength (> 0); half: the 1/2 convention; kind: one of
        :data:`DPO_KINDS`.

    Returns:
      ``(loss, metrics)``: metrics ``loss``, ``implicit_acc`` (fraction of pairs with
      ``m > 0``, ties one half), ``reward_margin`` (mean ``m``), ``reward_win``,
      ``reward_lose`` (mean ``beta u``).

    Raises:
      ValueError: shapes that are not one ``(B,)``, a non-positive beta, an unknown kind.
    """
    _positive("beta", beta)
    if kind not in DPO_KINDS:
        raise ValueError(f"unknown DPO kind {kind!r}; expected one of {DPO_KINDS}")
    _same_shape(err_w=err_w, err_l=err_l, ref_err_w=ref_err_w, ref_err_l=ref_err_l)
    c = 0.5 if half else 1.0
    u_w = -c * (err_w - ref_err_w)
    u_l = -c * (err_l - ref_err_l)
    h = u_w - u_l
    m = beta * h
    if kind == "sigmoid":
        per = -jax.nn.log_sigmoid(m)
    elif kind == "hinge":
        per = jax.nn.relu(1.0 - m)
    else:
        per = jnp.square(h - 1.0 / (2.0 * beta))
    loss = jnp.mean(per)
    metrics = {
        "loss": loss,
        "implicit_acc": _accuracy(m),
        "reward_margin": jnp.mean(m),
        "reward_win": jnp.mean(beta * u_w),
        "reward_lose": jnp.mean(beta * u_l),
    }
    return loss, metrics


def _mapo_prob(err, s):
    """``s L / (e^{s L} - 1)``: 1 at ``L = 0``, decreasing in ``L`` (MaPO's likelihood proxy)."""
    x = s * err
    small = jnp.abs(x) < 1e-4
    xs = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 - 0.5 * x, xs / jnp.expm1(xs))


def mapo_loss(err_w, err_l, *, beta: float = 0.1, snr: float = 0.5, scale: float = 1000.0):
    r"""MaPO (Hong et al., 2024): reference-free, margin-aware preference optimization.

    Each per-sample error is mapped to a likelihood proxy ``p(L) = s L / (e^{s L} - 1)``
    (``s`` = ``snr``), the log-odds margin is ``o = p(L_w) - p(L_l)`` and

        loss = mean(L_w) - beta * mean(log sigmoid(scale * o)),

    the first term the plain denoising loss on the preferred samples (likelihood
    alignment), the second a margin that pushes the preferred and dispreferred
    likelihoods apart; ``scale`` is the paper's number of training timesteps ``T`` (the
    margin is summed over the denoising process). No reference model.

    Args:
      err_w, err_l: ``(B,)`` denoising errors of the policy on winners and losers at
        the same ``(t, eps)``.
      beta, snr, scale: positive numbers (defaults: ours, with ``scale = T = 1000``).

    Returns:
      ``(loss, metrics)`` with ``loss``, ``mse_win``, ``margin`` (mean ``o``) and
      ``implicit_acc`` (fraction of ``o > 0``, ties one half).
    """
    for k, v in (("beta", beta), ("snr", snr), ("scale", scale)):
        _positive(k, v)
    _same_shape(err_w=err_w, err_l=err_l)
    o = _mapo_prob(err_w, snr) - _mapo_prob(err_l, snr)
    ratio = jax.nn.log_sigmoid(scale * o)
    loss = jnp.mean(err_w) - beta * jnp.mean(ratio)
    return loss, {"loss": loss, "mse_win": jnp.mean(err_w), "margin": jnp.mean(o), "implicit_acc": _accuracy(o)}


def kto_loss(
    err,
    ref_err,
    desirable,
    *,
    beta: float = 5000.0,
    half: bool = True,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    z_ref=None,
):
    r"""Diffusion-KTO (Li et al., NeurIPS 2024; KTO, Ethayarajh et al., ICML 2024) on
    unpaired samples, each labelled desirable or undesirable.

    With the implicit log-ratio ``u = -c (L_theta - L_ref)`` (``c`` as in
    :func:`diffusion_dpo_loss`) and the reference point ``z`` (KTO's KL estimate), the
    value of a sample is ``lambda_d sigmoid(beta (u - z))`` if desirable and
    ``lambda_u sigmoid(beta (z - u))`` otherwise, and the loss is
    ``mean(lambda_y - value)``. Without ``z_ref``, ``z`` is the batch mean of ``u``
    clipped at 0 and held constant for the gradient (KTO's per-batch estimate of
    ``KL(pi_theta || pi_ref)``).

    Args:
      err, ref_err: ``(B,)`` denoising errors of the policy and the reference.
      desirable: ``(B,)`` booleans (or 0/1).
      beta, half: as in :func:`diffusion_dpo_loss`; lambda_d, lambda_u: the weights of
        desirable and undesirable samples (> 0); z_ref: a fixed reference point.

    Returns:
      ``(loss, metrics)`` with ``loss``, ``reward_desirable``, ``reward_undesirable``
      (means of ``beta u`` over each group, 0 for an empty group) and ``z``.
    """
    for k, v in (("beta", beta), ("lambda_d", lambda_d), ("lambda_u", lambda_u)):
        _positive(k, v)
    _same_shape(err=err, ref_err=ref_err, desirable=desirable)
    c = 0.5 if half else 1.0
    u = -c * (err - ref_err)
    d = jnp.asarray(desirable).astype(bool)
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(u), 0.0)) if z_ref is None else jnp.asarray(z_ref, u.dtype)
    value = jnp.where(d, lambda_d * jax.nn.sigmoid(beta * (u - z)), lambda_u * jax.nn.sigmoid(beta * (z - u)))
    lam = jnp.where(d, lambda_d, lambda_u)
    loss = jnp.mean(lam - value)
    df, uf = d.astype(u.dtype), (~d).astype(u.dtype)
    return loss, {
        "loss": loss,
        "reward_desirable": jnp.sum(df * beta * u) / jnp.maximum(jnp.sum(df), 1.0),
        "reward_undesirable": jnp.sum(uf * beta * u) / jnp.maximum(jnp.sum(uf), 1.0),
        "z": z,
    }


def _clipped_log_ratio(logp, ref_logp, clip):
    """``log clip(exp(logp - ref_logp), 1 - clip, 1 + clip)`` (no gradient outside)."""
    lr = logp - ref_logp
    if clip is None:
        return lr
    return jnp.clip(lr, jnp.log1p(-clip), jnp.log1p(clip))


def stepwise_dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, *, beta: float = 1.0, clip: float | None = 0.2):
    r"""The step-wise DPO loss of D3PO and SPO on transition log-probabilities.

    For the preferred transition ``w`` and the dispreferred ``l`` of a step,

        loss = -log sigmoid(beta (log r_w - log r_l)),   r = clip(p_theta / p_ref, 1 - clip, 1 + clip),

    ``p`` the Gaussian transition densities (:func:`jdiff.preference.transition_log_prob`),
    ``p_ref`` those of the frozen reference (or of the sampling policy). The clipping
    (a trust region as in PPO) stops the gradient of a ratio that left ``[1 - clip, 1 +
    clip]``; ``clip=None`` disables it. With ``p_theta == p_ref`` every ratio is exactly 1
    and the loss is ``log 2``.

    Args:
      logp_w, logp_l, ref_logp_w, ref_logp_l: per-transition log-probabilities (any
        equal shapes, e.g. ``(B,)`` or ``(N, B)``).
      beta: > 0; clip: in (0, 1) or None.

    Returns:
      ``(loss, metrics)`` with ``loss``, ``implicit_acc`` and ``ratio_win`` /
      ``ratio_lose`` (mean unclipped ratios).
    """
    _positive("beta", beta)
    if clip is not None and not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1) or None, got {clip!r}")
    shapes = {jnp.shape(a) for a in (logp_w, logp_l, ref_logp_w, ref_logp_l)}
    if len(shapes) != 1:
        raise ValueError(f"log-probabilities of different shapes: {sorted(shapes)}")
    lw = _clipped_log_ratio(logp_w, ref_logp_w, clip)
    ll = _clipped_log_ratio(logp_l, ref_logp_l, clip)
    m = beta * (lw - ll)
    loss = -jnp.mean(jax.nn.log_sigmoid(m))
    return loss, {
        "loss": loss,
        "implicit_acc": _accuracy(m),
        "ratio_win": jnp.mean(jnp.exp(logp_w - ref_logp_w)),
        "ratio_lose": jnp.mean(jnp.exp(logp_l - ref_logp_l)),
    }


def d3po_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, *, beta: float = 1.0, clip: float | None = 0.2):
    """D3PO (Yang et al., CVPR 2024): :func:`stepwise_dpo_loss` on the steps of two whole
    trajectories sampled for the same condition, the preferred one ``w`` judged on its
    final image; every step of ``w`` is preferred to the step of ``l`` at the same time
    (the trajectories differ from the start noise on)."""
    return stepwise_dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta=beta, clip=clip)


def spo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, *, beta: float = 1.0, clip: float | None = 0.2):
    """SPO (Liang et al., 2024): :func:`stepwise_dpo_loss` on candidates branched from one
    shared state ``x_t``: several ``x_s`` are drawn from the same step, a step-aware
    preference model (here: any reward of each candidate's x0 prediction) picks the
    preferred ``w`` and the dispreferred ``l``, and the loss compares the two transitions
    from that common ``x_t`` (so it credits the step, not the whole trajectory)."""
    return stepwise_dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta=beta, clip=clip)


def normalize_advantages(rewards, groups, *, eps: float = 1e-6):
    """DDPO's per-condition advantages: ``(r - mean_g) / (std_g + eps)`` with the mean and
    (population) standard deviation of the rewards of the samples sharing the group ``g``
    (the prompt / class label) in the batch.

    Args:
      rewards: ``(B,)``; groups: ``(B,)`` integer group ids (any values).

    Returns:
      ``(B,)`` advantages (0 for a sample alone in its group)."""
    rewards, groups = jnp.asarray(rewards), jnp.asarray(groups)
    if rewards.ndim != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards and groups must be (B,) arrays of one shape, got {rewards.shape}, {groups.shape}")
    same = (groups[:, None] == groups[None, :]).astype(rewards.dtype)
    n = jnp.sum(same, axis=1)
    mean = same @ rewards / n
    var = same @ jnp.square(rewards) / n - jnp.square(mean)
    return (rewards - mean) / (jnp.sqrt(jnp.maximum(var, 0.0)) + eps)


def ddpo_loss(logp, old_logp, advantages, *, clip: float = 1e-4):
    r"""DDPO's clipped policy-gradient loss (Black et al., ICLR 2024, Sec. 4.3; PPO's
    clipped surrogate, Schulman et al. 2017):

        loss = mean(max(-A r, -A clip(r, 1 - clip, 1 + clip))),   r = p_theta / p_old,

    over the transitions of trajectories sampled by the old policy, ``A`` each
    trajectory's advantage (:func:`normalize_advantages`) broadcast over its steps.

    Args:
      logp: ``(..., B)`` log-probabilities of the transitions under the policy;
        old_logp: the same under the sampling policy (constants), or ``None`` for an
        on-policy step (the policy is the sampler: ``old_logp = stop_gradient(logp)``,
        every ratio exactly 1 and the gradient ``-mean(A grad log p)``, whatever float32
        differences a separately computed ``old_logp`` would have); advantages: ``(B,)``.
      clip: the ratio clip, in (0, 1) (DDPO's default ``1e-4``). Note that float32
        log-probabilities of the same trajectory computed by two differently compiled
        programs (the sampler's and the gradient's) can differ by ~1e-4 on steps with a
        small noise scale, the size of that default clip.

    Returns:
      ``(loss, metrics)`` with ``loss``, ``ratio`` (mean), ``clip_frac`` and
      ``approx_kl`` (``mean((logp - old_logp)^2) / 2``).
    """
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip!r}")
    if old_logp is None:
        old_logp = jax.lax.stop_gradient(logp)
    if jnp.shape(logp) != jnp.shape(old_logp):
        raise ValueError(f"logp {jnp.shape(logp)} and old_logp {jnp.shape(old_logp)} differ in shape")
    adv = jnp.asarray(advantages)
    if adv.ndim != 1 or jnp.shape(logp)[-1:] != adv.shape:
        raise ValueError(f"advantages must be (B,) matching logp's last axis, got {adv.shape} for {jnp.shape(logp)}")
    d = logp - jax.lax.stop_gradient(old_logp)
    r = jnp.exp(d)
    un = -adv * r
    cl = -adv * jnp.clip(r, 1.0 - clip, 1.0 + clip)
    loss = jnp.mean(jnp.maximum(un, cl))
    return loss, {
        "loss": loss,
        "ratio": jnp.mean(r),
        "clip_frac": jnp.mean((jnp.abs(r - 1.0) > clip).astype(r.dtype)),
        "approx_kl": 0.5 * jnp.mean(jnp.square(d)),
    }
