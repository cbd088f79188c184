"""jdiff against diffusers' schedulers on the exact Gaussian-mixture testbed.

diffusers and torch are never jdiff dependencies: they live in a separate virtualenv,
and this script runs its diffusers half there in a subprocess that exchanges ``.npz``
files with the jdiff half. Set the virtualenv up once with::

    python -m venv .venv-diffusers
    .venv-diffusers/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    .venv-diffusers/bin/pip install diffusers numpy

then run ``python benchmarks/vs_diffusers.py [--venv .venv-diffusers]`` (or set
``JDIFF_DIFFUSERS_VENV``) with
jdiff's own Python. Both sides get the same mixture (its exact noise prediction written
once in NumPy terms on each side), the same DDPM linear 1000-step table and the same
``x_T``. The time grid of every diffusers run is read off its scheduler (its sigmas, or
its timesteps for DDIM) and handed to jdiff as log-SNRs mapped to jdiff's times, so "same
grid" is literal, whatever spacing diffusers chose.

It reports
  (a) same algorithm, same grid: the largest difference of the final samples (float32);
  (b) per NFE, the best mean L2 error to the exact ODE solution (diffrax, float64) over
      each library's menu of solvers and spacings;
  (c) wall time per step with a trivial denoiser (zeros) on SD-latent-sized batches.
and writes ``benchmarks/results/vs_diffusers.json`` (tables in ``benchmarks/RESULTS.md``).

It also writes the small fixture ``tests/data/vs_diffusers.npz`` (``--fixture``): the
mixture (its seed, settings and arrays), the first 16 starting noises, and diffusers'
sigmas and final samples for DDIM, DPM-Solver++(2M), DPM-Solver++(3M) and UniPC-2 (bh2) on
a few spacings and NFEs, with the diffusers and torch versions. ``tests/test_vs_diffusers.py``
checks jdiff against it, so the test suite needs no torch. ``--fixture-only`` runs just
those cases (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, diffusers class, config overrides); the diffusers half builds these
DIFFUSERS_MENU = {
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),  # from t = 999, unclipped
    "dpm++2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc2": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "unipc3": ("UniPCMultistepScheduler", {"solver_order": 3}),
    "deis2": ("DEISMultistepScheduler", {"solver_order": 2}),
    "deis3": ("DEISMultistepScheduler", {"solver_order": 3}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
SPACINGS = {
    "default": {},
    "karras": {"use_karras_sigmas": True},
    "logsnr": {"use_lu_lambdas": True},
}
SPACING_OK = {  # which spacings each scheduler supports
    "DDIMScheduler": ("default",),
    "DPMSolverMultistepScheduler": ("default", "karras", "logsnr"),
    "UniPCMultistepScheduler": ("default", "karras"),
    "DEISMultistepScheduler": ("default", "karras"),
    "EulerDiscreteScheduler": ("default", "karras"),
    "HeunDiscreteScheduler": ("default", "karras"),
}
# jdiff's solver for the same algorithm (identical update) as each diffusers scheduler
SAME = {
    "ddim": "ddim",
    "dpm++2m": "dpm++2m",
    "dpm++3m": "dpm++3m(variant=diffusers)",
    "unipc2": "unipc2",
    "unipc3": "unipc3",
    "deis2": "deis2-log_rho",
    "deis3": "deis3-log_rho",
    "euler": "ddim",  # Euler in (x / alpha, sigma / alpha) is DDIM
    "heun": "heun-rho",
}
# (scheduler, spacing, NFE) of the fixture tests/data/vs_diffusers.npz
FIXTURE_CASES = [
    ("ddim", "default", 5),
    ("ddim", "default", 10),
    ("dpm++2m", "default", 5),
    ("dpm++2m", "default", 10),
    ("dpm++2m", "karras", 8),
    ("dpm++3m", "default", 5),
    ("dpm++3m", "default", 10),
    ("dpm++3m", "logsnr", 8),
    ("unipc2", "default", 5),
    ("unipc2", "default", 10),
]
FIXTURE_N = 16  # samples kept in the fixture
FIXTURE = os.path.join(HERE, os.pardir, "tests", "data", "vs_diffusers.npz")
MIXTURE = {"seed": 0, "dim": 8, "components": 6, "std_range": (0.1, 0.5)}  # random_mixture's settings
JDIFF_MENU = ["ddim", "dpm++2m", "dpm++3m", "unipc2", "unipc3", "deis3", "ipndm4", "heun-rho", "dpm++2s", "dpm3"]
JDIFF_KINDS = ["uniform", "logsnr", "quadratic", "karras"]


# ----------------------------------------------------------------- diffusers half


def _diffusers_side(inp: str, out: str) -> None:
    import diffusers
    import torch

    torch.set_num_threads(1)
    z = np.load(inp, allow_pickle=False)
    w, mu, sd = (torch.tensor(z[k], dtype=torch.float64) for k in ("weights", "means", "stds"))
    x_T = torch.tensor(z["x_T"], dtype=torch.float32)
    cases = json.loads(str(z["cases"]))

    def eps_exact(x, sigma):
        """E[eps | x] of the mixture for a VP sample x at diffusers' sigma (= sigma_t / alpha_t)."""
        x = x.to(torch.float64)
        a = 1.0 / np.sqrt(1.0 + sigma**2)
        s = sigma * a
        v = a * a * sd**2 + s * s  # (K, d)
        diff = x[:, None, :] - a * mu[None]
        logw = torch.log(w)[None] - 0.5 * torch.sum(diff * diff / v + torch.log(2 * np.pi * v), -1)
        r = torch.softmax(logw, -1)[..., None]
        return torch.sum(r * (s * diff / v), 1).to(torch.float32)

    results = {}
    for case in cases:
        cls = getattr(diffusers, case["cls"])
        sch = cls(beta_schedule="linear", **case["config"])
        sch.set_timesteps(case["steps"])
        edm = case["cls"] in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
        if case["cls"] == "DDIMScheduler":
            ac = sch.alphas_cumprod.to(torch.float64)
            sig = [float(torch.sqrt((1 - ac[t]) / ac[t])) for t in sch.timesteps] + [0.0]
        else:
            sig = [float(s) for s in sch.sigmas]
        trivial = case.get("trivial", False)
        x = torch.tensor(z["x_trivial"]) if trivial else x_T.clone()
        if edm:  # these schedulers keep x / alpha: x_T in VP scale times sqrt(1 + sigma_0^2)
            x = x * np.sqrt(1.0 + sig[0] ** 2)
        calls = 0
        t0 = time.perf_counter()
        for i, t in enumerate(sch.timesteps):
            if edm:
                inp_x = sch.scale_model_input(x, t)
                sigma = float(sch.sigmas[sch.step_index])
            else:
                inp_x, sigma = x, sig[i]
            e = torch.zeros_like(inp_x) if trivial else eps_exact(inp_x, sigma)
            calls += 1
            x = sch.step(e, t, x).prev_sample
        dt = time.perf_counter() - t0
        results[case["key"]] = {
            "x": x.numpy().astype(np.float32).tolist() if not trivial else None,
            "sigmas": sig,
            "calls": calls,
            "seconds_per_call": dt / calls,
        }
    results["versions"] = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    with open(out, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------- jdiff half


def _case(name, sp, nfe):
    cls, cfg = DIFFUSERS_MENU[name]
    steps = (nfe + 1) // 2 if name == "heun" else nfe
    return {"key": f"{name}|{sp}|{nfe}", "cls": cls, "config": cfg | SPACINGS[sp], "steps": steps}


def _cases(nfes, trivial_steps):
    cases = []
    for name, (cls, _) in DIFFUSERS_MENU.items():
        for sp in SPACING_OK[cls]:
            for nfe in nfes:
                cases.append(_case(name, sp, nfe))
    if trivial_steps:
        cases.append(
            {
                "key": "trivial",
                "cls": "DPMSolverMultistepScheduler",
                "config": {},
                "steps": trivial_steps,
                "trivial": True,
            }
        )
    return cases


def write_fixture(path, mix, x_T, res) -> None:
    """The fixture of ``tests/test_vs_diffusers.py``: the mixture, the first
    :data:`FIXTURE_N` noises, and diffusers' sigmas and final samples of
    :data:`FIXTURE_CASES` (``x|key``, ``sigmas|key``), with the versions that made them."""
    arrays = {}
    for name, sp, nfe in FIXTURE_CASES:
        key = f"{name}|{sp}|{nfe}"
        arrays[f"x|{key}"] = np.asarray(res[key]["x"], np.float32)[:FIXTURE_N]
        arrays[f"sigmas|{key}"] = np.asarray(res[key]["sigmas"], np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(
        path,
        weights=np.asarray(mix.weights, np.float64),
        means=np.asarray(mix.means, np.float64),
        stds=np.asarray(mix.stds, np.float64),
        mixture=json.dumps(MIXTURE),
        x_T=np.asarray(x_T, np.float32)[:FIXTURE_N],
        cases=json.dumps([[f"{n}|{sp}|{nfe}", SAME[n]] for n, sp, nfe in FIXTURE_CASES]),
        diffusers_version=res["versions"]["diffusers"],
        torch_version=res["versions"]["torch"],
        **arrays,
    )
    print(f"wrote {path} ({os.path.getsize(path)} bytes)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--venv",
        default=os.environ.get("JDIFF_DIFFUSERS_VENV", ".venv-diffusers"),
        help="virtualenv with torch and diffusers (default: $JDIFF_DIFFUSERS_VENV or .venv-diffusers)",
    )
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10])
    ap.add_argument("--n", type=int, default=256, help="samples")
    ap.add_argument("--dim", type=int, default=8, help="mixture dimension")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "vs_diffusers.json"))
    ap.add_argument("--fixture", default=FIXTURE, help="the test fixture to write ('' to skip)")
    ap.add_argument("--fixture-only", action="store_true", help="run only the fixture's cases and write it")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    from _common import machine, today

    import jdiff
    from jdiff import solvers as S
    from jdiff.testbed import random_mixture

    if args.fixture_only and args.dim != MIXTURE["dim"]:
        raise SystemExit(f"--fixture-only uses the fixture's mixture (dim {MIXTURE['dim']}), got --dim {args.dim}")
    mix = random_mixture(
        jax.random.key(MIXTURE["seed"]), args.dim, MIXTURE["components"], std_range=MIXTURE["std_range"]
    )
    proc = jdiff.vp_discrete()  # DDPM linear, 1000 steps: diffusers' default table
    proc64 = jdiff.vp_discrete()  # the same, for float64 work (kept apart from proc's compiled programs)
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (args.n, args.dim)), np.float32)
    trivial_shape = (8, 4 * 64 * 64)  # 8 SD latents (4 x 64 x 64), flattened
    if args.fixture_only:
        x_triv = np.zeros((1, 1), np.float32)
        cases = [_case(*c) for c in FIXTURE_CASES]
    else:
        x_triv = np.asarray(jax.random.normal(jax.random.key(2), trivial_shape), np.float32)
        cases = _cases(args.nfe, 20)
        have = {c["key"] for c in cases}
        cases += [_case(*c) for c in FIXTURE_CASES if f"{c[0]}|{c[1]}|{c[2]}" not in have]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.json")
        np.savez(
            inp, weights=mix.weights, means=mix.means, stds=mix.stds, x_T=x_T, x_trivial=x_triv, cases=json.dumps(cases)
        )
        t0 = time.time()
        subprocess.run([os.path.join(args.venv, "bin", "python"), __file__, "--diffusers-side", inp, out], check=True)
        print(f"diffusers side: {time.time() - t0:.0f} s", flush=True)
        with open(out) as f:
            res = json.load(f)

    versions = res.pop("versions")
    print(f"diffusers {versions['diffusers']}, torch {versions['torch']}", flush=True)
    if args.fixture:
        write_fixture(args.fixture, mix, x_T, dict(res, versions=versions))
    den = mix.denoiser(proc)

    def grid_of(sigmas):
        s = np.asarray(sigmas, np.float64)
        s = s[np.concatenate([[True], s[1:] != s[:-1]])]  # Heun lists its sigmas twice
        with jax.enable_x64(True):
            lam = -np.log(np.where(s > 0, s, 1.0))
            t = np.asarray(proc64.t_of_lambda(jnp.asarray(lam, jnp.float64)))
        t = np.where(s > 0, t, 0.0)
        t[0] = min(t[0], 1.0)
        return jnp.asarray(t, jnp.float32)

    if args.fixture_only:
        for name, sp, nfe in FIXTURE_CASES:
            r = res[f"{name}|{sp}|{nfe}"]
            x = jdiff.sample(S.get(SAME[name]), den, jnp.asarray(x_T), grid_of(r["sigmas"]))
            d = float(np.max(np.abs(np.asarray(x) - np.asarray(r["x"], np.float32))))
            print(f"{name}|{sp}|{nfe}: max|x_diffusers - x_jdiff| {d:.2e}", flush=True)
        return

    # exact ODE solution from x_T at t = 1 (diffusers' first timestep, 999) to the data
    with jax.enable_x64(True):
        ref = np.asarray(mix.reference_ode(proc64, jnp.asarray(x_T, jnp.float64), 1.0, 0.0))

    def l2(x):
        return float(np.mean(np.linalg.norm(np.asarray(x, np.float64) - ref, axis=1)))

    # (a) same algorithm, same grid
    same = []
    for key, r in res.items():
        if key == "trivial":
            continue
        name, sp, nfe = key.split("|")
        solver = S.get(SAME[name])
        grid = grid_of(r["sigmas"])
        x = jdiff.sample(solver, den, jnp.asarray(x_T), grid)
        d = float(np.max(np.abs(np.asarray(x) - np.asarray(r["x"], np.float32))))
        same.append({"scheduler": name, "spacing": sp, "nfe": int(nfe), "jdiff": SAME[name], "max_diff": d})
        r["l2"] = l2(r["x"])
        print(f"(a) {key:24s} vs jdiff {SAME[name]:28s} max|diff| {d:.2e}  l2 {r['l2']:.4f}", flush=True)

    # (b) best error per NFE over each library's menu
    best = {}
    for nfe in args.nfe:
        dk = [(k, r["l2"]) for k, r in res.items() if k != "trivial" and int(k.split("|")[2]) == nfe]
        bd = min(dk, key=lambda kv: kv[1])
        rows = []
        for name in JDIFF_MENU:
            solver = S.get(name)
            for kind in JDIFF_KINDS:
                n = solver.num_steps(nfe, to_data=True)
                if n < solver.min_steps:
                    continue
                grid = jdiff.time_grid(proc, n, kind=kind, t_start=1.0, final="data")
                x, info = jdiff.sample(solver, den, jnp.asarray(x_T), grid, nfe=nfe, return_info=True)
                if int(info.nfe) <= nfe:
                    rows.append((f"{name}|{kind}", l2(x)))
        bj = min(rows, key=lambda kv: kv[1])
        best[nfe] = {"diffusers": bd, "jdiff": bj}
        print(f"(b) NFE {nfe}: diffusers best {bd}, jdiff best {bj}", flush=True)

    # (c) wall time per step, trivial denoiser (zeros), DPM-Solver++(2M), 20 steps
    zero = jdiff.denoiser(lambda x, t, c: jnp.zeros_like(x), proc, "eps")
    grid = grid_of(res["trivial"]["sigmas"])
    f = jax.jit(lambda x: jdiff.sample(S.dpm_solver_pp(2), zero, x, grid))
    xt = jnp.asarray(x_triv)
    jax.block_until_ready(f(xt))
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(xt))
    jd = (time.perf_counter() - t0) / reps / (grid.shape[0] - 1)
    timing = {"diffusers_s_per_step": res["trivial"]["seconds_per_call"], "jdiff_s_per_step": jd}
    print(f"(c) per step, trivial denoiser, batch {trivial_shape}: {timing}", flush=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fo:
        json.dump(
            {"machine": machine(), "date": today(), "same": same, "best": best, "timing": timing},
            fo,
            indent=1,
        )
    print("wrote", args.out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--diffusers-side":
        _diffusers_side(sys.argv[2], sys.argv[3])
    else:
        main()
