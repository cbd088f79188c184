"""Forward pass of a DiT-XL/2-shaped transformer: jdiff (jitted) against diffusers (torch
eager) on the same random weights, per image, in float32 and bfloat16 (issue 23, point 5).

diffusers and torch are never jdiff dependencies: the torch half runs in a separate
virtualenv in a subprocess (``--venv``, default ``$JDIFF_DIFFUSERS_VENV`` or
``/work/refenv``). It builds diffusers' ``DiTTransformer2DModel`` with DiT-XL/2's config
(28 layers, 16 heads x 72, patch 2, 32x32x4 latents, 1000 classes, learned sigma) and its
default random initialization (seeded), saves it as a diffusers folder (safetensors),
records its float32 output, and stays up as a timing server. jdiff loads that folder with
:func:`jdiff.interop.dit.from_diffusers` (so both run the same weights), checks its output
against torch's and times its jitted forward; the timed calls alternate between the two
(torch eager under ``torch.inference_mode``, then jdiff), so both see the same machine
load, with the same number of threads (``--threads``). Each time is the fastest of
``--repeat`` calls after a warm-up call (compilation excluded), divided by the batch.
Rows of the CSV for other cells are kept, so ``--dtypes float32`` and ``--dtypes bfloat16``
can be run one at a time.

bfloat16: torch converts the module (``model.to(torch.bfloat16)``), jdiff stores the
parameters and multiplies in bfloat16 (layer norms, softmax, conditioning and residual
stream in float32).

Run::

    python benchmarks/interop_forward_dit.py [--batch 2] [--repeat 3] [--threads 2]

It prints a table and writes ``benchmarks/results/interop_forward_dit.csv`` (machine and
date in each row). ``--layers 2`` gives a quick smoke run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

DIT_XL_2 = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    sample_size=32,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
    activation_fn="gelu-approximate",
)


def _inputs(batch: int, config: dict):
    rng = np.random.default_rng(0)
    size, c = config["sample_size"], config["in_channels"]
    x = rng.standard_normal((batch, c, size, size)).astype(np.float32)
    t = np.linspace(999.0, 1.0, batch).round().astype(np.float32)
    y = np.arange(batch, dtype=np.int64) * 7 % (config["num_embeds_ada_norm"] + 1)
    return x, t, y


def torch_side(args) -> None:
    """Run in the diffusers virtualenv as a server: build and save the model, write its
    float32 output, then time one forward per ``run DTYPE`` line read from stdin."""
    # imported here: this half runs in the diffusers virtualenv, which has no jax
    import diffusers
    import torch
    from diffusers import DiTTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = json.loads(args.config)
    model = DiTTransformer2DModel(**config).eval()
    model.save_pretrained(args.folder, safe_serialization=True)
    x, t, y = _inputs(args.batch, config)
    tt, yt = torch.from_numpy(t), torch.from_numpy(y)
    with torch.inference_mode():
        out = model(torch.from_numpy(x), timestep=tt, class_labels=yt).sample
    np.save(os.path.join(args.folder, "torch_out.npy"), out.numpy())
    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(info), flush=True)
    current = "float32"
    for line in sys.stdin:
        dtype = line.split()[1]
        if dtype != current:
            model, current = model.to(getattr(torch, dtype)), dtype
        xt = torch.from_numpy(x).to(getattr(torch, dtype))
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(xt, timestep=tt, class_labels=yt)
            print(time.perf_counter() - t0, flush=True)


def _mmap_safetensors(path: str) -> dict:
    """The tensors of a ``.safetensors`` file as read-only views of a memory map (no copy
    in memory, so the 2.7 GB checkpoint and the torch model fit beside jdiff's copy)."""
    kinds = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        lo, hi = entry["data_offsets"]
        out[key] = data[lo:hi].view(kinds[entry["dtype"]]).reshape(entry["shape"])
    return out


def jdiff_side(args, folder: str, torch_proc) -> tuple[dict, dict]:
    """Load the torch side's folder, check the output, and time the jitted forward,
    interleaving each call with one of the torch server's (the same machine load for both)."""
    # imported here: this half runs in jdiff's environment, which has no torch
    import jax
    import jax.numpy as jnp

    from jdiff.interop import Weights
    from jdiff.interop.dit import from_diffusers
    from jdiff.models import functional

    def torch_call(dtype):
        torch_proc.stdin.write(f"run {dtype}\n")
        torch_proc.stdin.flush()
        return float(torch_proc.stdout.readline())

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    x, t, y = _inputs(args.batch, config)
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    t, y = jnp.asarray(t), jnp.asarray(y.astype(np.int32))
    ref = np.load(os.path.join(folder, "torch_out.npy")).transpose(0, 2, 3, 1)
    ours, theirs = {}, {}
    for dtype in args.dtypes.split(","):
        dt = getattr(jnp, dtype)
        state = _mmap_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        model = from_diffusers(config, Weights(state), dtype=dt, param_dtype=dt)
        del state
        apply, params = functional(model)
        del model
        fwd = jax.jit(apply)
        xd = x.astype(dt)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fwd(params, xd, t, y))
        ours[f"{dtype}_compile"] = time.perf_counter() - t0
        ours[f"{dtype}_rel_err"] = float(np.abs(np.asarray(out, np.float32) - ref).max() / np.abs(ref).max())
        torch_call(dtype)  # warm-up (and the conversion to dtype)
        mine, other = [], []
        for _ in range(args.repeat):
            other.append(torch_call(dtype))
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, xd, t, y))
            mine.append(time.perf_counter() - t0)
        ours[dtype], theirs[dtype] = min(mine) / args.batch, min(other) / args.batch
        print(
            f"  {dtype}: jdiff {ours[dtype]:.3f} s per image (first call with compilation "
            f"{ours[dtype + '_compile']:.1f} s), torch {theirs[dtype]:.3f} s per image; "
            f"max |jdiff - torch float32| / max |torch| = {ours[dtype + '_rel_err']:.1e}",
            flush=True,
        )
        del params, fwd, out
    return ours, theirs


def _merge(path: str, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of ``path`` for other (model, dtype, batch, threads) cells,
    so the float32 and bfloat16 runs can be made one at a time."""
    cell = lambda r: (r["model"], r["dtype"], str(r["batch"]), str(r["threads"]))  # noqa: E731
    if not os.path.exists(path):
        return rows
    with open(path, newline="") as f:
        old = [r for r in csv.DictReader(f) if cell(r) not in {cell(n) for n in rows}]
    return [{k: r.get(k, "") for k in rows[0]} for r in old] + rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=os.environ.get("JDIFF_DIFFUSERS_VENV", "/work/refenv"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", type=int, default=28, help="transformer blocks (28: DiT-XL/2)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default=os.path.join(HERE, "results", "interop_forward_dit.csv"))
    p.add_argument("--torch-side", dest="folder", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.folder:
        torch_side(args)
        return

    config = {**DIT_XL_2, "num_layers": args.layers}
    if args.threads != os.cpu_count():
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}"
        )
    sys.path.insert(0, HERE)
    from _common import machine, table, today, write_csv

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "transformer")
        cmd = [os.path.join(args.venv, "bin", "python"), __file__, "--torch-side", folder]
        cmd += ["--config", json.dumps(config), "--batch", str(args.batch), "--threads", str(args.threads)]
        print(f"building and saving the model in diffusers ({args.layers} layers) ...", flush=True)
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            torch_info = json.loads(proc.stdout.readline())
            print(f"timing, batch {args.batch}, {args.threads} threads, interleaved:", flush=True)
            ours, theirs = jdiff_side(args, folder, proc)
            proc.stdin.close()

    where, date = machine(), today()
    load = f"{os.getloadavg()[1]:.1f}"  # the machine's load over the last 5 minutes (shared machines)
    rows, csv_rows = [], []
    for dtype in args.dtypes.split(","):
        ratio = theirs[dtype] / ours[dtype]
        rows.append(
            [
                dtype,
                f"{ours[dtype]:.3f}",
                f"{theirs[dtype]:.3f}",
                f"{ratio:.2f}",
                f"{ours[dtype + '_rel_err']:.1e}",
            ]
        )
        csv_rows.append(
            dict(
                model=f"DiT-XL/2-shaped ({args.layers} layers)",
                dtype=dtype,
                batch=args.batch,
                threads=args.threads,
                repeat=args.repeat,
                load_average=load,
                jdiff_s_per_image=round(ours[dtype], 4),
                torch_s_per_image=round(theirs[dtype], 4),
                torch_over_jdiff=round(ratio, 3),
                jdiff_compile_s=round(ours[dtype + "_compile"], 1),
                rel_err_vs_torch_float32=f"{ours[dtype + '_rel_err']:.2e}",
                torch=torch_info["torch"],
                diffusers=torch_info["diffusers"],
                machine=where,
                date=date,
            )
        )
    print()
    print(f"DiT-XL/2-shaped forward ({args.layers} layers, 32x32x4 latents), seconds per image")
    print(f"{where}; {date}; load average {load}")
    print(table(rows, ["dtype", "jdiff (jit)", "diffusers (torch eager)", "torch / jdiff", "rel. diff. to torch f32"]))
    write_csv(args.out, _merge(args.out, csv_rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
