"""A diffusers ``scheduler_config.json`` as a jdiff process, parameterization, default
grid and thresholding.

Every supported scheduler (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler``, ``EulerDiscreteScheduler``, ``PNDMScheduler``) is a
discrete variance-preserving process: a table ``alphas_cumprod[n], n = 0..N-1`` of the
``N = num_train_timesteps`` training steps (Ho et al., "Denoising Diffusion
Probabilistic Models", NeurIPS 2020). It becomes :class:`jdiff.VPDiscrete`, which puts
step ``n`` at ``t = (n + 1) / N`` and gives the network ``N t - 1``: diffusers'
timestep index (``time_input="timestep"``).

What each config key becomes (diffusers' default where the key is absent):

- ``beta_schedule`` (``"linear"``, ``"scaled_linear"``, ``"squaredcos_cap_v2"``;
  ``"sigmoid"`` for DDPM), ``beta_start``, ``beta_end``, ``trained_betas``,
  ``num_train_timesteps``, ``rescale_betas_zero_snr`` (Lin et al., "Common Diffusion
  Noise Schedules and Sample Steps are Flawed", WACV 2024, Algorithm 1): the table,
  computed in float64 (diffusers computes it in float32: the two agree to float32
  rounding). With zero terminal SNR jdiff keeps ``alphas_cumprod[N-1] = 0`` exactly,
  where diffusers' Euler and DPM-Solver schedulers substitute ``2**-24``.
- ``prediction_type``: ``epsilon``, ``sample``, ``v_prediction`` -> ``"eps"``, ``"x0"``,
  ``"v"``.
- ``timestep_spacing`` (``leading``, ``trailing``, ``linspace``; Lin et al., Table 2)
  and ``steps_offset`` -> :meth:`Scheduler.timesteps`, exactly the timesteps the
  scheduler class's own ``set_timesteps(steps)`` gives (DPM-Solver's
  ``lambda_min_clipped`` included; Euler's ``linspace`` timesteps are fractional, as in
  diffusers), and :meth:`Scheduler.grid`, those timesteps as jdiff times
  ``t = (timestep + 1) / N`` followed by the final point: the data (``t = 0``) where the
  scheduler's last step goes to ``alpha_cumprod = 1`` (DDPM; DDIM with
  ``set_alpha_to_one``; DPM-Solver and Euler with ``final_sigmas_type="zero"``), else
  ``t = 1/N``, step 0 of the table (DDIM/PNDM's ``final_alpha_cumprod =
  alphas_cumprod[0]``, ``final_sigmas_type="sigma_min"``; left out when the last
  timestep is already 0). PNDM repeats one timestep in its own list (its warm-up); the
  grid holds each timestep once.
- ``thresholding`` (``dynamic_thresholding_ratio``, ``sample_max_value``) ->
  :func:`jdiff.wrappers.dynamic_threshold`; else ``clip_sample`` (``clip_sample_range``)
  -> :func:`jdiff.wrappers.static_threshold` (DDPM and DDIM clip by default). The
  wrapper recomputes eps from the clipped x0, as diffusers' DDIM does with
  ``use_clipped_model_output=True`` (by default diffusers' DDIM keeps the unclipped eps).

Where jdiff's step differs from the scheduler's on the same timesteps: diffusers' DDIM
steps from timestep ``s`` to ``s - N // steps``, which for ``linspace`` (and ``trailing``
when ``steps`` does not divide ``N``) is not the next timestep of its own list; jdiff
steps between consecutive grid points. Between table entries (Euler's fractional
timesteps) jdiff interpolates ``log alpha`` linearly in t, diffusers interpolates sigma
linearly in the timestep. diffusers' Euler starts ``linspace`` and ``trailing`` grids from
``x_T sigma_max`` where the variance-preserving sample ``x_T`` is ``x_T sqrt(sigma_max^2 +
1)`` in its variable (a relative ``1 / (2 sigma_max^2)``, 2e-5 for DDPM's table). With
those differences set aside, jdiff's solver on :meth:`Scheduler.grid` gives the
scheduler's own loop's samples to float32 rounding (tests/test_interop_scheduler.py).

Keys that change the model's process or grid and that jdiff does not implement
(``use_karras_sigmas``, ``use_exponential_sigmas``, ``use_beta_sigmas``,
``use_lu_lambdas``, ``use_flow_sigmas``, ``use_dynamic_shifting``, Euler's
``timestep_type="continuous"`` and ``interpolation_type="log_linear"``) raise
:class:`UnsupportedModelError`; settings of the scheduler's own update rule (DPM-Solver's
``solver_order``, ``algorithm_type``, DDPM's ``variance_type``) choose the default jdiff
solver (:attr:`Scheduler.solver`) and are otherwise kept in :attr:`Scheduler.config`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jdiff._process import VPDiscrete, ddpm_betas, rescale_zero_terminal_snr, vp_discrete
from jdiff.interop._convert import UnsupportedModelError
from jdiff.wrappers import dynamic_threshold, static_threshold

__all__ = ["SCHEDULERS", "Scheduler", "Thresholding", "scheduler_from_config"]

_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_SPACINGS = ("leading", "trailing", "linspace")
_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass(frozen=True)
class _Class:
    """What a scheduler class reads and its defaults."""

    spacing: str  # default timestep_spacing
    final: str  # the config key deciding the last point: "one", "set_alpha_to_one", "final_sigmas_type"
    alpha_to_one: bool = True  # default of set_alpha_to_one
    clip_sample: bool | None = None  # default of clip_sample; None: the class does not clip
    thresholding: bool = False  # the class reads thresholding / dynamic_thresholding_ratio / sample_max_value
    betas: tuple = _BETAS


# The supported classes: each one's own default spacing and end point (diffusers 0.3x).
SCHEDULERS = {
    "DDPMScheduler": _Class("leading", "one", clip_sample=True, thresholding=True, betas=(*_BETAS, "sigmoid")),
    "DDIMScheduler": _Class("leading", "set_alpha_to_one", clip_sample=True, thresholding=True),
    "DPMSolverMultistepScheduler": _Class("linspace", "final_sigmas_type", thresholding=True),
    "EulerDiscreteScheduler": _Class("linspace", "final_sigmas_type"),
    "PNDMScheduler": _Class("leading", "set_alpha_to_one", alpha_to_one=False),
}

# Keys whose non-default value changes the grid or process in a way jdiff does not implement.
_REFUSED = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
}


@dataclasses.dataclass(frozen=True)
class Thresholding:
    """A scheduler's clipping of the x0 prediction, as a denoiser wrapper.

    Attributes:
      kind: ``"static"`` (``clip_sample``: clip to ``[-clip_range, clip_range]``) or
        ``"dynamic"`` (``thresholding``: Imagen's dynamic thresholding, Saharia et al.,
        NeurIPS 2022, Sec. 2.3, at percentile ``ratio`` with ``s <= max_value``).
    """

    kind: str
    clip_range: float = 1.0
    ratio: float = 0.995
    max_value: float = 1.0

    def __call__(self, denoiser):
        """``denoiser`` wrapped by :func:`jdiff.wrappers.static_threshold` or
        :func:`jdiff.wrappers.dynamic_threshold` with these settings."""
        if self.kind == "static":
            return static_threshold(denoiser, -self.clip_range, self.clip_range)
        return dynamic_threshold(denoiser, self.ratio, self.max_value)


@dataclasses.dataclass(frozen=True)
class Scheduler:
    """A diffusers scheduler config read into jdiff terms (see the module).

    Attributes:
      class_name: the scheduler class (a key of :data:`SCHEDULERS`).
      process: the :class:`jdiff.VPDiscrete` process of its ``alphas_cumprod``.
      prediction: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset: the timestep spacing and offset of its default grid.
      final: ``"data"`` (the last step goes to t = 0) or ``"t_min"`` (to t = 1/N).
      thresholding: a :class:`Thresholding`, or None.
      solver: the name of the jdiff solver closest to the scheduler's own update
        (:func:`jdiff.solvers.get`).
      config: the config as read (every key, diffusers' defaults not filled in).
    """

    class_name: str
    process: VPDiscrete
    prediction: str
    spacing: str
    steps_offset: int
    final: str
    thresholding: Thresholding | None
    solver: str
    config: dict = dataclasses.field(default_factory=dict, compare=False)
    lambda_min_clipped: float = -math.inf

    @property
    def num_train_timesteps(self) -> int:
        return int(self.process.num_train_steps)

    def timesteps(self, steps: int) -> np.ndarray:
        """The timesteps diffusers' ``set_timesteps(steps)`` gives for this scheduler,
        in decreasing order, each once (float64; integers except Euler's ``linspace``)."""
        n, N = _check_steps(steps, self.num_train_timesteps), self.num_train_timesteps
        name = self.class_name
        if name == "DPMSolverMultistepScheduler":
            last = N - self._clipped_index()
            if self.spacing == "linspace":
                ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
            elif self.spacing == "leading":
                ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.steps_offset
            else:
                ts = np.arange(last, 0, -N / n).round() - 1
        elif self.spacing == "linspace":
            ts = np.linspace(0, N - 1, n)[::-1]
            # Euler keeps the fractional timesteps (in float32, as diffusers builds them)
            ts = ts.astype(np.float32) if name == "EulerDiscreteScheduler" else ts.round()
        elif self.spacing == "leading":
            ts = (np.arange(n) * (N // n)).round()[::-1] + self.steps_offset
        else:
            ts = np.round(np.arange(N, 0, -N / n)) - 1
        ts = np.unique(np.asarray(ts, np.float64))[::-1]
        if ts[0] > N - 1 or ts[-1] < 0:
            raise ValueError(
                f"{name}: steps_offset={self.steps_offset} puts timestep {ts[0]:g} outside the {N} training steps"
            )
        return ts

    def grid(self, steps: int, dtype=jnp.float32):
        """The default time grid of ``steps`` steps: :meth:`timesteps` as jdiff times
        ``(timestep + 1) / N``, then the final point (see the module); a decreasing
        array for :func:`jdiff.sample`. For solvers with one model call per step (DDIM,
        the multistep solvers) ``steps`` is the NFE."""
        N = self.num_train_timesteps
        t = (self.timesteps(steps) + 1.0) / N
        end = 0.0 if self.final == "data" else 1.0 / N
        if t[-1] > end:
            t = np.concatenate([t, [end]])
        return jnp.asarray(t, dtype)

    def _clipped_index(self) -> int:
        """DPM-Solver's ``lambda_min_clipped``: how many of the noisiest steps it drops
        (float32, as diffusers computes it)."""
        if not math.isfinite(self.lambda_min_clipped) and self.lambda_min_clipped < 0:
            return 0
        ac = np.exp(2.0 * np.asarray(self.process.log_alphas[1:], np.float64)).astype(np.float32)
        with np.errstate(divide="ignore"):
            lam = 0.5 * np.log(ac) - 0.5 * np.log(np.float32(1.0) - ac)
        return int(np.searchsorted(lam[::-1], np.float32(self.lambda_min_clipped), side="left"))


def _check_steps(steps, N: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or not 1 <= steps <= N:
        raise ValueError(f"the number of steps must be an integer in [1, {N}] (num_train_timesteps), got {steps!r}")
    return int(steps)


def _refuse(where: str, key: str, value, supported) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {key}={value!r} is not supported; supported: {supported}")


def _betas(cfg: dict, cls: _Class, where: str, N: int) -> np.ndarray:
    trained = cfg.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, np.float64)
        if betas.shape != (N,):
            raise ValueError(f"{where}: trained_betas has {betas.size} entries, num_train_timesteps is {N}")
        return betas
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return ddpm_betas("linear", N, start, end)
    if kind == "scaled_linear":
        return ddpm_betas("scaled_linear", N, start, end)
    if kind == "squaredcos_cap_v2" and kind in cls.betas:
        return ddpm_betas("cosine", N)
    if kind == "sigmoid" and kind in cls.betas:  # GeoDiff's (Xu et al., ICLR 2022)
        return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, N))) * (end - start) + start
    raise _refuse(where, "beta_schedule", kind, ", ".join(cls.betas) + " or trained_betas")


def _solver(name: str, cfg: dict) -> str:
    if name == "DDPMScheduler":
        return "ddpm"
    if name == "PNDMScheduler":
        return "ipndm4"  # pseudo linear multistep: the fourth-order Adams-Bashforth update
    if name == "EulerDiscreteScheduler":
        return "euler-rho"  # Euler in sigma / alpha on x / alpha: diffusers' Euler step (DDIM in exact arithmetic)
    if name != "DPMSolverMultistepScheduler":
        return "ddim"
    order = int(cfg.get("solver_order", 2))
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    if algorithm == "sde-dpmsolver++" and order in (1, 2):
        return "sde-dpm++1" if order == 1 else "sde-dpm++2m"
    if algorithm == "dpmsolver" and order in (2, 3):
        return f"dpm{order}m"
    return f"dpm++{order}m" if order in (1, 2, 3) else "dpm++2m"


def scheduler_from_config(config: dict, where: str = "scheduler_config.json") -> Scheduler:
    """Read a diffusers scheduler config (the parsed ``scheduler_config.json``).

    Arguments:
      config: the config dict; ``_class_name`` names the scheduler class.
      where: what to name in errors (the file).

    Returns:
      a :class:`Scheduler` (process, prediction, default grid, thresholding).

    Raises:
      UnsupportedModelError: a class or a key value jdiff does not implement (one line
        naming what was found and what is supported).
      ValueError: an inconsistent config (``trained_betas`` of the wrong length, an
        offset past the table).
    """
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise UnsupportedModelError(
            f"{where}: scheduler class {name!r} is not supported; supported: {', '.join(SCHEDULERS)}"
        )
    cls = SCHEDULERS[name]
    where = f"{where} ({name})"
    for key, default in _REFUSED.items():
        v = config.get(key, default)
        if v is not None and v != default:
            raise _refuse(where, key, v, f"{key}={default!r}")
    N = int(config.get("num_train_timesteps", 1000))
    if N < 2:
        raise ValueError(f"{where}: num_train_timesteps must be >= 2, got {N}")
    betas = _betas(config, cls, where, N)
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    process = vp_discrete(betas)
    pred = config.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise _refuse(where, "prediction_type", pred, ", ".join(_PREDICTIONS))
    spacing = config.get("timestep_spacing", cls.spacing)
    if spacing not in _SPACINGS:
        raise _refuse(where, "timestep_spacing", spacing, ", ".join(_SPACINGS))
    if cls.final == "one":
        final = "data"
    elif cls.final == "set_alpha_to_one":
        final = "data" if config.get("set_alpha_to_one", cls.alpha_to_one) else "t_min"
    else:
        kind = config.get("final_sigmas_type", "zero")
        if kind not in ("zero", "sigma_min"):
            raise _refuse(where, "final_sigmas_type", kind, "zero, sigma_min")
        final = "data" if kind == "zero" else "t_min"
    thresholding = None
    if cls.thresholding and config.get("thresholding", False):
        thresholding = Thresholding(
            "dynamic",
            ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
            max_value=float(config.get("sample_max_value", 1.0)),
        )
    elif cls.clip_sample is not None and config.get("clip_sample", cls.clip_sample):
        thresholding = Thresholding("static", clip_range=float(config.get("clip_sample_range", 1.0)))
    lam_min = config.get("lambda_min_clipped", -math.inf) if name == "DPMSolverMultistepScheduler" else -math.inf
    return Scheduler(
        class_name=name,
        process=process,
        prediction=_PREDICTIONS[pred],
        spacing=spacing,
        steps_offset=int(config.get("steps_offset", 0)),
        final=final,
        thresholding=thresholding,
        solver=_solver(name, config),
        config=dict(config),
        lambda_min_clipped=float(lam_min),
    )
