"""``jdiff bench`` (the NFE sweep): results, the known orderings on the exact testbed,
aliases, resuming a killed sweep, and every bad input refused before sampling."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from jdiff import cli


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


def test_main_job_on_the_shipped_digits_model(tmp_path, capsys):
    argv = ["bench", "--no-testbed", "--solvers", "dpm++2m", "--nfe", "4", "--num", "30", "--out", tmp_path]
    code, out, err = run_cli(argv + ["--no-progress"], capsys)
    assert code == 0, err
    (row,) = read_csv(os.path.join(tmp_path, "digits", "results.csv"))
    assert np.isfinite(float(row["fd_digits"])) and float(row["fd_digits"]) > 0
    assert float(row["accuracy"]) >= 0.8  # class-conditional samples of the shipped model


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
