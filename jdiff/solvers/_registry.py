"""One registry from solver names to solvers, for the CLI, presets and benchmarks.

Names carry the common settings in the style of k-diffusion and diffusers; other
settings are keyword arguments of the solver's factory::

    get("dpm++2m")                    # dpm_solver_pp(2)
    get("unipc3-bh1")                 # unipc(3, variant="bh1")
    get("deis3", basis="rho")         # deis(3, basis="rho")
    get("ddim", eta=0.5)

``names()`` lists every canonical name. A factory's own name (``"dpm_solver_pp"``)
is accepted too, with its settings as keywords. Settings may also follow the name in
parentheses, ``get("dpm++2m(solver_type=heun)")``; that is how ``solver.name`` spells
settings the short name does not carry, so ``get(solver.name) == solver`` for every
solver the factories build.
"""

from __future__ import annotations

import ast
import re

from jdiff.solvers.ddim import ddim, ddpm
from jdiff.solvers.deis import deis
from jdiff.solvers.dpm_solver import dpm_solver, dpm_solver_pp, sde_dpm_solver_pp
from jdiff.solvers.dpm_solver_v3 import dpm_solver_v3
from jdiff.solvers.euler import euler, euler_maruyama, heun
from jdiff.solvers.ipndm import ipndm
from jdiff.solvers.unipc import unipc

__all__ = ["get", "names", "FACTORIES", "IDENTICAL"]

FACTORIES = {
    f.__name__: f
    for f in (ddim, ddpm, euler, heun, euler_maruyama, dpm_solver, dpm_solver_pp, sde_dpm_solver_pp, deis, unipc, ipndm)
}

# (pattern, factory, settings from the match); the order of this table is names()'s order
_PATTERNS = [
    (r"euler(?:-(?P<time>rho))?", euler, lambda m: {"time": m["time"]} if m["time"] else {}),
    (r"heun(?:-(?P<time>rho))?", heun, lambda m: {"time": m["time"]} if m["time"] else {}),
    (r"euler-maruyama", euler_maruyama, lambda m: {}),
    (r"ddim", ddim, lambda m: {}),
    (r"ddpm", ddpm, lambda m: {}),
    (r"dpm(?P<order>[123])", dpm_solver, lambda m: {"order": int(m["order"]), "method": "singlestep"}),
    (r"dpm(?P<order>[123])m", dpm_solver, lambda m: {"order": int(m["order"]), "method": "multistep"}),
    (r"dpm\+\+(?P<order>[123])s", dpm_solver_pp, lambda m: {"order": int(m["order"]), "method": "singlestep"}),
    (r"dpm\+\+(?P<order>[123])m", dpm_solver_pp, lambda m: {"order": int(m["order"]), "method": "multistep"}),
    # DPM-Solver-v3 needs its model statistics: get("dpm-v3-3", stats=...); not in names()
    (r"dpm-v3-(?P<order>[123])", dpm_solver_v3, lambda m: {"order": int(m["order"])}),
    (r"sde-dpm\+\+(?P<order>1|2m)", sde_dpm_solver_pp, lambda m: {"order": int(m["order"][0])}),
    (
        r"deis(?P<order>[123])(?:-(?P<basis>rho|log_rho))?",
        deis,
        lambda m: {"order": int(m["order"])} | ({"basis": m["basis"]} if m["basis"] else {}),
    ),
    (
        r"unipc(?P<order>[123])(?:-(?P<variant>bh1|bh2))?",
        unipc,
        lambda m: {"order": int(m["order"])} | ({"variant": m["variant"]} if m["variant"] else {}),
    ),
    (
        r"unip(?P<order>[123])(?:-(?P<variant>bh1|bh2))?",
        unipc,
        lambda m: {"order": int(m["order"]), "corrector": False} | ({"variant": m["variant"]} if m["variant"] else {}),
    ),
    (
        r"ipndm(?P<order>[1234])(?P<v>-v)?",
        ipndm,
        lambda m: {"order": int(m["order"])} | ({"variable_step": True} if m["v"] else {}),
    ),
]

_NAMES = (
    ["euler", "euler-rho", "heun", "heun-rho", "euler-maruyama", "ddim", "ddpm"]
    + [f"dpm{k}" for k in (1, 2, 3)]
    + [f"dpm{k}m" for k in (2, 3)]
    + [f"dpm++{k}s" for k in (2, 3)]
    + [f"dpm++{k}m" for k in (1, 2, 3)]
    + ["dpm++3m(variant=diffusers)"]
    + ["sde-dpm++1", "sde-dpm++2m"]
    + [f"deis{k}{b}" for k in (1, 2, 3) for b in ("", "-rho", "-log_rho")]
    + [f"unipc{k}{v}" for k in (1, 2, 3) for v in ("", "-bh1")]
    + [f"unip{k}" for k in (1, 2, 3)]
    + [f"ipndm{k}{v}" for k in (1, 2, 3, 4) for v in ("", "-v")]
)


# Registry names whose solver computes exactly the same steps as another one on the same
# grid (and, for the stochastic pair, the same noise): first-order exponential integrators
# are all DDIM, UniP-k without corrector (B(h) = e^h - 1) is DPM-Solver++(kM), first-order
# SDE-DPM-Solver++ is DDPM. tests/test_solvers.py proves each identity to float64 rounding;
# sweeps compute the target once and report the alias with the same numbers.
IDENTICAL = {
    "dpm1": "ddim",
    "dpm++1m": "ddim",
    "deis1": "ddim",
    "deis1-log_rho": "ddim",
    "unip1": "ddim",
    "euler-rho": "ddim",
    "ipndm1": "ddim",
    "unip2": "dpm++2m",
    "unip3": "dpm++3m",
    "sde-dpm++1": "ddpm",
}


def names() -> list[str]:
    """Every canonical solver name :func:`get` accepts (settings in the name)."""
    return list(_NAMES)


def get(name: str, **settings):
    """The solver called ``name`` (see the module docstring), with ``settings`` passed
    to its factory. Settings may not contradict the name."""
    if not isinstance(name, str):
        raise TypeError(f"a solver name must be a string, got {type(name).__name__}")
    name, settings = _split_settings(name, settings)
    key = name.strip().lower().replace("_pp", "++") if name not in FACTORIES else name
    if name in FACTORIES:
        factory, fixed = FACTORIES[name], {}
    else:
        found = [(f, fields(m)) for p, f, fields in _PATTERNS if (m := re.fullmatch(p, key))]
        if not found:
            raise ValueError(f"unknown solver {name!r}; known solvers: {', '.join(_NAMES)}")
        factory, fixed = found[0]
    clash = {k for k in fixed if k in settings and settings[k] != fixed[k]}
    if clash:
        raise ValueError(f"solver {name!r} fixes {', '.join(sorted(clash))}; do not pass a different value")
    try:
        return factory(**(fixed | settings))
    except TypeError as e:
        raise TypeError(f"solver {name!r}: {e}") from None


def _split_settings(name: str, settings: dict):
    """``"base(k=v, ...)"`` -> ``("base", settings | {k: v})``; values are Python
    literals, or plain strings when they are not."""
    m = re.fullmatch(r"\s*([^()]+?)\s*\((.*)\)\s*", name)
    if m is None:
        return name, settings
    parsed = {}
    for item in filter(None, (p.strip() for p in m[2].split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip().isidentifier():
            raise ValueError(f"solver {name!r}: settings in parentheses must read key=value, got {item!r}")
        try:
            parsed[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            parsed[k.strip()] = v.strip()
    clash = {k for k in parsed if k in settings and settings[k] != parsed[k]}
    if clash:
        raise ValueError(f"solver {name!r} fixes {', '.join(sorted(clash))}; do not pass a different value")
    return m[1], parsed | settings
