"""Generate the fixtures that check jdiff's InceptionV3 port and its torch-free weights loader
against pytorch-fid itself.

Run it once, in a virtual environment of its own (torch is never a jdiff dependency):

    python -m venv /work/venvs/torchref
    /work/venvs/torchref/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0
    /work/venvs/torchref/bin/python scripts/make_inception_fixture.py [--big-dir /tmp/incep_big]

(torch and torchvision must be a matching pair; an unpinned torch may pull a
mismatched build). The script imports nothing from jdiff but
``jdiff/features/_random_weights.py``, loaded by path (NumPy only).

What it writes:

- ``tests/fixtures/inception_fid_reference.npz``: pytorch-fid's FID InceptionV3 built by
  pytorch-fid's own code (``pytorch_fid.inception.InceptionV3()``, whose weight download is
  replaced by the deterministic pseudo-random state dict ``random_state_dict(shapes, SEED)``
  that the test regenerates), run on two small uint8 images: the final 2048-d features, the
  ``fc`` logits, and for every layer (the resized input, each stem convolution and max pool,
  each Mixed block, pool3) its per-channel spatial means and ``SAMPLES`` elements at fixed
  random positions, in float32 (pytorch-fid's precision) and float64 (the same network run
  in double, the rounding-free reference); also the state dict's names and shapes, and
  ``F.interpolate``'s bilinear resize (outputs and its nonzero weights) for several
  (input, output) sizes;
- ``tests/fixtures/torch_tiny_zip.pth`` and ``torch_tiny_legacy.pth``: a tiny state dict
  (the values are formulas that the test recomputes: views, offsets, strides, shared
  storage, several dtypes, a 0-d and an empty tensor, nested dicts, a module's
  ``_metadata``) saved by ``torch.save`` in the zip and the legacy format;
- with ``--big-dir``: the full random InceptionV3 state dict saved in both formats there
  (about 95 MB each; not committed) for a manual check of the loader on full-size files
  (``JDIFF_INCEPTION_BIG_DIR=... pytest tests/test_inception.py``).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import zlib

import numpy as np
import pytorch_fid
import pytorch_fid.inception as pfi
import torch
import torch.nn.functional as F

SEED = 20151205
SAMPLES = 1024
IMAGE_SHAPE = (2, 37, 45, 3)  # two images, odd non-square size: the resize is an upsample
RESIZE_CASES = [(37, 299), (45, 299), (317, 299), (600, 299), (299, 299), (13, 5), (5, 13), (1, 4)]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def _random_weights_module():
    path = os.path.join(ROOT, "jdiff", "features", "_random_weights.py")
    spec = importlib.util.spec_from_file_location("_random_weights", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_fid_inception():
    """pytorch-fid's ``InceptionV3()`` (FID blocks, 1008 classes) with random weights.

    pytorch-fid builds torchvision's network, patches in its FID blocks and loads the
    downloaded state dict; here the download returns ``random_state_dict`` for the shapes
    of the very network it is about to fill (found in a first pass), so every module is
    pytorch-fid's own and ``load_state_dict`` (strict) checks the names.
    """
    rw = _random_weights_module()
    captured = {}
    original_load = torch.nn.Module.load_state_dict

    def capture(self, state_dict, *args, **kwargs):
        captured.update({k: tuple(v.shape) for k, v in self.state_dict().items()})
        return None

    pfi.load_state_dict_from_url = lambda *a, **k: {}
    torch.nn.Module.load_state_dict = capture
    try:
        pfi.fid_inception_v3()
    finally:
        torch.nn.Module.load_state_dict = original_load
    shapes = {k: s for k, s in captured.items() if not k.endswith("num_batches_tracked")}
    values = rw.random_state_dict(shapes, SEED)
    state = collections.OrderedDict()
    for k in captured:
        state[k] = torch.zeros((), dtype=torch.int64) if k not in values else torch.from_numpy(values[k])
    pfi.load_state_dict_from_url = lambda *a, **k: state
    model = pfi.InceptionV3([3]).eval()  # default: pool3 block, resize and normalize on
    return model, state, shapes


def layer_hooks(model):
    """Forward hooks recording every layer's output by its jdiff name."""
    b0, b1, b2, b3 = model.blocks
    named = {
        "Conv2d_1a_3x3": b0[0],
        "Conv2d_2a_3x3": b0[1],
        "Conv2d_2b_3x3": b0[2],
        "maxpool1": b0[3],
        "Conv2d_3b_1x1": b1[0],
        "Conv2d_4a_3x3": b1[1],
        "maxpool2": b1[2],
        "pool3": b3[3],
    }
    for i, name in enumerate(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"]):
        named[name] = b2[i]
    named["Mixed_6e"] = b2[7]
    for i, name in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"]):
        named[name] = b3[i]
    out = {}
    handles = [b0.register_forward_pre_hook(lambda m, args: out.__setitem__("input", args[0].detach().clone()))]
    for name, module in named.items():
        handles.append(
            module.register_forward_hook(lambda m, a, y, name=name: out.__setitem__(name, y.detach().clone()))
        )
    return out, handles


def run(model, state, images_nchw, dtype):
    model = model.to(dtype)
    out, handles = layer_hooks(model)
    with torch.no_grad():
        (pool,) = model(images_nchw.to(dtype))
        pool = pool.flatten(1)
        out["pool3"] = pool
        out["logits"] = F.linear(pool, state["fc.weight"].to(dtype), state["fc.bias"].to(dtype))
    for h in handles:
        h.remove()
    return {k: v.numpy() for k, v in out.items()}


def make_images():
    rng = np.random.default_rng(SEED)
    n, h, w, c = IMAGE_SHAPE
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    smooth = np.stack([yy, xx, 1 - yy * xx], -1)[None] * 255
    noise = rng.integers(-60, 61, (n, h, w, c))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)  # NHWC, as jdiff takes images


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-dir", default=None, help="also write the full random state dict as .pth files here")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    os.makedirs(FIXTURES, exist_ok=True)

    model, state, shapes = build_fid_inception()
    images = make_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor scaling
    ref32 = run(model, state, x, torch.float32)
    ref64 = run(model, state, x, torch.float64)

    data = {
        "seed": np.int64(SEED),
        "images": images,
        "names": np.array(list(shapes)),
        "shapes": np.array([",".join(map(str, s)) for s in shapes.values()]),
        "features32": ref32["pool3"].astype(np.float32),
        "features64": ref64["pool3"],
        "logits32": ref32["logits"].astype(np.float32),
        "logits64": ref64["logits"],
        "versions": np.array([torch.__version__, pytorch_fid.__version__]),
    }
    layers = [k for k in ref32 if k not in ("pool3", "logits")]
    data["layers"] = np.array(layers)
    print(f"{'layer':16s} {'shape (NCHW)':22s} {'rms':>9s} {'rel err f32 vs f64':>19s}")
    for name in layers:
        a32, a64 = ref32[name], ref64[name]
        rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
        idx = rng.choice(a32[0].size, size=min(SAMPLES, a32[0].size), replace=False).astype(np.int32)
        data[f"{name}/index"] = idx  # flat index into one image's (C, H, W)
        data[f"{name}/sample32"] = a32.reshape(len(a32), -1)[:, idx].astype(np.float32)
        data[f"{name}/sample64"] = a64.reshape(len(a64), -1)[:, idx]
        data[f"{name}/chanmean32"] = a32.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)
        data[f"{name}/chanmean64"] = a64.mean(axis=(2, 3))
        data[f"{name}/rms64"] = np.sqrt(np.mean(a64**2))
        rel = np.abs(a32 - a64).max() / np.sqrt(np.mean(a64**2))
        print(f"{name:16s} {str(a32.shape):22s} {np.sqrt(np.mean(a64**2)):9.4f} {rel:19.2e}")
    f32, f64 = ref32["pool3"], ref64["pool3"]
    print(f"features: rel err f32 vs f64 {np.linalg.norm(f32 - f64) / np.linalg.norm(f64):.2e}")

    for n_in, n_out in RESIZE_CASES:
        rng = np.random.default_rng([SEED, n_in, n_out])
        src = rng.random((1, 2, n_in, 3), dtype=np.float32)
        y = F.interpolate(torch.from_numpy(src), size=(n_out, 3), mode="bilinear", align_corners=False)
        data[f"resize/{n_in}_{n_out}/input"] = src[0, :, :, 0]
        data[f"resize/{n_in}_{n_out}/output"] = y.numpy()[0, :, :, 0]
        # torch's interpolation weights themselves: resize one-hot rows, keep the nonzeros
        eye = torch.eye(n_in).reshape(1, n_in, n_in, 1)
        w = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)[0, :, :, 0].numpy().T
        rows, cols = np.nonzero(w)
        data[f"resize/{n_in}_{n_out}/weights"] = np.stack([rows, cols]).astype(np.int32)
        data[f"resize/{n_in}_{n_out}/weight_values"] = w[rows, cols]
    data["resize_cases"] = np.array(RESIZE_CASES, np.int64)

    path = os.path.join(FIXTURES, "inception_fid_reference.npz")
    np.savez_compressed(path, **data)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)")

    tiny = tiny_state_dict()
    for fmt, zip_ in (("zip", True), ("legacy", False)):
        p = os.path.join(FIXTURES, f"torch_tiny_{fmt}.pth")
        torch.save(tiny, p, _use_new_zipfile_serialization=zip_)
        print(f"wrote {p} ({os.path.getsize(p)} bytes)")

    if args.big_dir:
        os.makedirs(args.big_dir, exist_ok=True)
        for fmt, zip_ in (("zip", True), ("legacy", False)):
            p = os.path.join(args.big_dir, f"random_inception_{fmt}.pth")
            torch.save(state, p, _use_new_zipfile_serialization=zip_)
            print(f"wrote {p} ({os.path.getsize(p) / 1e6:.1f} MB)")


def tiny_state_dict():
    """Small tensors whose values tests/test_inception.py recomputes with NumPy."""
    sd = torch.nn.BatchNorm2d(3).state_dict()  # an OrderedDict with _metadata (a BUILD opcode)
    w = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) * 0.5 - 3.0
    sd["w"] = w
    sd["w_perm"] = w.permute(2, 0, 1)  # shares w's storage, non-contiguous strides
    sd["w_slice"] = w[1, 1:, ::2]  # storage offset 16, strides (4, 2)
    sd["f64"] = torch.tensor([np.pi, -np.e, 1e-300], dtype=torch.float64)
    sd["f16"] = torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16)
    sd["bf16"] = torch.tensor([1.5, -0.25, 3.0], dtype=torch.bfloat16)
    sd["i64"] = torch.tensor(7, dtype=torch.int64)  # 0-d
    sd["i32"] = torch.tensor([[1, -2], [3, -4]], dtype=torch.int32)
    sd["u8"] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    sd["flags"] = torch.tensor([True, False, True])
    sd["empty"] = torch.zeros((0, 3))
    sd["nested"] = {"inner": torch.arange(5, dtype=torch.int16)}
    return sd


if __name__ == "__main__":
    main()
