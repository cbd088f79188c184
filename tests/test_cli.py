"""The ``jdiff`` command line: presets and overrides, a tiny run end to end, exact
resume, sampling with several solvers, and the user-facing errors (exit status 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import _train_worker as W
import numpy as np
import pytest
from PIL import Image

from jdiff import cli
from jdiff import presets as P

# A toy2d run small enough to compile and train in a few seconds; class-conditional on
# the two moons (labels 0/1) with label dropout, so that guidance can be tested too.
TINY = [
    "data.class_conditional=true",
    "objective.label_dropout=0.2",
    "model.mlp.width=32",
    "model.mlp.num_blocks=1",
    "train.batch_size=64",
    "data.toy_size=512",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.keep=2",
    "train.grid_every=10",
    "sample.num=200",
    "sample.nfe=4",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
]


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_tiny(out, steps, capsys, *extra):
    argv = ["train", "--preset", "toy2d", "--out", out, "--no-progress", "--steps", steps]
    for s in TINY:
        argv += ["--set", s]
    code, o, e = run_cli(argv + list(extra), capsys)
    assert code == 0, e
    return o, e


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def restore(run, step=None):
    return cli.load_run_state(str(run), step)


def assert_trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ presets / overrides


def test_overrides_are_type_checked():
    cfg = P.apply_overrides(
        P.get_preset("digits"),
        [
            "optim.lr=3e-4",
            "train.steps=7",
            "ema.decay=none",
            "model.unet.channel_mult=1,2",
            "sample.solver=unipc",
            "data.class_conditional=false",
            "optim.clip_norm=none",
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.ema.decay is None
    assert cfg.model.unet.channel_mult == (1, 2) and cfg.sample.solver == "unipc"
    assert cfg.data.class_conditional is False and cfg.optim.clip_norm is None
    # The preset itself is untouched, and the JSON round trip is exact.
    assert P.get_preset("digits").optim.lr != 3e-4
    d = P.config_to_dict(cfg)
    assert P.config_to_dict(P.config_from_dict(json.loads(json.dumps(d)))) == d
    for bad, msg in [
        ("train.steps=1.5", "expected an integer"),
        ("optim.lr=fast", "expected a number"),
        ("ema.warmup=maybe", "expected a boolean"),
        ("sample.solver=rk4", "unknown solver"),
        ("optim.lrr=1", "did you mean optim.lr"),
        ("optim=1", "is a section"),
        ("train.steps", "key=value"),
        ("train.steps=0", "steps must be an integer >= 1"),
    ]:
        with pytest.raises(P.ConfigError, match=msg):
            P.apply_overrides(P.get_preset("digits"), [bad])
    with pytest.raises(P.ConfigError, match="valid presets: digits"):
        P.get_preset("mnist")
    # Every preset is a valid configuration.
    for name in P.preset_names():
        P.validate_config(P.get_preset(name))
    # Keys filled from the data are not settable.
    with pytest.raises(P.ConfigError, match="filled from the data"):
        P.apply_overrides(P.get_preset("digits"), ["model.unet.num_classes=3"])


# ----------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An uninterrupted 20-step toy2d run (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    code = cli.main(
        ["train", "--preset", "toy2d", "--out", str(out), "--no-progress", "--steps", "20"]
        + sum((["--set", s] for s in TINY), [])
    )
    assert code == 0
    return out


def test_train_writes_run_directory(tiny_run):
    run = tiny_run
    cfg = P.config_from_dict(json.load(open(run / "config.json")))
    assert cfg.name == "toy2d" and cfg.train.steps == 20 and cfg.model.mlp.width == 32
    info = json.load(open(run / "run.json"))
    assert info["data_shape"] == [2] and info["num_classes"] == 2
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert {"loss", "lr", "grad_norm", "steps_per_sec", "wall_time"} <= set(r)
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
    assert rows[-1]["loss"] < rows[0]["loss"]  # flow matching on moons learns fast at lr 1e-2
    assert rows[-1]["wall_time"] > rows[0]["wall_time"]
    assert sorted(os.listdir(run / "checkpoints")) == ["10", "20"]
    for png in ["samples/step_0000010.png", "samples/step_0000020.png", "loss.png"]:
        with Image.open(run / png) as im:
            assert im.format == "PNG" and min(im.size) > 100


def test_resume_matches_uninterrupted(tiny_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    o, _ = train_tiny(out, 20, capsys, "--stop-at", 7)
    assert "stopped at step 7/20" in o
    assert sorted(os.listdir(out / "checkpoints")) == ["7"]
    # Resume with the saved config (no --preset): steps 8..20 run and match the uninterrupted run.
    code, o, e = run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0, e
    said = [line for line in o.splitlines() if line.startswith("resumed")]
    assert len(said) == 1 and "step 7" in said[0], o  # reported once (by the library's loop)
    _, _, _, s_full, k_full = restore(tiny_run)
    _, _, _, s_res, k_res = restore(out)
    assert k_full == k_res == 20
    assert_trees_equal(s_full, s_res)  # params, optimizer state, EMA, step, rng: bit for bit
    # The metrics log is continuous, with the same losses as the uninterrupted run.
    # (the stopped run logged its partial interval at step 7; the line at 10 then covers 8..10)
    a, b = metrics(tiny_run), metrics(out)
    assert [r["step"] for r in b] == [5, 7, 10, 15, 20]
    np.testing.assert_allclose([r["loss"] for r in a[2:]], [r["loss"] for r in b[3:]], rtol=1e-6)
    assert a[0]["loss"] == b[0]["loss"]
    # A finished run has nothing left to do.
    code, o, _ = run_cli(["train", "--out", out, "--resume", "--no-progress"], capsys)
    assert code == 0 and "nothing to do" in o


@pytest.mark.parametrize(
    "solver,extra,nfe", [("ddim", [], 5), ("dpm_solver_pp", ["--order", "3"], 8), ("euler_maruyama", [], 6)]
)
def test_sample_solvers(tiny_run, tmp_path, capsys, solver, extra, nfe):
    png = tmp_path / f"{solver}.png"
    code, o, e = run_cli(
        ["sample", "--run", tiny_run, "--solver", solver, "--nfe", nfe, "--num", 50, "--out", png] + extra, capsys
    )
    assert code == 0, e
    z = np.load(tmp_path / f"{solver}.npz")
    assert z["samples"].shape == (50, 2) and np.all(np.isfinite(z["samples"]))
    assert int(z["nfe"]) == nfe and int(z["step"]) == 20
    assert z["labels"].tolist() == [i % 2 for i in range(50)]  # cycling through the classes
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100  # data | samples panels
    # The samples are on the moons' scale, not exploded noise.
    assert np.abs(z["samples"]).max() < 10


def test_sample_is_deterministic_and_batch_invariant(tiny_run, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    base = ["sample", "--run", tiny_run, "--solver", "unipc", "--nfe", 6, "--num", 30, "--seed", 3]
    assert run_cli(base + ["--out", a], capsys)[0] == 0
    assert run_cli(base + ["--out", b, "--batch-size", 8, "--no-ema"], capsys)[0] == 0
    assert run_cli(base + ["--out", tmp_path / "c.png", "--batch-size", 8], capsys)[0] == 0
    xa, xc = np.load(tmp_path / "a.npz")["samples"], np.load(tmp_path / "c.npz")["samples"]
    np.testing.assert_allclose(xa, xc, rtol=1e-5, atol=1e-6)  # chunking does not change a sample
    assert not np.allclose(xa, np.load(tmp_path / "b.npz")["samples"])  # EMA vs raw params differ


def test_guided_sampling_of_one_class(tiny_run, tmp_path, capsys):
    code, o, e = run_cli(
        [
            "sample",
            "--run",
            tiny_run,
            "--solver",
            "heun",
            "--nfe",
            6,
            "--num",
            40,
            "--label",
            1,
            "--guidance",
            2.0,
            "--out",
            tmp_path / "g",
        ],
        capsys,
    )
    assert code == 0, e
    z = np.load(tmp_path / "g.npz")
    assert os.path.exists(tmp_path / "g.png")
    assert z["samples"].shape == (40, 2) and np.all(np.isfinite(z["samples"]))
    assert z["labels"].tolist() == [1] * 40 and float(z["guidance"]) == 2.0


def test_digits_images_end_to_end(tmp_path, capsys):
    """Two steps of a class-conditional image model on the digits: an image grid with
    one column per class. (A one-block DiT: it compiles several times faster than a
    U-Net; the digits preset's own U-Net is built in the next test.)"""
    out = tmp_path / "digits"
    code, o, e = run_cli(
        [
            "train",
            "--preset",
            "digits",
            "--out",
            out,
            "--no-progress",
            "--steps",
            2,
            "--set",
            "model.kind=dit",
            "--set",
            "model.dit.patch_size=4",
            "--set",
            "model.dit.depth=1",
            "--set",
            "model.dit.hidden_dim=16",
            "--set",
            "model.dit.num_heads=2",
            "--set",
            "train.batch_size=16",
            "--set",
            "sample.num=20",
            "--set",
            "sample.nfe=2",
            "--set",
            "sample.solver=ddim",
            "--set",
            "sample.order=0",
            "--set",
            "sample.guidance=1",
        ],
        capsys,
    )
    assert code == 0, e
    info = json.load(open(out / "run.json"))
    assert info["num_classes"] == 10 and info["data_shape"] == [8, 8, 1]
    with Image.open(out / "samples" / "step_0000002.png") as im:
        # 20 samples in rows of 10 classes, each 8x8 image enlarged 6x, 6-pixel padding
        assert im.mode == "L" and im.size == (10 * 48 + 11 * 6, 2 * 48 + 3 * 6)
        a = np.asarray(im)
    assert a.std() > 0  # not a blank image
    # the NFE sweep of this run: FD-digits against its own training data, resumable
    bench = tmp_path / "bench"
    argv = ["bench", "--run", out, "--solvers", "ddim,dpm1", "--nfe", "2,3", "--num", 70, "--out", bench]
    code, o, e = run_cli(argv + ["--no-progress"], capsys)
    assert code == 0, e
    import csv

    rows = list(csv.DictReader(open(bench / "results.csv")))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("ddim", "2"), ("ddim", "3"), ("dpm1", "2"), ("dpm1", "3")]
    assert all(float(r["fd_digits"]) > 0 and 0 <= float(r["accuracy"]) <= 1 for r in rows)


def test_presets_build():
    """Every preset builds (shapes only): data, process, model."""
    from jdiff import models as M

    sizes = {}
    for name in P.preset_names():
        run = cli.build_run(P.get_preset(name), abstract=True)
        sizes[name] = (run.data_shape, run.num_classes, M.count_params(run.params))
    assert sizes["digits"] == ((8, 8, 1), 10, 816_193)
    assert sizes["toy2d"][:2] == ((2,), 0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "--preset", "mnist"], "unknown preset 'mnist'.*valid presets: digits, digits16, toy2d"),
        (
            ["train", "--preset", "toy2d", "--set", "optim.lrr=1"],
            "unknown config key 'optim.lrr'.*valid keys in 'optim'",
        ),
        (["train", "--preset", "toy2d", "--set", "train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["train", "--preset", "toy2d", "--set", "model.kind=resnet"], "valid choices: unet, mlp, dit"),
        (["train", "--preset", "toy2d", "--set", "model.kind=unet"], "data.source=toy gives 2-D vectors"),
        (["train", "--out", "/nonexistent/jdiff-run", "--resume"], "run directory not found"),
        (["train"], "give a preset"),
        (["sample", "--run", "/nonexistent/jdiff-run"], "run directory not found"),
        (["presets", "nope"], "unknown preset 'nope'"),
    ],
)
def test_errors_exit_2(argv, msg, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("jdiff ") and "Traceback" not in err
    import re

    assert re.search(msg, err), err


def test_sample_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    code, _, err = run_cli(["sample", "--run", run], capsys)
    assert code == 2 and "config.json" in err
    (run / "config.json").write_text(json.dumps(P.config_to_dict(P.get_preset("toy2d"))))
    code, _, err = run_cli(["sample", "--run", run], capsys)
    assert code == 2 and "no checkpoint found" in err
    code, _, err = run_cli(["train", "--out", run, "--resume"], capsys)
    assert code == 2 and "no checkpoint found" in err


def test_config_and_checkpoint_mismatch(tiny_run, tmp_path, capsys):
    # Training into a directory whose checkpoints are of another configuration.
    code, _, err = run_cli(
        ["train", "--preset", "toy2d", "--out", tiny_run, "--no-progress"]
        + sum((["--set", s] for s in TINY), [])
        + ["--set", "model.mlp.width=16"],
        capsys,
    )
    assert code == 2
    assert "different configuration" in err and "model.mlp.width: 32 -> 16" in err
    # A config.json that no longer matches its checkpoints (edited by hand, copied...).
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(tiny_run, run)
    cfg = json.load(open(run / "config.json"))
    cfg["model"]["mlp"]["width"] = 48
    (run / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["sample", "--run", run, "--num", 4], capsys)
    assert code == 2
    assert "different model" in err and "Traceback" not in err
    # Options that do not fit the run.
    code, _, err = run_cli(["sample", "--run", tiny_run, "--label", 2], capsys)
    assert code == 2 and "--label must be in [0, 2)" in err
    code, _, err = run_cli(["sample", "--run", tiny_run, "--solver", "ddim", "--order", 2], capsys)
    assert code == 2 and "no order option" in err


def test_data_shape_errors(tmp_path, capsys):
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((10, 8, 8, 3), np.uint8))
    code, _, err = run_cli(
        [
            "train",
            "--preset",
            "digits",
            "--out",
            tmp_path / "r",
            "--set",
            "data.source=npz",
            "--set",
            f"data.path={rgb}",
        ],
        capsys,
    )
    assert code == 2 and "3 channel" in err
    code, _, err = run_cli(
        [
            "train",
            "--preset",
            "digits",
            "--out",
            tmp_path / "r",
            "--set",
            "data.source=npz",
            "--set",
            f"data.path={rgb}",
            "--set",
            "data.channels=3",
            "--set",
            "data.resolution=16",
        ],
        capsys,
    )
    assert code == 2 and "16" in err


# -------------------------------------------------------------------- subprocesses


def _env():
    return W.subprocess_env()


def test_module_entry_points_and_help():
    """``python -m jdiff.cli`` answers --help; ``python -m jdiff`` reports a bad preset in one
    line (both entry points reach the same main)."""
    r = subprocess.run(
        [sys.executable, "-m", "jdiff.cli", "train", "--help"], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert r.returncode == 0 and "--preset" in r.stdout and "--resume" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "jdiff", "train", "--preset", "nope"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    cmd = (
        [
            sys.executable,
            "-m",
            "jdiff",
            "train",
            "--preset",
            "toy2d",
            "--out",
            str(out),
            "--no-progress",
            "--steps",
            "100000",
        ]
        + sum((["--set", s] for s in TINY), [])
        + ["--set", "train.log_every=1", "--set", "train.grid_every=0"]
    )
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 300  # a loaded machine may take minutes to log 3 steps
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert "SIGTERM" in stdout
    steps = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert steps and steps[-1] >= 3 and metrics(out)[-1]["step"] <= steps[-1] + 1


def test_presets_command(capsys):
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0 and all(name in out for name in P.preset_names())
    code, out, _ = run_cli(["presets", "digits", "--set", "train.steps=9"], capsys)
    assert code == 0
    cfg = P.config_from_dict(json.loads(out))
    assert cfg.train.steps == 9 and cfg.model.kind == "unet"
    code, out, _ = run_cli(["presets", "--keys"], capsys)
    assert code == 0 and "optim.clip_norm" in out and "[float | none]" in out


# ------------------------------------------------------- the rewrite changed no numbers

# Losses of steps 1..10 of `jdiff train --preset digits --steps 30 --no-progress --set
# train.batch_size=32 --set train.log_every=1 --set train.grid_every=0 --set
# train.checkpoint_every=1000`, logged by the CLI of commit 0bd8dd4 (before the CLI
# became a package over the library's config dataclasses) on CPU, seed 0.
DIGITS_REFERENCE_LOSSES = [
    0.24656648933887482,
    0.26007071137428284,
    0.27036726474761963,
    0.2670024037361145,
    0.3596642315387726,
    0.23598287999629974,
    0.28793948888778687,
    0.30658838152885437,
    0.2460022270679474,
    0.23320844769477844,
]


def test_digits_loss_curve_is_unchanged(tmp_path, capsys):
    """`jdiff train digits` builds the same model, objective, optimizer and data
    order as before: the same losses, step by step (float32 sums over the batch and
    the 816k parameters of ten AdamW steps: 1e-5 relative is about 100 float32 ulps,
    to allow for other CPUs' vectorization; on the machine that made the reference
    the losses are bit-identical)."""
    out = tmp_path / "digits"
    argv = ["train", "digits", "--out", out, "--steps", 30, "--stop-at", 10, "--no-progress"]
    # (sampling settings do not touch training: the final sample grid is kept cheap)
    for s in [
        "train.batch_size=32",
        "train.log_every=1",
        "train.grid_every=0",
        "train.checkpoint_every=1000",
        "sample.nfe=2",
        "sample.num=10",
    ]:
        argv += ["--set", s]
    code, o, e = run_cli(argv, capsys)
    assert code == 0, e
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in rows], DIGITS_REFERENCE_LOSSES, rtol=1e-5)


def test_jpeg_output_and_compilation_cache(tiny_run, tmp_path, capsys):
    """`--out s.jpg` writes a JPEG at s.jpg (and s.npz); the persistent compilation
    cache gets entries, so that the next run of the command does not compile again."""
    code, o, e = run_cli(["sample", "--run", tiny_run, "--nfe", 3, "--num", 8, "--out", tmp_path / "s.jpg"], capsys)
    assert code == 0, e
    with Image.open(tmp_path / "s.jpg") as im:
        assert im.format == "JPEG"
    assert os.path.exists(tmp_path / "s.npz") and not os.path.exists(tmp_path / "s.jpg.png")
    cache = tmp_path / "cache"
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jdiff.cli import enable_compilation_cache\n"
        "print(enable_compilation_cache())\n"
        "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).block_until_ready()\n"
    )
    env = _env() | {"JDIFF_CACHE_DIR": str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's own shared cache (conftest)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cache) and len(os.listdir(cache)) >= 1


def test_ctrl_c_is_reported_as_an_interrupt(tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "jdiff", "train", "toy2d", "--out", str(out), "--no-progress", "--steps", "100000"]
    cmd += sum((["--set", s] for s in TINY), []) + ["--set", "train.log_every=1", "--set", "train.grid_every=0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 300  # a loaded machine may take minutes to log 3 steps
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert "interrupted (SIGINT)" in stdout and "SIGTERM" not in stdout + stderr
    assert sorted(os.listdir(out / "checkpoints"))
