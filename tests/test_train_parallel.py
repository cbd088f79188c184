"""Data parallelism: 8 fake CPU devices and two coordinated processes against one device.

Each test launches fresh Python processes (device counts and ``jax.distributed`` must be
set before JAX starts), with the repository root first on ``PYTHONPATH``.
"""

import subprocess
import sys

import _train_worker as W
import jax
import numpy as np

from jdiff import train as T

WORKER = W.WORKER_PATH
_env = W.subprocess_env
_free_port = W.free_port


def _check(proc_or_result, what):
    out = proc_or_result.stdout if isinstance(proc_or_result.stdout, str) else ""
    assert proc_or_result.returncode == 0, f"{what} failed ({proc_or_result.returncode}):\n{out[-4000:]}"
    return out


def test_8_fake_devices_match_1_device():
    """One train step on a global batch sharded over 8 devices gives the parameters of the
    same step on 1 device (to 1e-5), with and without accumulation and with frozen
    parameters (replicated, unchanged, read by the loss, and held once: the same arrays in
    the same device buffers after every step, no copy among the compiled step's outputs);
    bad batch sizes raise."""
    r = subprocess.run(
        [sys.executable, WORKER, "dp", "--devices", "8", "--batch", "16"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    out = _check(r, "8-device worker")
    assert "dp ok" in out and "max_param_diff=" in out


def _two_processes(ckpt, steps, total, out_file):
    port = _free_port()
    cmd = [
        sys.executable,
        WORKER,
        "run",
        "--num-processes",
        "2",
        "--local-devices",
        "2",
        "--port",
        str(port),
        "--ckpt",
        ckpt,
        "--steps",
        str(steps),
        "--total",
        str(total),
        "--save-every",
        "3",
        "--batch",
        "16",
    ]
    procs = [
        subprocess.Popen(
            cmd + ["--process-id", str(i)] + (["--out", out_file] if i == 0 else []),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{o[-4000:]}"
    assert f"finished step={steps} preempted=False devices=4 processes=2" in outs[0], outs[0][-3000:]
    return outs[0]


def test_two_processes_match_one_process(tmp_path):
    """Two processes (2 CPU devices each) coordinated by jax.distributed, each feeding
    its half of every global batch, train to the parameters of one process on one device
    fed the same global batches -- including across a stop and a multi-process restore
    from the checkpoint both processes wrote. The checkpoint also restores on one device."""
    ckpt = str(tmp_path / "ckpt")
    out_file = str(tmp_path / "mp.npz")
    steps = 6
    _two_processes(ckpt, 3, steps, out_file)  # stop half way ...
    log = _two_processes(ckpt, steps, steps, out_file)  # ... and resume on two processes
    assert "resumed from checkpoint step 3" in log

    got = np.load(out_file)
    ref = W.train_run(steps, batch=16, handle_sigterm=False).state  # one process, one device, uninterrupted
    ref_leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(ref)[0]}
    assert set(ref_leaves) == set(got.files)
    for k, v in ref_leaves.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5, err_msg=k)

    # The checkpoint written by both processes restores in this single process.
    mesh = T.make_mesh()
    target = T.replicate(T.init_train_state(W.init_params(0), W.optimizer(steps), 0), mesh)
    with T.Checkpointer(ckpt) as ck:
        assert ck.all_steps() == [3, 6]
        restored = ck.restore(target)
    assert restored.step == steps and restored.extra == {"data_step": steps}
    for p, x in jax.tree_util.tree_flatten_with_path(restored.state)[0]:
        np.testing.assert_array_equal(np.asarray(x), got[jax.tree_util.keystr(p)])
