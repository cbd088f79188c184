"""jdiff.features: the FID InceptionV3 port against pytorch-fid, and the torch-free loader.

The reference numbers come from pytorch-fid itself (scripts/make_inception_fixture.py, run
once in a torch-only virtual environment): its InceptionV3, filled with the deterministic
pseudo-random weights that ``InceptionV3(seed=...)`` regenerates here, run on two small
uint8 images in float32 and in float64. The full 299x299 network is compiled twice in this
module (the layer-by-layer program and the features program), on those two images only.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import EPS32
from flax import nnx

from jdiff.features import (
    LAYER_NAMES,
    FeatureExtractor,
    InceptionExtractor,
    InceptionV3,
    UnsafePickleError,
    bilinear_resize_matrix,
    inception_features,
    inception_state_dict,
    load_inception,
    load_inception_state_dict,
    load_npz_state_dict,
    load_state_dict,
    load_torch_state_dict,
    save_inception_npz,
    save_npz,
)
from jdiff.features._random_weights import random_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# Tolerances of the float32 port against pytorch-fid's float32 network, relative to each
# layer's RMS. Both are float32 computations of the same sums in different orders: a
# convolution with fan-in K rounds at ~sqrt(K) * EPS32 relative (K <= 4032 here: ~8e-6),
# and about 20 of them compose along the longest path. The fixture measures pytorch-fid's
# own float32 error against its float64 run at up to 2.2e-5 of the RMS over 2048 sampled
# elements per layer, and the port differs from it by at most 1.5e-5 on this machine.
# 1e-4 (~840 EPS32) leaves a factor 4 for other CPUs' vector widths and stays three orders
# of magnitude below the errors of a wrong rule (measured once by swapping in a
# padding-counting average pool: sampled Mixed_5b elements moved by ~1 RMS, the features by
# 5e-2 relative).
LAYER_RTOL = 840 * EPS32  # ~1e-4
# The features average 64 positions of Mixed_7c: measured 4e-7 relative (norm) against
# both references; the requirement is 1e-4.
FEATURE_RTOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "inception_fid_reference.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(ref):
    return InceptionV3(seed=int(ref["seed"]))


@pytest.fixture(scope="module")
def layers(model, ref):
    """Every layer's output on the fixture's two images (one compiled program)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda st, x: nnx.merge(graphdef, st).layers(x))
    x = ref["images"].astype(np.float32) / 255.0  # pytorch-fid's ToTensor scaling
    return jax.tree.map(np.asarray, run(state, x))


@pytest.fixture(scope="module")
def features(model, ref):
    """The public path: uint8 images through inception_features (one compiled program)."""
    return inception_features(model, ref["images"], batch_size=2)


# ----------------------------------------------------------------- the port


def test_parameter_names_and_shapes_match_pytorch_fid(model, ref):
    torch_shapes = {str(n): tuple(int(d) for d in s.split(",")) for n, s in zip(ref["names"], ref["shapes"])}
    ours = {k: v.shape for k, v in inception_state_dict(model).items()}
    assert ours == torch_shapes
    assert len(ours) == 472  # 94 BasicConv2d x 5 tensors + fc weight and bias


def test_every_layer_matches_pytorch_fid(layers, ref):
    assert list(ref["layers"]) == [n for n in LAYER_NAMES if n not in ("pool3", "logits")]
    for name in ref["layers"]:
        out = layers[name].transpose(0, 3, 1, 2)  # NHWC -> pytorch's NCHW
        rms = float(ref[f"{name}/rms64"])
        sample = out.reshape(len(out), -1)[:, ref[f"{name}/index"]]
        chanmean = out.mean(axis=(2, 3), dtype=np.float64)
        for prec in ("32", "64"):
            err = np.abs(sample - ref[f"{name}/sample{prec}"]).max() / rms
            assert err <= LAYER_RTOL, f"{name}: sampled elements differ from torch float{prec} by {err:.2e} RMS"
            err = np.abs(chanmean - ref[f"{name}/chanmean{prec}"]).max() / rms
            assert err <= LAYER_RTOL, f"{name}: channel means differ from torch float{prec} by {err:.2e} RMS"


def test_features_match_pytorch_fid(features, layers, ref):
    assert features.shape == (2, 2048) and features.dtype == np.float32
    for prec in ("32", "64"):
        want = ref[f"features{prec}"]
        rel = np.linalg.norm(features - want) / np.linalg.norm(want)
        assert rel <= FEATURE_RTOL, f"features differ from pytorch-fid float{prec} by {rel:.2e} (relative)"
        assert np.abs(features - want).max() <= FEATURE_RTOL * np.abs(want).max()
        want = ref[f"logits{prec}"]
        assert np.linalg.norm(layers["logits"] - want) <= FEATURE_RTOL * np.linalg.norm(want)
    # uint8 scaled on device and floats scaled on the host, through two separately compiled
    # programs: equal up to float32 reassociation, far inside the tolerance against torch.
    rel = np.linalg.norm(features - layers["pool3"]) / np.linalg.norm(features)
    print(f"uint8 path vs float path: {rel:.2e}")
    assert rel <= FEATURE_RTOL


@pytest.mark.parametrize("case", range(8))
def test_bilinear_resize_matches_torch_interpolate(ref, case):
    n_in, n_out = (int(v) for v in ref["resize_cases"][case])
    x = ref[f"resize/{n_in}_{n_out}/input"]  # (2, n_in) rows
    want = ref[f"resize/{n_in}_{n_out}/output"]
    m = bilinear_resize_matrix(n_out, n_in)
    # Each output is w0 * a + w1 * b of values in [0, 1] with torch's weights (bit for bit,
    # below): only the order of one multiply-add's roundings may differ, 2 EPS32.
    np.testing.assert_allclose(x @ m.T, want, rtol=0, atol=2 * EPS32)
    rows, cols = ref[f"resize/{n_in}_{n_out}/weights"]
    np.testing.assert_array_equal(np.stack(np.nonzero(m)), np.stack([rows, cols]))
    np.testing.assert_array_equal(m[rows, cols], ref[f"resize/{n_in}_{n_out}/weight_values"])
    np.testing.assert_allclose(m.sum(1), 1.0, atol=2 * EPS32)  # a partition of unity
    if n_in == n_out:
        np.testing.assert_array_equal(m, np.eye(n_in))


def test_inception_features_batches_and_extractor(model, ref, features):
    images = ref["images"]
    # Three images in batches of 2: the last batch is padded, the program is the same one.
    x3 = np.concatenate([images, images[:1]])
    f3 = inception_features(model, x3, batch_size=2)
    np.testing.assert_array_equal(f3[:2], features)
    np.testing.assert_array_equal(f3[2], features[0])
    ext = InceptionExtractor(model, batch_size=2)
    assert isinstance(ext, FeatureExtractor) and ext.dim == 2048 and ext.name == "inception-v3"
    np.testing.assert_array_equal(ext(images[1:]), features[1:])


@pytest.mark.parametrize(
    "images, batch_size, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32) + 1.5, 2, r"\[0, 1\].*1\.5"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), 2, r"\[0, 1\]"),
        (np.zeros((2, 8, 8, 4), np.uint8), 2, r"C = 1 or 3.*\(2, 8, 8, 4\)"),
        (np.zeros((8, 8, 3), np.uint8), 2, r"NHWC"),
        (np.zeros((2, 8, 8, 3), np.int32), 2, r"uint8.*int32"),
        (np.zeros((2, 8, 8, 3), np.uint8), 0, r"batch_size.*0"),
    ],
)
def test_inception_features_rejects_bad_input(model, images, batch_size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        inception_features(model, images, batch_size=batch_size)


# ----------------------------------------------------------------- weights: names, shapes, npz


def test_load_state_dict_errors_name_the_problem(model):
    sd = inception_state_dict(model)
    before = np.asarray(model.Mixed_7c.branch_pool.kernel[...]).copy()
    cases = []
    bad = dict(sd)
    del bad["Mixed_6b.branch7x7_2.conv.weight"]
    cases.append((bad, r"1 missing: Mixed_6b\.branch7x7_2\.conv\.weight"))
    bad = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    cases.append((bad, r"1 unexpected: AuxLogits\.fc\.weight"))
    bad = dict(sd, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3), np.float32)})
    cases.append((bad, r"Mixed_7c\.branch_pool\.conv\.weight has shape \(192, 2048, 3, 3\).*\(192, 2048, 1, 1\)"))
    bad = dict(sd, **{"fc.bias": np.full(1008, np.inf, np.float32)})
    cases.append((bad, r"fc\.bias has non-finite values"))
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            load_inception_state_dict(model, bad)
    # A failed load copies nothing.
    np.testing.assert_array_equal(np.asarray(model.Mixed_7c.branch_pool.kernel[...]), before)
    # BatchNorm's num_batches_tracked entries (int64 in every torch state dict) are ignored.
    load_inception_state_dict(model, dict(sd, **{"Conv2d_1a_3x3.bn.num_batches_tracked": np.int64(0)}))


def test_npz_round_trip(model, tmp_path):
    path = tmp_path / "inception.npz"
    save_inception_npz(path, model)
    loaded = load_inception(path)
    a, b = inception_state_dict(model), inception_state_dict(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and the layouts: the kernel of a (1, 7) convolution, OIHW in the file, HWIO in NNX
    np.testing.assert_array_equal(
        np.asarray(loaded.Mixed_6b.branch7x7_2.kernel[...]),
        np.transpose(a["Mixed_6b.branch7x7_2.conv.weight"], (2, 3, 1, 0)),
    )
    np.testing.assert_array_equal(np.asarray(loaded.fc.kernel[...]), a["fc.weight"].T)


def test_random_weights_do_not_depend_on_order():
    shapes = {"a.conv.weight": (4, 3, 3, 3), "a.bn.running_var": (4,), "fc.bias": (5,)}
    x = random_state_dict(shapes, 3)
    y = random_state_dict(dict(reversed(list(shapes.items()))), 3)
    for k in shapes:
        np.testing.assert_array_equal(x[k], y[k])
    assert np.all(x["a.bn.running_var"] > 0)
    assert not np.array_equal(random_state_dict(shapes, 4)["fc.bias"], x["fc.bias"])


# ----------------------------------------------------------------- the torch-free loader


def _tiny_expected():
    """The values scripts/make_inception_fixture.py's tiny_state_dict saved."""
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * np.float32(0.5) - np.float32(3.0)
    return {
        "weight": np.ones(3, np.float32),
        "bias": np.zeros(3, np.float32),
        "running_mean": np.zeros(3, np.float32),
        "running_var": np.ones(3, np.float32),
        "num_batches_tracked": np.array(0, np.int64),
        "w": w,
        "w_perm": w.transpose(2, 0, 1),
        "w_slice": w[1, 1:, ::2],
        "f64": np.array([np.pi, -np.e, 1e-300], np.float64),
        "f16": np.array([0.5, -2.0, 65504.0], np.float16),
        "bf16": np.array([1.5, -0.25, 3.0], ml_dtypes.bfloat16),
        "i64": np.array(7, np.int64),
        "i32": np.array([[1, -2], [3, -4]], np.int32),
        "u8": np.array([0, 255, 128], np.uint8),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "nested.inner": np.arange(5, dtype=np.int16),
    }


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_loader_reads_torch_files_exactly(fmt, tmp_path):
    path = os.path.join(FIXTURES, f"torch_tiny_{fmt}.pth")
    assert zipfile.is_zipfile(path) == (fmt == "zip")
    got = load_torch_state_dict(path)
    want = _tiny_expected()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
        assert got[k].flags.c_contiguous and got[k].flags.writeable, k
    # the same arrays survive the .npz round trip (load_state_dict dispatches on the suffix)
    save_npz(tmp_path / "tiny.npz", got)
    back = load_state_dict(tmp_path / "tiny.npz")
    assert list(back) == list(want)
    for k, v in want.items():
        assert back[k].dtype == (np.float32 if k == "bf16" else v.dtype), k  # .npz has no bfloat16
        np.testing.assert_array_equal(back[k], v.astype(back[k].dtype), err_msg=k)
    assert load_npz_state_dict(tmp_path / "tiny.npz").keys() == back.keys()


def _payload_runs(data: bytes, n_pickles: int, cwd) -> bool:
    """Control: plain pickle does execute the payload (the file really is hostile)."""
    import io

    f = io.BytesIO(data)
    for _ in range(n_pickles):
        pickle.load(f)
    made = os.path.exists(os.path.join(cwd, "JDIFF_PWNED"))
    if made:
        os.remove(os.path.join(cwd, "JDIFF_PWNED"))
    return made


@pytest.mark.parametrize("name, n_pickles", [("zip", 1), ("legacy", 4), ("inst", 1)])
def test_loader_refuses_malicious_pickles_without_running_them(name, n_pickles, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the payload writes ./JDIFF_PWNED
    path = os.path.join(FIXTURES, "malicious", f"malicious_{name}.pth")
    with pytest.raises(UnsafePickleError, match=r"refusing to load global builtins\.exec"):
        load_torch_state_dict(path)
    with pytest.raises(UnsafePickleError):
        load_inception(path)
    assert not os.path.exists(tmp_path / "JDIFF_PWNED")
    with open(path, "rb") as f:
        raw = f.read()
    if name == "zip":
        raw = zipfile.ZipFile(path).read("archive/data.pkl")
    assert _payload_runs(raw, n_pickles, tmp_path)


def test_loader_refuses_other_globals_and_bad_files(tmp_path):
    # A NumPy array pickle is harmless but is not a tensor: not on the allow-list.
    with zipfile.ZipFile(tmp_path / "np.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": np.ones(3)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"numpy"):
        load_torch_state_dict(tmp_path / "np.pth")
    # A name that looks like torch's but is not a tensor rebuild.
    with zipfile.ZipFile(tmp_path / "tl.pth", "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02ctorch\nload\n.")
    with pytest.raises(UnsafePickleError, match=r"torch\.load"):
        load_torch_state_dict(tmp_path / "tl.pth")
    # Not a torch file at all; a zip without data.pkl; a state dict holding a non-tensor.
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"not a torch\.save file"):
        load_torch_state_dict(tmp_path / "junk.pth")
    with zipfile.ZipFile(tmp_path / "empty.pth", "w") as zf:
        zf.writestr("archive/other", b"")
    with pytest.raises(ValueError, match=r"data\.pkl"):
        load_torch_state_dict(tmp_path / "empty.pth")
    with zipfile.ZipFile(tmp_path / "str.pth", "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": "text"}, protocol=2))
    with pytest.raises(ValueError, match=r"'a' is a str, not a tensor"):
        load_torch_state_dict(tmp_path / "str.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        load_torch_state_dict(tmp_path / "missing.pth")


def test_loader_rejects_truncated_and_inconsistent_files(tmp_path):
    src = os.path.join(FIXTURES, "torch_tiny_legacy.pth")
    data = open(src, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"storage"):
        load_torch_state_dict(tmp_path / "cut.pth")
    # zip: one storage's bytes shortened
    with zipfile.ZipFile(os.path.join(FIXTURES, "torch_tiny_zip.pth")) as zin:
        with zipfile.ZipFile(tmp_path / "short.pth", "w") as zout:
            for n in zin.namelist():
                b = zin.read(n)
                zout.writestr(n, b[:-1] if n.endswith("/data/0") else b)
    with pytest.raises(ValueError, match=r"should hold .* bytes"):
        load_torch_state_dict(tmp_path / "short.pth")


@pytest.mark.skipif(
    not os.environ.get("JDIFF_INCEPTION_BIG_DIR"), reason="set JDIFF_INCEPTION_BIG_DIR (see fixture script)"
)
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_full_size_torch_files(fmt, ref, model):  # manual: needs the 95 MB files --big-dir writes
    sd = load_torch_state_dict(os.path.join(os.environ["JDIFF_INCEPTION_BIG_DIR"], f"random_inception_{fmt}.pth"))
    mine = inception_state_dict(model)
    for k, v in mine.items():
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
