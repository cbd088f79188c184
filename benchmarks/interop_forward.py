"""Forward pass per image of jdiff's diffusers-format architectures against diffusers' own
torch forward of the same weights, in the same run (issue 23, item 5).

Models (random weights, the real checkpoints' shapes):

- ``unet-cifar10``: ``google/ddpm-cifar10-32``'s ``UNet2DModel`` config (Ho et al. 2020:
  channels 128, 256, 256, 256, two residual blocks per level, single-head attention at
  16x16, 35.7M parameters), 32x32x3 inputs, DDPM timesteps.

diffusers and torch are never jdiff dependencies: the torch half runs in its own
virtualenv (``--venv``, default ``$JDIFF_DIFFUSERS_VENV`` or ``/work/refenv``) in a
subprocess that builds the diffusers model from the config (``torch.manual_seed(0)``),
writes its weights as ``.safetensors`` and times its eager forward under
``torch.inference_mode``; then jdiff loads those weights with ``from_diffusers`` and times
its jitted forward (compilation excluded). Each side is timed in float32 and in bfloat16
(torch: ``model.to(torch.bfloat16)``; jdiff: bfloat16 parameters and compute,
normalizations and softmax in float32). Each time is the minimum over ``--repeat`` calls
after one warm-up call (the least noisy estimate on a shared machine), divided by the
batch. The float32 outputs are also compared (largest difference relative to the output's
largest magnitude), a full-size check of the equivalence the tests make on tiny models.

    python benchmarks/interop_forward.py [--models unet-cifar10] [--batch 8] [--repeat 5]

prints a table and writes ``benchmarks/results/interop_forward.csv``.
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
DTYPES = ("float32", "bfloat16")


def unet_cifar10_config() -> dict:
    """``google/ddpm-cifar10-32``'s ``config.json`` (its keys and values; attention heads of
    all channels, as DDPM's single-head attention)."""
    return {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }


def unet_inputs(config: dict, batch: int, seed: int = 0) -> dict:
    """NCHW noise and DDPM timesteps (integers in [0, 1000), as floats)."""
    rng = np.random.default_rng(seed)
    s, c = config["sample_size"], config["in_channels"]
    return {
        "x": rng.standard_normal((batch, c, s, s), dtype=np.float32),
        "t": rng.integers(0, 1000, batch).astype(np.float32),
    }


# name -> (config, inputs(config, batch)); other architectures add their entries here
MODELS = {"unet-cifar10": (unet_cifar10_config, unet_inputs)}


# --------------------------------------------------------------------------- torch half


def _torch_call(model, class_name: str, inp: dict, dtype):
    import torch  # the torch half runs in its own virtualenv, without jdiff

    x = torch.from_numpy(inp["x"]).to(dtype)
    if class_name == "UNet2DModel":
        return model(x, torch.from_numpy(inp["t"])).sample
    raise ValueError(f"no torch call for {class_name}")


def _torch_side(folder: str, repeat: int, threads: int) -> None:
    import diffusers  # the torch half runs in its own virtualenv, without jdiff
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    inp = dict(np.load(os.path.join(folder, "inputs.npz")))
    name = config["_class_name"]
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "weights.safetensors"))
    res = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": threads}}
    for dt in DTYPES:
        tdt = getattr(torch, dt)
        m = model.to(tdt)
        with torch.inference_mode():
            out = _torch_call(m, name, inp, tdt)  # warm-up
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                _torch_call(m, name, inp, tdt)
                times.append(time.perf_counter() - t0)
        res[dt] = min(times)
        if dt == "float32":
            np.save(os.path.join(folder, "out_float32.npy"), out.float().numpy())
    with open(os.path.join(folder, "torch.json"), "w") as f:
        json.dump(res, f)


# --------------------------------------------------------------------------- jdiff half


def _jdiff_model(config: dict, weights, dtype):
    import jax.numpy as jnp  # jdiff's half only: the torch half's virtualenv has no JAX

    from jdiff.interop.unet2d import from_diffusers

    if config["_class_name"] == "UNet2DModel":
        dt = getattr(jnp, dtype)
        model = from_diffusers(config, weights, dtype=dt, param_dtype=dt)
        return model, lambda apply, params, inp: apply(params, inp["x_nhwc"].astype(dt), inp["t"])
    raise ValueError(f"no jdiff model for {config['_class_name']}")


def _jdiff_side(folder: str, repeat: int) -> dict:
    import jax  # jdiff's half only: the torch half's virtualenv has no JAX
    from safetensors.numpy import load_file

    import jdiff

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    inp = dict(np.load(os.path.join(folder, "inputs.npz")))
    inp["x_nhwc"] = inp["x"].transpose(0, 2, 3, 1)
    state = load_file(os.path.join(folder, "weights.safetensors"))
    res = {}
    for dt in DTYPES:
        model, call = _jdiff_model(config, state, dt)
        apply, params = jdiff.models.functional(model)
        fwd = jax.jit(lambda p, i, apply=apply, call=call: call(apply, p, i))
        args = {k: jax.device_put(v) for k, v in inp.items() if k != "x"}
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(params, args))
        res[f"compile_{dt}"] = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, args))
            times.append(time.perf_counter() - t0)
        res[dt] = min(times)
        if dt == "float32":
            res["out_float32"] = np.asarray(out).transpose(0, 3, 1, 2)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses every core)")
    ap.add_argument("--venv", default=os.environ.get("JDIFF_DIFFUSERS_VENV", "/work/refenv"))
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "interop_forward.csv"))
    ap.add_argument("--torch-side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_side:
        return _torch_side(args.torch_side, args.repeat, args.threads)

    sys.path.insert(0, HERE)
    from _common import machine, table, today, write_csv

    rows, csv_rows = [], []
    load = os.getloadavg()[0]  # a shared machine: the load the numbers were taken under
    for name in args.models.split(","):
        config_fn, inputs_fn = MODELS[name]
        config = config_fn()
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f)
            np.savez(os.path.join(tmp, "inputs.npz"), **inputs_fn(config, args.batch))
            cmd = [os.path.join(args.venv, "bin", "python"), __file__, "--torch-side", tmp]
            cmd += ["--repeat", str(args.repeat), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True)
            with open(os.path.join(tmp, "torch.json")) as f:
                ref = json.load(f)
            ref_out = np.load(os.path.join(tmp, "out_float32.npy"))
            res = _jdiff_side(tmp, args.repeat)
        diff = float(np.abs(res["out_float32"] - ref_out).max() / np.abs(ref_out).max())
        for dt in DTYPES:
            jd, tc = 1e3 * res[dt] / args.batch, 1e3 * ref[dt] / args.batch
            rows.append(
                [name, dt, args.batch, f"{jd:.1f}", f"{tc:.1f}", f"{tc / jd:.2f}", f"{res['compile_' + dt]:.1f}"]
            )
            csv_rows.append(
                dict(
                    model=name,
                    dtype=dt,
                    batch=args.batch,
                    jdiff_ms_per_image=round(jd, 3),
                    torch_ms_per_image=round(tc, 3),
                    torch_over_jdiff=round(tc / jd, 3),
                    jdiff_compile_s=round(res["compile_" + dt], 2),
                    max_rel_diff_float32=f"{diff:.2e}",
                    torch=ref["versions"]["torch"],
                    diffusers=ref["versions"]["diffusers"],
                    torch_threads=args.threads,
                    load_avg_1min=round(load, 1),
                    machine=machine(),
                    date=today(),
                )
            )
        print(f"{name}: float32 outputs differ by {diff:.2e} of their largest magnitude", flush=True)
    versions = f"torch {ref['versions']['torch']} ({args.threads} threads)"
    print(f"# {machine()}; {versions}; load average {load:.1f} at the start; {today()}")
    header = ["model", "dtype", "batch", "jdiff ms/image", "torch ms/image", "torch / jdiff", "jdiff compile s"]
    print(table(rows, header))
    write_csv(args.csv, csv_rows)


if __name__ == "__main__":
    main()
