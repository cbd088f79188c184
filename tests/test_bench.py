"""``jdiff bench`` (the NFE sweep): results, the known orderings on the exact testbed,
aliases, resuming a killed sweep, and every bad input refused before sampling."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from jdiff import bench as B
from jdiff import cli
from jdiff import solvers as S
from jdiff.sweep import FAMILIES, family_best, family_table, solver_family


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def testbed_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--testbed-only", "--solvers", "ddim,dpm++2m,unip2", "--nfe", "3,10,20", "--out", out]
    assert cli.main([str(a) for a in argv] + ["--no-progress"]) == 0
    return out


def test_testbed_sweep_orders_and_converges(testbed_sweep):
    rows = read_csv(os.path.join(testbed_sweep, "testbed", "results.csv"))
    fd = {(r["solver"], int(r["nfe"])): float(r["fd_exact"]) for r in rows}
    assert len(fd) == 9
    # the exact distance shrinks with NFE for each solver
    for s in ("ddim", "dpm++2m"):
        assert fd[(s, 3)] > fd[(s, 10)] > fd[(s, 20)], s
    # at NFE 10 the second-order exponential integrator beats DDIM
    assert fd[("dpm++2m", 10)] < fd[("ddim", 10)]
    # UniP-2 is DPM-Solver++(2M): reported with the same numbers, marked as such
    for n in (3, 10, 20):
        assert fd[("unip2", n)] == fd[("dpm++2m", n)]
    assert {r["same_as"] for r in rows if r["solver"] == "unip2"} == {"dpm++2m"}
    md = open(os.path.join(testbed_sweep, "testbed", "results.md")).read()
    assert "| unip2 (= dpm++2m) |" in md and "Floor" in md
    assert "| **best of all** |" in md  # the front beside the full table
    # the gap to the floor (the mean finite-sample distance of exact samples) shrinks by
    # far more than the NFE ratio for a second-order solver: (20 / 3)^2 ~ 44
    floor = float(md.split("same sample count = ")[1].split()[0])
    assert fd[("dpm++2m", 20)] - floor < (fd[("dpm++2m", 3)] - floor) / 20
    png = os.path.join(testbed_sweep, "testbed", "fd_vs_nfe.png")
    assert os.path.getsize(png) > 1000


def test_killed_sweep_resumes_without_recomputing(testbed_sweep, capsys):
    d = os.path.join(testbed_sweep, "testbed")
    cells = os.path.join(d, "cells.jsonl")
    lines = open(cells).read().splitlines()
    assert len(lines) == 6  # the alias is not computed
    # a kill in the middle of writing the fourth cell: two whole cells and a torn line
    with open(cells, "w") as f:
        f.write("\n".join(lines[:2]) + "\n" + lines[2][:17])
    kept = [json.loads(x) for x in lines[:2]]
    argv = ["bench", "--testbed-only", "--solvers", "ddim,dpm++2m,unip2", "--nfe", "3,10,20", "--out", testbed_sweep]
    code, out, err = run_cli(argv + ["--no-progress"], capsys)
    assert code == 0, err
    rows = read_csv(os.path.join(d, "results.csv"))
    assert len(rows) == 9
    seconds = {(r["solver"], int(r["nfe"])): float(r["seconds"]) for r in rows}
    for k in kept:  # the finished cells were read back, not recomputed
        assert seconds[(k["solver"], k["nfe"])] == k["seconds"]
    # other settings into the same folder are refused
    code, out, err = run_cli(argv[:-2] + ["--seed", "3", "--out", testbed_sweep, "--no-progress"], capsys)
    assert code == 2 and "other settings" in err


# FD-digits of this configuration recorded from the code before the recipes moved from
# jdiff/cli/bench.py to jdiff/bench.py (commit 22cf768, under this suite's XLA settings);
# accuracy was 1.0 in every cell.
RECORDED_FD = {
    ("ddim", 3): 3.6195044516492416,
    ("ddim", 6): 3.2709907949135655,
    ("ddim", 12): 3.2906704245787566,
    ("dpm++3m", 3): 3.4182059061899395,
    ("dpm++3m", 6): 3.789868353476635,
    ("dpm++3m", 12): 3.399790856882184,
}


def test_main_job_fd_unchanged_and_the_ode_error_column(tmp_path, capsys):
    # the reference is DPM-Solver++(3M) at 12 steps: the sweep's own dpm++3m cell at NFE 12
    argv = ["bench", "--no-testbed", "--solvers", "ddim,dpm++3m", "--nfe", "3,6,12", "--num", "20"]
    code, out, err = run_cli(argv + ["--ode-steps", "12", "--out", tmp_path, "--no-progress"], capsys)
    assert code == 0, err
    assert out.startswith("digits sweep: 6 cells in ")
    rows = read_csv(os.path.join(tmp_path, "digits", "results.csv"))
    fd = {(r["solver"], int(r["nfe"])): float(r["fd_digits"]) for r in rows}
    assert fd.keys() == RECORDED_FD.keys()
    for k, v in RECORDED_FD.items():  # FD-digits unchanged by the move
        assert abs(fd[k] - v) <= 1e-6, (k, fd[k], v)
    assert all(float(r["accuracy"]) == 1.0 for r in rows)
    ode = {(r["solver"], int(r["nfe"])): float(r["ode_l2"]) for r in rows}
    # the reference solver at the reference's steps is the reference, sample by sample:
    # the same noises and labels in the same order
    assert ode[("dpm++3m", 12)] == 0.0
    # both ODE solvers converge to it
    for s in ("ddim", "dpm++3m"):
        assert ode[(s, 3)] > ode[(s, 6)] > ode[(s, 12)], (s, ode)
    assert ode[("dpm++3m", 6)] < ode[("ddim", 6)]  # third order beats first at NFE 6
    assert os.path.exists(os.path.join(tmp_path, "digits", "ode_reference_dpm++3m_12.npy"))
    md = open(os.path.join(tmp_path, "digits", "results.md")).read()
    assert "#### mean L2 to the converged ODE solution from the same noises" in md
    assert "dpm++3m at 12 steps" in md and "stochastic solvers" in md
    assert "#### ode_l2: the best of each solver family per NFE" in md
    assert "| DPM-Solver++ | " in md and "| DDIM / DDPM | " in md
    # a folder's cached reference belongs to its sweep: another reference into it is refused
    code, _, err = run_cli(argv + ["--ode-steps", "20", "--out", tmp_path, "--no-progress"], capsys)
    assert code == 2 and "ode_reference: 'dpm++3m@12' there, 'dpm++3m@20' now" in err, err


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    f = tmp_path / "results"
    f.write_text("not a folder")
    code, out, err = run_cli(["bench", "--out", f], capsys)
    assert (code, out) == (2, "")
    assert err == f"jdiff bench: error: --out {f} exists and is not a directory\n"
    code, out, err = run_cli(["bench", "--out", f / "sub"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot be created" in err, err
    # the library refuses it too, before any work
    with pytest.raises(ValueError, match="exists and is not a directory"):
        B.bench(str(f))
    with pytest.raises(ValueError, match=f"cannot be created: {f} is not a directory"):
        B.bench(str(f / "sub"))
    assert f.read_text() == "not a folder"


def test_every_registry_solver_has_a_family():
    fams = {n: solver_family(n) for n in S.names()}
    named = {f for f, _ in FAMILIES}
    assert set(fams.values()) == named, {n: f for n, f in fams.items() if f not in named}
    assert [fams[n] for n in ("dpm++2m", "dpm2m", "unip2", "ddpm", "sde-dpm++2m", "heun-rho", "ipndm4-v")] == [
        "DPM-Solver++",
        "DPM-Solver",
        "UniPC",
        "DDIM / DDPM",
        "SDE / SA-Solver",
        "Euler / Heun",
        "iPNDM",
    ]
    assert solver_family("newsolver2") == "newsolver"


def test_family_best_and_table():
    rows = [
        dict(solver="dpm++2m", nfe=5, m=0.5),
        dict(solver="dpm++3m", nfe=5, m=0.3),
        dict(solver="dpm++3m", nfe=10, m=float("nan")),
        dict(solver="dpm++2m", nfe=10, m=0.2),
        dict(solver="unipc2", nfe=5, skipped="too few"),
        dict(solver="unipc3", nfe=10, m=0.1),
        dict(solver="unip3", nfe=10, m=0.1, same_as="unipc3"),
    ]
    best = family_best(rows, "m")
    assert {f: {n: r["solver"] for n, r in b.items()} for f, b in best.items()} == {
        "DPM-Solver++": {5: "dpm++3m", 10: "dpm++2m"},
        "UniPC": {10: "unipc3"},  # the first of equal values: the solver, not its alias
    }
    table = family_table(rows, "m")
    assert "| DPM-Solver++ | 0.3 (dpm++3m) | 0.2 (dpm++2m) |" in table
    assert "| UniPC | - | 0.1 (unipc3) |" in table
    assert "| **best of all** | 0.3 (dpm++3m) | 0.1 (unipc3) |" in table


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--solvers", "ddim,nope"], "unknown solver(s) nope"),
        (["--nfe", "3,0"], "--nfe must list positive integers"),
        (["--nfe", "three"], "--nfe must be a comma-separated list"),
        (["--num", "1"], "--num must be >= 2"),
        (["--guidance", "nan"], "--guidance must be finite"),
        (["--ref", "x.npz"], "apply to --run"),
        (["--run", "/nonexistent/run"], "run directory not found"),
        (["--no-testbed", "--testbed-only"], "exclude each other"),
        (["--ode-steps", "-1"], "--ode-steps must be >= 0"),
    ],
)
def test_bad_input_is_refused_before_sampling(extra, msg, capsys, tmp_path):
    code, out, err = run_cli(["bench", "--out", tmp_path / "o", *extra], capsys)
    assert code == 2 and msg in err, err
    assert not os.path.exists(tmp_path / "o")


def test_bad_reference_statistics_and_sample_count(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(64), cov=np.eye(64))
    code, _, err = run_cli(["bench", "--run", run, "--ref", bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--ref" in err and "mu" in err, err
    nan = tmp_path / "nan.npz"
    np.savez(nan, mu=np.full(64, np.nan), sigma=np.eye(64))
    code, _, err = run_cli(["bench", "--run", run, "--ref", nan, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "non-finite" in err, err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(2048), sigma=np.eye(2048))
    code, _, err = run_cli(["bench", "--run", run, "--ref", wrong, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "dimension 2048" in err, err
    code, _, err = run_cli(["bench", "--run", run, "--num", "50", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--num" in err, err
    assert not os.path.exists(tmp_path / "o")
