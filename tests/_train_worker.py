"""Subprocess worker for the training tests (not collected by pytest).

Modes:
  run   train a tiny MLP with jdiff.train.train (optionally multi-process, with
        checkpoints) and write the final state to --out (.npz, process 0 only).
  dp    with --devices N fake CPU devices: compare one train step on N devices with the
        same step on 1 device (with and without accumulation, and with frozen
        parameters), and check the batch-divisibility errors.

Everything is deterministic in --seed: the data of step s is a function of s only, so
a resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jdiff._xla import prefer_fast_cpu_compile

WORKER_PATH = os.path.abspath(__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(WORKER_PATH))


# Compilation dominates this suite (thousands of small programs, each run a few times).
# JAX_DISABLE_MOST_OPTIMIZATIONS (conftest.py) lowers the optimization level only in the
# options of each compilation; XLA's own flag also reaches the CPU backend's code
# generation, and measured on 2 cores it cuts the suite's compile time by a further
# 35-60% (tests/test_solvers.py + test_testbed.py: 99 s -> 65 s of compilation; the
# U-Net tests and the digits training test: 141 s -> 56 s). LLVM's optimization level
# does not change IEEE semantics; every tolerance allows for the summation order anyway.
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"


def prefer_fast_test_compile(env=None):
    """Add the test suite's XLA flags to ``XLA_FLAGS`` in ``env`` (default
    ``os.environ``): jdiff's faster CPU emitters (jdiff/_xla.py) and TEST_XLA_FLAG,
    neither over a setting already there."""
    env = os.environ if env is None else env
    prefer_fast_cpu_compile(env)
    flags = env.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        env["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAG}".strip()
    return env


def subprocess_env(devices=None, **extra):
    """The environment for a test subprocess: ours, with the repository root first on
    PYTHONPATH, no inherited XLA_FLAGS but the suite's (and ``devices`` fake CPU
    devices when given)."""
    env = dict(os.environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + rest)
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    prefer_fast_test_compile(env)
    env.update(extra)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Shared by the tests that start `jdiff train` processes on a small toy2d run.
WALL_CLOCK = ("wall_time", "steps_per_sec", "samples_per_sec")  # metrics fields that differ between runs


def toy_run_settings(width: int = 16, warmup: int = 5) -> list[str]:
    """``--set`` values of a small toy2d run (checkpoints every 10 steps, keep 2)."""
    return [
        f"model.mlp.width={width}",
        "model.mlp.num_blocks=1",
        "train.batch_size=32",
        "data.toy_size=256",
        "train.log_every=1",
        "train.checkpoint_every=10",
        "train.keep=2",
        "train.grid_every=0",
        "sample.num=16",
        "sample.nfe=2",
        f"optim.warmup_steps={warmup}",
    ]


def cached_env(cache) -> dict:
    """:func:`subprocess_env` with a persistent compilation cache in ``cache`` shared by
    the test's processes (compilation dominates a small run)."""
    return subprocess_env(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
    )


def metrics_rows(out) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` without the wall-clock fields."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in f]


def _early_env(argv):
    # XLA flags must be set before jax is imported.
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--devices", type=int, default=0)
    a, _ = p.parse_known_args(argv)
    if a.devices:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
        ).strip()


DIM, HIDDEN, NUM_CLASSES = 4, 16, 3


def init_params(seed: int):
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w1": jax.random.normal(k1, (DIM + 1, HIDDEN)) * 0.3,
        "b1": jnp.zeros(HIDDEN),
        "emb": jax.random.normal(k3, (NUM_CLASSES + 1, HIDDEN)) * 0.1,
        "w2": jax.random.normal(k2, (HIDDEN, DIM)) * 0.3,
        "b2": jnp.zeros(DIM),
    }


def apply(params, x, t, cond, key=None):
    import jax.numpy as jnp

    h = jnp.concatenate([x, t[:, None]], axis=-1) @ params["w1"] + params["b1"]
    if cond is not None:
        h = h + params["emb"][cond]
    return jnp.tanh(h) @ params["w2"] + params["b2"]


def global_batch(step: int, size: int, seed: int = 0):
    """The global batch of step ``step`` (numpy), a function of ``(seed, step)`` only."""
    import numpy as np

    rng = np.random.default_rng([seed, step])
    labels = rng.integers(0, NUM_CLASSES, size=(size,)).astype(np.int32)
    centers = np.linspace(-1.5, 1.5, NUM_CLASSES)[labels][:, None]
    x = (centers + 0.3 * rng.standard_normal((size, DIM))).astype(np.float32)
    return {"x": x, "label": labels}


def loss_fn():
    import jdiff
    from jdiff import train as T

    cfg = T.LossConfig(
        jdiff.vp_cosine(), prediction="v", weighting="min_snr", label_dropout=0.2, num_classes=NUM_CLASSES
    )
    return T.make_loss_fn(apply, cfg)


def frozen_loss_fn(weight=0.1):
    """The denoising loss plus ``weight * |params - frozen|^2``: a loss that reads frozen
    parameters (as a reference model or a teacher would be read)."""
    import jax
    import jax.numpy as jnp

    base = loss_fn()

    def lf(params, batch, keys, *, frozen):
        loss, metrics = base(params, batch, keys)
        pull = sum(jnp.sum((p - f) ** 2) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)))
        return loss + weight * pull, {**metrics, "loss": loss + weight * pull, "pull": pull}

    return lf


def dpo_loss_fn():
    """Diffusion-DPO (jdiff.preference) on pairs ``{"win", "lose", "label"}`` against the
    frozen reference."""
    import jdiff
    from jdiff import preference as P
    from jdiff import train as T

    return P.make_preference_loss(apply, T.LossConfig(jdiff.vp_cosine(), prediction="v"), "dpo", beta=100.0)


def pair_batch(step: int, size: int, seed: int = 0):
    """A global batch of preference pairs: the data of :func:`global_batch` as winners,
    the same points moved away from their class centre as losers."""
    import numpy as np

    b = global_batch(step, size, seed)
    rng = np.random.default_rng([seed, step, 1])
    lose = (b["x"] + 0.7 * rng.standard_normal(b["x"].shape)).astype(np.float32)
    return {"win": b["x"], "lose": lose, "label": b["label"]}


def optimizer(total):
    from jdiff import train as T

    return T.make_optimizer(3e-3, warmup_steps=3, total_steps=max(total, 4), weight_decay=1e-4, clip_norm=1.0)


def save_state(path, state):
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})


def train_run(
    steps,
    batch=16,
    seed=0,
    accum=1,
    ckpt=None,
    save_every=5,
    keep=3,
    sleep=0.0,
    mesh=None,
    handle_sigterm=True,
    total=None,
):
    """The training run every test compares against: jdiff.train.train on the tiny MLP,
    stopping at ``steps`` of a ``total``-step learning-rate schedule (default ``steps``)."""
    from jdiff import train as T

    mesh = T.make_mesh() if mesh is None else mesh
    rows = T.process_batch_slice(batch, mesh)

    def data(step):
        b = global_batch(step, batch, seed)
        return {k: v[rows] for k, v in b.items()}

    def progress(step, metrics, state):
        if T.is_main_process():
            print(f"step {step}", flush=True)
        if sleep:
            time.sleep(sleep)

    return T.train(
        loss_fn(),
        init_params(seed),
        data,
        steps,
        optimizer=optimizer(total or steps),
        seed=seed,
        mesh=mesh,
        checkpoint_dir=ckpt,
        save_every=save_every,
        keep=keep,
        accum_steps=accum,
        ema_decay=0.9,
        ema_warmup=True,
        callbacks=[progress],
        handle_sigterm=handle_sigterm,
    )


def mode_run(a):
    import jax

    from jdiff import train as T

    if a.num_processes > 1:
        if a.local_devices:
            jax.config.update("jax_num_cpu_devices", a.local_devices)
        T.initialize_distributed(f"localhost:{a.port}", a.num_processes, a.process_id)
    res = train_run(a.steps, a.batch, a.seed, a.accum, a.ckpt, a.save_every, a.keep, a.sleep, total=a.total)
    if T.is_main_process():
        print(
            f"finished step={res.step} preempted={res.preempted} devices={jax.device_count()} "
            f"processes={jax.process_count()}",
            flush=True,
        )
        if a.out:
            save_state(a.out, res.state)
    return 0


def _buffer_ptrs(tree):
    """The device buffer address of every shard of every leaf."""
    import jax

    return [[sh.data.unsafe_buffer_pointer() for sh in x.addressable_shards] for x in jax.tree.leaves(tree)]


def _check_no_reference_copy(step, state, batch, mesh):
    """The compiled step takes the frozen reference as a read-only argument and returns no
    copy of it: its outputs are exactly the trainable state and the metrics (per device,
    XLA's memory analysis of the program)."""
    import jax
    import numpy as np

    def nbytes(tree):
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    rest = state._replace(frozen=None)
    key = jax.random.key_data(jax.random.key(0))
    lowered = step.jitted.lower(rest, state.frozen, batch, key)
    out_rest, out_metrics = lowered.out_info
    assert out_rest.frozen is None
    mem = lowered.compile().memory_analysis()
    ref = nbytes(state.frozen)
    n_out = len(jax.tree.leaves((out_rest, out_metrics)))
    expect = nbytes(out_rest) + nbytes(out_metrics)
    # every output is a replicated array (one full copy per device): one device's outputs
    # are the trainable state and the metrics plus XLA's output tuple (an 8-byte pointer
    # per output); a copy of the reference would add its ``ref`` bytes (> that table)
    table = 8 * n_out
    assert table < ref
    assert expect <= mem.output_size_in_bytes <= expect + table, (mem.output_size_in_bytes, expect, table, ref)
    assert mem.argument_size_in_bytes >= nbytes(rest) + ref


def mode_dp(a):
    import jax
    import numpy as np

    from jdiff import train as T

    assert jax.device_count() == a.devices, jax.devices()
    mesh_n = T.make_mesh()
    mesh_1 = T.make_mesh(jax.devices()[:1])
    lf = loss_fn()
    opt = optimizer(10)
    results = {}
    frozen_ref = jax.tree.map(np.asarray, init_params(a.seed + 1))
    cases = (1, 2, "frozen", "dpo")
    for name, mesh in (("n", mesh_n), ("1", mesh_1)):
        for accum in cases:
            frozen = init_params(a.seed + 1) if accum in ("frozen", "dpo") else None
            loss = {"frozen": frozen_loss_fn, "dpo": dpo_loss_fn}.get(accum, lambda: lf)()
            step = T.make_train_step(loss, opt, mesh=mesh, accum_steps=2 if frozen else accum, ema_decay=0.9)
            state = T.replicate(T.init_train_state(init_params(a.seed), opt, a.seed, frozen=frozen), mesh)
            data = pair_batch if accum == "dpo" else global_batch
            ref_arrays = jax.tree.leaves(state.frozen)
            ref_ptrs = _buffer_ptrs(state.frozen)
            for s in range(3):
                batch = T.shard_batch(data(s, a.batch, a.seed), mesh)
                if name == "n" and s == 0:
                    first = jax.tree.leaves(batch)[0]
                    assert len(first.sharding.device_set) == a.devices
                    assert first.addressable_shards[0].data.shape[0] == a.batch // a.devices
                if accum == "dpo" and s > 0:
                    # the reference stays where it was placed: no host-to-device transfer
                    # of the state (frozen parameters included) after the first step
                    with jax.transfer_guard("disallow"):
                        state, metrics = step(state, batch)
                else:
                    state, metrics = step(state, batch)
                if frozen:
                    # held once: the step hands back the very arrays it was given, in the
                    # same device buffers (per shard), not a copy made by the program
                    assert all(x is y for x, y in zip(jax.tree.leaves(state.frozen), ref_arrays, strict=True))
                    assert _buffer_ptrs(state.frozen) == ref_ptrs
            assert state.params["w1"].sharding.is_fully_replicated
            if accum == "dpo":
                _check_no_reference_copy(step, state, batch, mesh)
            if accum == "dpo":
                assert 0.0 <= float(metrics["implicit_acc"]) <= 1.0
                # one copy of the reference per device
                assert all(len(x.addressable_shards) == len(mesh.devices.flat) for x in jax.tree.leaves(state.frozen))
            if accum == "frozen":
                # replicated over the mesh like params, bit-for-bit unchanged, and read by the loss
                assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.frozen))
                assert len(state.frozen["w1"].sharding.device_set) == len(mesh.devices.flat)
                for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_ref), strict=True):
                    assert np.array_equal(np.asarray(x), y)
                assert float(metrics["pull"]) > 0
            if frozen:
                # replicated over the mesh like params, bit-for-bit unchanged
                assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.frozen))
                for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen_ref), strict=True):
                    assert np.array_equal(np.asarray(x), y)
            results[(name, accum)] = (jax.tree.map(np.asarray, state), float(metrics["loss"]))
    # the frozen pull changes the trajectory (the loss saw the frozen values)
    assert not np.allclose(results[("1", "frozen")][0].params["w1"], results[("1", 2)][0].params["w1"])
    worst = 0.0
    for accum in cases:
        sn, ln = results[("n", accum)]
        s1, l1 = results[("1", accum)]
        for x, y in zip(jax.tree.leaves(sn), jax.tree.leaves(s1)):
            if np.issubdtype(x.dtype, np.floating):
                worst = max(worst, float(np.max(np.abs(x - y))))
            else:
                assert np.array_equal(x, y)
        assert abs(ln - l1) < 1e-5, (ln, l1)
    print(f"max_param_diff={worst:.3e}", flush=True)
    # 8 devices vs 1: the same float32 sums in another order (the all-reduce). Adam's
    # update is scale-free, so each of the 3 steps moves a parameter by lr (3e-3) times a
    # relative gradient error of ~u sqrt(B) (u = eps32 / 2, B = 16): ~1e-9 in all; 1e-5
    # leaves room for nearly cancelling gradients (and is what the loss check uses too)
    assert worst < 1e-5, worst

    # Bad input: a batch not divisible by the device count.
    step = T.make_train_step(lf, opt, mesh=mesh_n)
    state = T.replicate(T.init_train_state(init_params(a.seed), opt, a.seed), mesh_n)
    bad = global_batch(0, a.devices + 4, a.seed)
    for fn in (lambda: T.shard_batch(bad, mesh_n), lambda: step(state, bad)):
        try:
            fn()
        except ValueError as e:
            assert "not divisible by" in str(e) and f"({a.devices})" in str(e), e
            print("divisibility error:", e, flush=True)
        else:
            raise AssertionError("a batch not divisible by the device count was accepted")
    step2 = T.make_train_step(lf, opt, mesh=mesh_n, accum_steps=4)
    try:
        step2(state, global_batch(0, 2 * a.devices, a.seed))
    except ValueError as e:
        assert "micro-batch" in str(e), e
    else:
        raise AssertionError("micro-batches not divisible by the device count were accepted")
    print("dp ok", flush=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    _early_env(argv)
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("run", "dp"))
    p.add_argument("--devices", type=int, default=0)
    p.add_argument("--ckpt", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--total", type=int, default=None, help="schedule length (default: --steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--local-devices", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    return mode_run(a) if a.mode == "run" else mode_dp(a)


if __name__ == "__main__":
    sys.exit(main())
