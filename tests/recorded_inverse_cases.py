"""Small fixed-key runs of every posterior sampler and every inversion, shared by
``scripts/record_inverse_samples.py`` (which wrote ``tests/data/inverse_samples.npz``
from the code before the samplers moved onto the solver protocol) and
``tests/test_inverse_recorded.py`` (which compares the current code with it).

Each case is ``name -> thunk``; a thunk returns a dict of arrays. ``cases(dtype)`` builds
the float32 (x64 off) or float64 (x64 on) set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import inverse_problems as IP
from jdiff import inversion as IV
from jdiff import solvers as S
from jdiff.testbed import GaussianMixture, random_mixture

B = 4
NFE = 8


def _mixture():
    return GaussianMixture(
        [0.3, 0.3, 0.4],
        [[-1.5, 1.0, 0.0, 0.5], [1.5, -1.0, 0.5, 0.0], [0.0, 1.5, -1.0, -1.0]],
        [[0.3, 0.4, 0.5, 0.3], [0.5, 0.3, 0.3, 0.4], [0.4, 0.4, 0.3, 0.5]],
    )


def _image_denoiser(process):
    """A 16-D mixture's exact denoiser on ``(4, 4, 1)`` images."""
    mix = random_mixture(jax.random.key(3), 16, 3, spread=1.0, std_range=(0.3, 0.6))

    def apply(x, t, c):
        return mix.posterior(x.reshape(x.shape[0], -1), t, process).eps.reshape(x.shape)

    return jdiff.denoiser(apply, process, "eps")


def posterior_cases(dtype):
    """Posterior samplers: DPS, PiGDM, DDRM, RED-diff and DDS on the 4-D mixture (inpainting,
    a 2 x 4 projection, a nonlinear tanh projection for DPS), two processes, and PiGDM / DDRM
    on (4, 4, 1) images (super-resolution, blur)."""
    mix = _mixture()
    key = jax.random.key(0)
    out = {}
    for pname, process in (("vp_cosine", jdiff.vp_cosine()), ("edm", jdiff.edm())):
        den = mix.denoiser(process)
        inp = IP.inpainting(np.array([True, False, True, False]))
        proj = IP.random_projection(np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -0.5]]), (4,))
        x_true = mix.sample(jax.random.key(1), B, dtype)
        for oname, op in (("inpainting", inp), ("projection", proj)):
            y = IP.measure(op, x_true, 0.1, jax.random.key(2)).astype(dtype)
            p = f"{pname}/{oname}"
            out[f"{p}/dps"] = lambda den=den, op=op, y=y: IP.dps(den, op, y, 0.1, key, nfe=NFE)
            out[f"{p}/dps_eta0.5"] = lambda den=den, op=op, y=y: IP.dps(
                den, op, y, 0.1, key, nfe=NFE, eta=0.5, scale=0.7
            )
            out[f"{p}/pigdm"] = lambda den=den, op=op, y=y: IP.pigdm(den, op, y, 0.1, key, nfe=NFE)
            out[f"{p}/pigdm_eta0"] = lambda den=den, op=op, y=y: IP.pigdm(den, op, y, 0.1, key, nfe=NFE, eta=0.0)
            out[f"{p}/ddrm"] = lambda den=den, op=op, y=y: IP.ddrm(den, op, y, 0.1, key, nfe=NFE)
            out[f"{p}/ddrm_sy0"] = lambda den=den, op=op, y=y: IP.ddrm(den, op, y, 0.0, key, nfe=NFE, eta=0.5)
            out[f"{p}/red_diff"] = lambda den=den, op=op, y=y: IP.red_diff(den, op, y, 0.1, key, nfe=NFE)
            out[f"{p}/dds"] = lambda den=den, op=op, y=y: IP.dds(den, op, y, 0.1, key, nfe=NFE)
            out[f"{p}/dds_prox"] = lambda den=den, op=op, y=y: IP.dds(
                den, op, y, 0.1, key, nfe=NFE, gamma=0.5, cg_steps=2, eta=0.0
            )
        nl = IP.nonlinear(proj, "tanh")
        y = IP.measure(nl, x_true, 0.05, jax.random.key(2)).astype(dtype)
        x_T = jax.random.normal(jax.random.key(7), (B, 4), dtype) * process.prior_std().astype(dtype)
        out[f"{pname}/nonlinear/dps"] = lambda den=den, nl=nl, y=y: IP.dps(den, nl, y, 0.05, key, nfe=NFE)
        out[f"{pname}/nonlinear/dps_xT"] = lambda den=den, nl=nl, y=y, x_T=x_T: IP.dps(
            den, nl, y, 0.05, key, nfe=NFE, x_T=x_T
        )
        out[f"{pname}/nonlinear/red_diff"] = lambda den=den, nl=nl, y=y: IP.red_diff(den, nl, y, 0.05, key, nfe=NFE)
    process = jdiff.vp_cosine()
    den = _image_denoiser(process)
    x_true = jax.random.normal(jax.random.key(4), (2, 4, 4, 1), dtype)
    for oname, op in (("sr", IP.super_resolution((4, 4, 1), 2)), ("blur", IP.gaussian_blur((4, 4, 1), 0.8))):
        y = IP.measure(op, x_true, 0.05, jax.random.key(5)).astype(dtype)
        out[f"image/{oname}/pigdm"] = lambda den=den, op=op, y=y: IP.pigdm(den, op, y, 0.05, key, nfe=NFE)
        out[f"image/{oname}/ddrm"] = lambda den=den, op=op, y=y: IP.ddrm(den, op, y, 0.05, key, nfe=NFE)
        out[f"image/{oname}/dds"] = lambda den=den, op=op, y=y: IP.dds(den, op, y, 0.05, key, nfe=NFE)
    return {k: (lambda f=f: {"x": f()}) for k, f in out.items()}


def inversion_cases(dtype):
    """Inversions: ODE inversion (DDIM, refined DDIM, DPM-Solver++(2M) plain and refined,
    iPNDM), EDICT (with and without leapfrog), BDIA and edit-friendly DDPM, each with its
    regeneration, on a conditional 2-D mixture (the setup of tests/test_inversion.py)."""
    process = jdiff.vp_linear()
    mix = random_mixture(jax.random.key(0), 2, 3, spread=1.0, std_range=(0.4, 0.7))
    v = jnp.asarray([1.0, -0.5], dtype)

    def apply(x, t, c):
        a = process.alpha(t)[:, None]
        return mix.posterior(x - a * c[:, None] * v, t, process).eps

    den = jdiff.denoiser(apply, process, "eps")
    guided = jdiff.wrappers.guidance(den, 2.0, 0.0)
    x0 = mix.sample(jax.random.key(1), B, dtype)
    c = jnp.linspace(-1.0, 1.0, B).astype(dtype)
    g = jdiff.time_grid(process, 6, kind="logsnr", dtype=dtype)

    def ode(solver, refine=0):
        inv = IV.invert(solver, den, x0, g, cond=c, refine=refine)
        return {"x_T": inv.x_T, "regen": IV.regenerate(den, inv, cond=c)}

    def edict(leapfrog):
        inv = IV.edict_invert(guided, x0, g, cond=c, leapfrog=leapfrog)
        return {"x_T": inv.x_T, "y_T": inv.y_T, "regen": IV.regenerate(guided, inv, cond=c)}

    def bdia():
        inv = IV.bdia_invert(guided, x0, g, cond=c, gamma=0.96)
        return {"x_T": inv.x_T, "x_1": inv.x_1, "regen": IV.regenerate(guided, inv, cond=c)}

    def ddpm(eta):
        inv = IV.ddpm_invert(guided, x0, g, cond=c, key=jax.random.key(5), eta=eta)
        return {"x_T": inv.x_T, "zs": inv.zs, "regen": IV.regenerate(den, inv, cond=c * 0.5)}

    return {
        "invert/ddim": lambda: ode(S.ddim()),
        "invert/ddim_refine2": lambda: ode(S.ddim(), 2),
        "invert/dpm++2m": lambda: ode(S.dpm_solver_pp(2)),
        "invert/dpm++2m_refine2": lambda: ode(S.dpm_solver_pp(2), 2),
        "invert/ipndm": lambda: ode(S.ipndm(4)),
        "edict": lambda: edict(True),
        "edict_noleap": lambda: edict(False),
        "bdia": bdia,
        "ddpm": lambda: ddpm(1.0),
        "ddpm_eta0.5": lambda: ddpm(0.5),
    }


def all_cases():
    """``(prefix, x64, dtype, cases)`` for float32 and float64."""
    return [("f32", False, jnp.float32), ("f64", True, jnp.float64)]


def run(prefix, x64, dtype, which=("posterior", "inversion"), filt=""):
    """Every case of one dtype (whose name contains ``filt``) as
    ``{f"{prefix}/{case}/{field}": array}`` (NumPy)."""
    out = {}
    with jax.enable_x64(x64):
        table = {}
        if "posterior" in which:
            table |= {f"posterior/{k}": f for k, f in posterior_cases(dtype).items()}
        if "inversion" in which:
            table |= {f"inversion/{k}": f for k, f in inversion_cases(dtype).items()}
        for name, thunk in table.items():
            if filt not in name:
                continue
            for field, a in thunk().items():
                out[f"{prefix}/{name}/{field}"] = np.asarray(a)
    return out
