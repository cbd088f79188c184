"""``jdiff bench --model`` (jdiff.bench_model): the NFE-versus-FID sweep on any denoiser.

The model is a tiny latent model: the exact denoiser of a Gaussian mixture on 4x4x2
"latents" (plus a small class offset, so classifier-free guidance changes it), decoded to
8x8x3 images by a fixed random linear map and tanh. The feature network is a fixed random
projection to 6 dimensions, so FID's machinery runs without the 299x299 InceptionV3.
Run as a script (``python tests/test_bench_model.py OUT``) it writes the sweep's images and
rows, which the sharding test does under 4 fake devices.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import _train_worker as W
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EPS32
from PIL import Image

import jdiff
from jdiff import bench_model as BM
from jdiff import cli
from jdiff.bench import BenchSettings
from jdiff.cli import bench as bench_cli
from jdiff.metrics import frechet_distance, gaussian_stats, save_stats
from jdiff.sweep import plan_cells

LATENT = (4, 4, 2)
IMAGE = (8, 8, 3)
NUM = 10  # samples per cell: more than the 6 feature dimensions; the 4-device batch is padded
SOLVERS = ("ddim", "dpm++2m")
NFES = (3, 6)


class TinyFeatures:
    """A fixed random feature network (``FeatureExtractor``): uint8 or [0, 1] images ->
    6 features; it records every batch it is given."""

    name = "tiny"
    dim = 6

    def __init__(self, fail_at: int | None = None):
        self.proj = np.random.default_rng(1).standard_normal((int(np.prod(IMAGE)), self.dim)) / 8.0
        self.seen: list[np.ndarray] = []
        self.fail_at = fail_at

    def __call__(self, images):
        images = np.asarray(images)
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise KeyboardInterrupt  # the job is killed while scoring this cell
        self.seen.append(images)
        x = images.astype(np.float64) / (255.0 if images.dtype == np.uint8 else 1.0)
        return np.tanh(x.reshape(len(x), -1) @ self.proj)


@functools.cache  # one model: its compiled sampling programs serve every test
def tiny_model(num_classes: int | None = None):
    """The tiny latent model, with the attributes ``jdiff.interop.load_diffusers`` gives:
    the exact denoiser of latents ``N(m, diag(s^2))`` (plus a class offset)."""
    process = jdiff.vp_cosine()
    rng = np.random.default_rng(3)
    m = jnp.asarray(rng.standard_normal(LATENT), jnp.float32)
    s2 = jnp.asarray(rng.uniform(0.2, 1.0, LATENT) ** 2, jnp.float32)

    def apply(x, t, cond):
        a, sg = (f(t)[:, None, None, None] for f in (process.alpha, process.sigma))
        eps = sg * (x - a * m) / (a * a * s2 + sg * sg)  # E[eps | x] for Gaussian data
        if cond is not None:
            eps = eps + 0.05 * (cond.astype(x.dtype) - 1.0)[:, None, None, None]
        return eps

    w = jnp.asarray(np.random.default_rng(2).standard_normal((int(np.prod(LATENT)), int(np.prod(IMAGE)))) / 4.0)

    def decode(z):
        return jnp.tanh(z.reshape(len(z), -1) @ w).reshape(len(z), *IMAGE)

    den = jdiff.Denoiser(apply_fn=apply, process=process, prediction="eps")
    return SimpleNamespace(denoiser=den, shape=LATENT, decode=decode, num_classes=num_classes, null_class=num_classes)


def settings(**kw):
    return BenchSettings(**dict(dict(solvers=SOLVERS, nfes=NFES, num=NUM, progress=False), **kw))


def sharded_run(out: str) -> dict:
    """The sweep with the float images scored (no uint8 rounding) and every scored batch
    recorded: what the sharding test compares between device counts."""
    feats = TinyFeatures()
    ref = (np.zeros(TinyFeatures.dim), np.eye(TinyFeatures.dim))
    m = tiny_model()
    s = settings(solvers=("dpm++2m",))
    res = BM.model_sweep(m.denoiser, m.shape, out, ref, s, decode=m.decode, features=feats, quantize=False)
    return dict(devices=jax.device_count(), images=np.stack(feats.seen), fd=[r["fd_tiny"] for r in res.rows])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref_images():
    return np.random.default_rng(0).integers(0, 256, (30, *IMAGE), dtype=np.uint8)


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory, ref_images):
    d = tmp_path_factory.mktemp("ref_images")
    for i, img in enumerate(ref_images):
        sub = d / ("a" if i < 15 else "b")  # read recursively, in the order of the array
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:03d}.png")
    return d


@pytest.fixture(scope="module")
def ref_npz(tmp_path_factory, ref_images):
    return save_stats(tmp_path_factory.mktemp("ref") / "stats.npz", *gaussian_stats(TinyFeatures()(ref_images)))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ref_folder):
    out = str(tmp_path_factory.mktemp("sweep"))
    feats, lines = TinyFeatures(), []
    res = BM.model_bench(tiny_model(), out, str(ref_folder), settings(), features=feats, report=lines.append)
    return SimpleNamespace(out=out, rows=res.rows, feats=feats, lines=lines)


def fd_of(rows):
    return {(r["solver"], r["nfe"]): r["fd_tiny"] for r in rows}


# ----------------------------------------------------------------------------- tests
def test_one_row_per_cell_and_the_main_jobs_outputs(sweep):
    assert [(r["solver"], r["nfe"]) for r in sweep.rows] == [(s, n) for s in SOLVERS for n in NFES]
    assert all(r["nfe_used"] == r["nfe"] and r["finite"] and r["fd_tiny"] > 0 for r in sweep.rows)
    # the reference folder is read once (30 images), then one batch of NUM images per cell
    assert [len(x) for x in sweep.feats.seen] == [30] + [NUM] * 4
    assert sweep.lines[0].startswith("ddim nfe 3: fd_tiny ") and len(sweep.lines) == 4
    with open(os.path.join(sweep.out, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == 4
    md = open(os.path.join(sweep.out, "results.md")).read()
    assert "| dpm++2m | " in md and "#### fd_tiny: the best of each solver family per NFE" in md
    assert os.path.getsize(os.path.join(sweep.out, "fd_vs_nfe.png")) > 1000
    assert len([f for f in os.listdir(sweep.out) if f.startswith("reference_stats_")]) == 1
    # a second-order solver beats DDIM at NFE 6 on this smooth model
    fd = fd_of(sweep.rows)
    assert fd[("dpm++2m", 6)] < fd[("ddim", 6)]


def test_fid_equals_the_direct_computation(sweep, ref_images):
    m, feats = tiny_model(), TinyFeatures()
    ref = gaussian_stats(feats(ref_images))
    solvers, cells, _ = plan_cells(SOLVERS, NFES, m.denoiser.process)
    decode = jax.jit(m.decode)
    seen = iter(sweep.feats.seen[1:])
    for name, nfe, grid in cells:
        max_steps = max(len(g) - 1 for n, _, g in cells if n == name)  # the sweep's padded loop
        z = jdiff.generate(solvers[name], m.denoiser, NUM, LATENT, nfe=nfe, grid=grid, max_steps=max_steps)
        images = np.clip(np.rint((np.asarray(decode(z)) + 1) * 127.5), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(images, next(seen))
        want = frechet_distance(*gaussian_stats(feats(images)), *ref)
        got = fd_of(sweep.rows)[(name, nfe)]
        assert abs(got - want) <= 1e-12 * want, (name, nfe, got, want)


def test_npz_and_folder_references_agree(sweep, ref_folder, ref_npz, ref_images, tmp_path):
    feats = TinyFeatures()
    from_folder = BM.reference_stats(str(ref_folder), feats, IMAGE)
    from_npz = BM.reference_stats(ref_npz, feats, IMAGE)
    from_array = BM.reference_stats(ref_images, feats, IMAGE)
    for a, b in zip(from_folder, from_npz):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(from_folder, from_array):
        np.testing.assert_array_equal(a, b)
    # the same sweep against the .npz gives the same FIDs (one cell, already compiled)
    res = BM.model_bench(tiny_model(), str(tmp_path), ref_npz, settings(solvers=("ddim",), nfes=(6,)), features=feats)
    assert res.rows[0]["fd_tiny"] == fd_of(sweep.rows)[("ddim", 6)]


def test_resuming_an_interrupted_sweep_recomputes_nothing(sweep, ref_folder, ref_npz, tmp_path):
    with pytest.raises(KeyboardInterrupt):  # killed while scoring the third cell
        BM.model_bench(tiny_model(), str(tmp_path), ref_npz, settings(), features=TinyFeatures(fail_at=2))
    with open(tmp_path / "cells.jsonl") as f:
        assert len(f.readlines()) == 2
    assert not (tmp_path / "results.csv").exists()
    feats, lines = TinyFeatures(), []
    res = BM.model_bench(tiny_model(), str(tmp_path), ref_npz, settings(), features=feats, report=lines.append)
    assert len(feats.seen) == 2 and len(lines) == 2  # the two missing cells, nothing else
    assert fd_of(res.rows) == fd_of(sweep.rows)  # the folder's statistics are the npz's
    # a finished sweep run again computes nothing, not even the folder's statistics
    feats = TinyFeatures()
    again = BM.model_bench(tiny_model(), sweep.out, str(ref_folder), settings(), features=feats)
    assert feats.seen == [] and fd_of(again.rows) == fd_of(sweep.rows)
    # other settings into the same folder are refused before any work
    with pytest.raises(ValueError, match="other settings"):
        BM.model_bench(tiny_model(), str(tmp_path), ref_npz, settings(seed=1), features=TinyFeatures())


def test_sharding_over_four_devices_gives_the_same_samples(tmp_path):
    env = W.subprocess_env(devices=4)
    r = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "four")], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    four = np.load(tmp_path / "four" / "run.npz")
    one = sharded_run(str(tmp_path / "one"))
    assert int(four["devices"]) == 4 and one["devices"] != 4
    assert one["images"].shape == (2, NUM, *IMAGE)
    # float32 rounding of a few operations per step (6 steps), the decoder's 32-term sums
    np.testing.assert_allclose(four["images"], one["images"], rtol=0, atol=256 * EPS32)
    np.testing.assert_allclose(four["fd"], one["fd"], rtol=1e-4)


def test_guidance_and_the_models_own_grid(ref_npz, tmp_path):
    m = tiny_model(num_classes=3)
    asked = []

    def grid(steps):  # the model's scheduler grid: uniform in t here
        asked.append(steps)
        return jdiff.time_grid(m.denoiser.process, steps, kind="uniform")

    model = SimpleNamespace(**vars(m), grid=grid)
    s = settings(solvers=("ddim",), nfes=(3,), guidance=2.0, grid_kind="model")
    (row,) = BM.model_bench(model, str(tmp_path / "g"), ref_npz, s, features=TinyFeatures()).rows
    assert asked == [3] and row["nfe_used"] == 6 and row["fd_tiny"] > 0  # two network calls per evaluation
    s = dataclasses.replace(s, guidance=1.0)
    (plain,) = BM.model_bench(model, str(tmp_path / "p"), ref_npz, s, features=TinyFeatures()).rows
    assert plain["nfe_used"] == 3 and plain["fd_tiny"] != row["fd_tiny"]
    with pytest.raises(ValueError, match="grid for 3 steps must be 4 finite times, got shape"):
        plan_cells(["ddim"], [3], m.denoiser.process, grid_fn=lambda n: np.linspace(1, 0, n))
    with pytest.raises(ValueError, match="grid kind 'model' needs the model's own grid"):
        BM.model_sweep(m.denoiser, LATENT, str(tmp_path / "x"), ref_npz, s, features=TinyFeatures())


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """``jdiff bench --model`` with the tiny model as what the folder loads and the tiny
    feature network as the InceptionV3 its weights give."""
    model_dir, weights = tmp_path / "model", tmp_path / "weights.pth"
    model_dir.mkdir()
    weights.write_bytes(b"")
    loaded = []
    monkeypatch.setattr(BM, "load_model", lambda path: loaded.append(path) or tiny_model())
    monkeypatch.setattr(BM, "inception_extractor", lambda w: TinyFeatures())
    monkeypatch.setattr(bench_cli, "INCEPTION_DIM", TinyFeatures.dim)
    return ["bench", "--model", model_dir, "--inception", weights, "--no-progress"], loaded


def test_cli_model_sweep(tiny_cli, sweep, ref_folder, tmp_path, capsys):
    base, loaded = tiny_cli
    argv = base + ["--reference", ref_folder, "--solvers", "dpm++2m", "--nfe", "3,6", "--samples", NUM]
    code, out, err = run_cli(argv + ["--out", tmp_path / "o"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("dpm++2m nfe 3: fd_tiny ") and lines[1].startswith("dpm++2m nfe 6: fd_tiny ")
    assert lines[2].startswith("model sweep: 2 cells in ") and lines[2].endswith(f"{tmp_path / 'o'}/results.md")
    assert loaded == [str(base[2])]
    with open(tmp_path / "o" / "results.csv") as f:
        got = {(r["solver"], int(r["nfe"])): float(r["fd_tiny"]) for r in csv.DictReader(f)}
    want = fd_of(sweep.rows)
    assert got == {k: want[k] for k in got}  # the library's numbers (csv keeps every digit)
    # guidance on an unconditional model: one line, before any sampling
    code, out, err = run_cli(argv + ["--guidance", "2", "--out", tmp_path / "g"], capsys)
    assert (code, out) == (2, "")
    assert err == "jdiff bench: error: guidance 2.0 needs a class-conditional model; this one has no classes\n"
    assert not os.path.exists(tmp_path / "g")


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--reference", "REF", "--samples", "6"], "--samples: a Frechet distance on 6-dimensional features"),
        (["--samples", "12"], "--model needs --reference"),
        (["--reference", "/nonexistent", "--samples", "12"], "--reference: not found: /nonexistent"),
        (["--reference", "BAD", "--samples", "12"], "lacks key(s) ['mu', 'sigma']"),
        (["--reference", "REF", "--samples", "12", "--run", "r"], "--model excludes --run"),
        (["--reference", "REF", "--samples", "12", "--grid-kind", "nope"], "--grid-kind: unknown kind 'nope'"),
    ],
)
def test_cli_model_refuses_bad_input_before_loading(tiny_cli, ref_npz, extra, msg, tmp_path, capsys):
    base, loaded = tiny_cli
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(6))
    extra = [{"REF": ref_npz, "BAD": bad}.get(a, a) for a in extra]
    code, out, err = run_cli(base + extra + ["--out", tmp_path / "o"], capsys)
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert loaded == [] and not os.path.exists(tmp_path / "o")


def test_cli_model_options(tmp_path, capsys):
    bad = tmp_path / "weights.pth"  # unreadable weights: refused before the model is loaded
    bad.write_text("not weights")
    for argv, msg in [
        (["--model", tmp_path / "none"], "--model: model folder not found"),
        (["--model", tmp_path, "--reference", tmp_path], "--model needs --inception"),
        (["--reference", tmp_path], "--reference applies to --model"),
        (["--model", tmp_path, "--reference", tmp_path, "--inception", bad, "--samples", 2049], "not a torch.save"),
    ]:
        code, out, err = run_cli(["bench", *argv, "--out", tmp_path / "o"], capsys)
        assert code == 2 and msg in err, err


if __name__ == "__main__":  # the sharding test's worker: python tests/test_bench_model.py OUT
    os.makedirs(sys.argv[1], exist_ok=True)
    np.savez(os.path.join(sys.argv[1], "run.npz"), **sharded_run(os.path.join(sys.argv[1], "sweep")))
