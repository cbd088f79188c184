"""Checkpoints: exact round trip, keep-k, corruption fallback, config mismatch,
SIGKILL/SIGTERM resume of a real training subprocess."""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import _train_worker as W
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import train as T

WORKER = W.WORKER_PATH
_env = W.subprocess_env


def _state(seed=0, shape=(3, 4)):
    params = {"w": jax.random.normal(jax.random.key(seed), shape), "b": jnp.arange(shape[1], dtype=jnp.float32)}
    opt = T.make_optimizer(1e-3)
    return T.init_train_state(params, opt, seed), opt


def _advance(state, i):
    """A different but deterministic state for step ``i``."""
    return state._replace(step=jnp.int32(i), params=jax.tree.map(lambda p: p + i, state.params))


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keep_and_extra(tmp_path):
    state, _ = _state()
    with T.Checkpointer(tmp_path, save_every=2, keep=2) as ck:
        saved = [ck.save(i, _advance(state, i), {"epoch": i // 3, "step": i}) for i in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ck.save(7, _advance(state, 7), {"epoch": 2, "step": 7}, force=True)
        ck.wait()
        assert ck.all_steps() == [6, 7]
        r = ck.restore(state)
        assert r.step == 7 and r.extra == {"epoch": 2, "step": 7}
        _equal(r.state, _advance(state, 7))
        assert r.state.opt_state[1][0].__class__.__name__ == "ScaleByAdamState"  # NamedTuples survive
        r6 = ck.restore(state, step=6)
        _equal(r6.state, _advance(state, 6))
    with T.Checkpointer(tmp_path / "np") as ck:
        ck.save(3, state, {"epoch": np.int64(2), "order": np.arange(3)}, force=True)
        ck.wait()
        assert ck.restore(state).extra == {"epoch": 2, "order": [0, 1, 2]}
    with pytest.raises(TypeError, match="JSON"):
        T.Checkpointer(tmp_path / "x").save(1, state, {"bad": object()}, force=True)
    assert T.Checkpointer(tmp_path / "empty").restore(state) is None


def _largest(paths):
    return max(paths, key=os.path.getsize)


def _corrupt(step_dir, mode, other_step_dir):
    data_files = [
        p
        for p in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
        if os.path.isfile(p) and os.sep + "d" + os.sep in p
    ]
    assert data_files, os.listdir(step_dir)
    if mode == "truncate_data":
        for p in data_files:
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
    elif mode == "flip_bytes":
        p = _largest(data_files)
        with open(p, "r+b") as f:
            raw = bytearray(f.read())
            for i in range(len(raw) // 3, len(raw) // 3 + 8):
                raw[i] ^= 0xFF
            f.seek(0)
            f.write(raw)
    elif mode == "truncate_meta":
        for p in glob.glob(os.path.join(step_dir, "meta", "*")):
            if os.path.isfile(p) and not p.endswith("commit_success.txt"):
                with open(p, "r+b") as f:
                    f.truncate(5)
    elif mode == "delete_manifest":
        for p in glob.glob(os.path.join(step_dir, "state", "**", "manifest.ocdbt"), recursive=True):
            os.remove(p)
    elif mode == "stale_copy":
        # Well-formed files holding other values: only the checksums can tell.
        shutil.rmtree(os.path.join(step_dir, "state"))
        shutil.copytree(os.path.join(other_step_dir, "state"), os.path.join(step_dir, "state"))
    else:
        raise ValueError(mode)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's asyncio noise on failed reads
@pytest.mark.parametrize("mode", ["truncate_data", "flip_bytes", "truncate_meta", "delete_manifest", "stale_copy"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, mode):
    state, _ = _state(shape=(64, 64))  # big enough for orbax to store the data out of line
    with T.Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ck:
        for i in (2, 4):
            ck.save(i, _advance(state, i), {"step": i})
    _corrupt(str(tmp_path / "4"), mode, str(tmp_path / "2"))
    lines = []
    with T.Checkpointer(tmp_path, save_every=1, keep=3, report=lines.append) as ck:
        r = ck.restore(state)
        assert r.step == 2 and r.extra == {"step": 2}
        _equal(r.state, _advance(state, 2))
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert lines[0].startswith(f"checkpoint step 4 in {tmp_path} is corrupt (")
        assert lines[0].endswith("); using step 2; moved to corrupt_step_4"), lines[0]
        assert "source locations" not in lines[0] and len(lines[0]) < 400 + len(str(tmp_path))
        assert ck.all_steps() == [2]
        assert os.path.isdir(tmp_path / "corrupt_step_4")
        assert ck.save(4, _advance(state, 4), {"step": 4})  # the step number is free again
        ck.wait()
        _equal(ck.restore(state).state, _advance(state, 4))


def test_explicit_corrupt_step_raises(tmp_path):
    state, _ = _state()
    with T.Checkpointer(tmp_path, save_every=1, async_save=False) as ck:
        ck.save(1, state)
        ck.save(2, _advance(state, 2))
    _corrupt(str(tmp_path / "2"), "stale_copy", str(tmp_path / "1"))
    with T.Checkpointer(tmp_path) as ck:
        with pytest.raises(T.CheckpointCorruptError, match="checksum mismatch"):
            ck.restore(state, step=2)
        with pytest.raises(FileNotFoundError, match="no checkpoint step 9"):
            ck.restore(state, step=9)


def test_different_model_configuration_raises_clear_error(tmp_path):
    state, _ = _state(shape=(3, 4))
    with T.Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, state)
    wider, _ = _state(shape=(3, 5))
    with T.Checkpointer(tmp_path) as ck:
        with pytest.raises(
            T.CheckpointMismatchError, match=r"\['w'\]: checkpoint float32\[3, 4\] vs model float32\[3, 5\]"
        ):
            ck.restore(wider)
    bigger = state._replace(params={**state.params, "extra_layer": jnp.zeros(2)})
    bigger = bigger._replace(opt_state=T.make_optimizer(1e-3).init(bigger.params))
    with T.Checkpointer(tmp_path) as ck:
        with pytest.raises(T.CheckpointMismatchError, match=r"not in the checkpoint: .*\['extra_layer'\]"):
            ck.restore(bigger)
        no_ema = state._replace(ema_params=None)
        with pytest.raises(T.CheckpointMismatchError, match=r"not in the model: .*ema_params"):
            ck.restore(no_ema)


def test_sigterm_flag_is_set_by_signal():
    with T.SigtermFlag() as flag:
        assert not flag
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if flag.is_set():
                break
            time.sleep(0.01)
        assert flag.is_set()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_sigterm_flag_on_signal_hook_sees_repeats_and_may_abort():
    seen = []

    def on_signal(signum, already_set):
        seen.append(already_set)
        if already_set:
            raise KeyboardInterrupt

    with T.SigtermFlag(signals=(signal.SIGUSR1,), on_signal=on_signal) as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if flag.is_set():
                break
            time.sleep(0.01)
        assert flag.is_set() and seen == [False]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(100):
                time.sleep(0.01)
        assert seen == [False, True]


# ------------------------------------------------------ real runs in subprocesses

STEPS, SAVE_EVERY = 24, 4


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run (in this process: same program, same machine)."""
    res = W.train_run(STEPS, save_every=SAVE_EVERY, handle_sigterm=False)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(res.state)[0]}


def _cmd(ckpt, out, sleep=0.0):
    return [
        sys.executable,
        WORKER,
        "run",
        "--ckpt",
        ckpt,
        "--out",
        out,
        "--steps",
        str(STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--keep",
        "2",
        "--sleep",
        str(sleep),
    ]


def _start(ckpt, out, sleep):
    return subprocess.Popen(
        _cmd(ckpt, out, sleep), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_step(proc, step, lines):
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return
    proc.kill()
    raise AssertionError(f"worker never reached step {step}:\n" + "".join(lines)[-4000:])


def _finish(ckpt, out):
    r = subprocess.run(
        _cmd(ckpt, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-4000:]
    return r.stdout


def _assert_same(reference, out):
    """Bitwise equality with the uninterrupted run."""
    got = np.load(out)
    assert set(got.files) == set(reference)
    for k, v in reference.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_sigkill_then_restart_resumes_exactly(tmp_path, reference):
    kill_at = random.Random().randrange(2 * SAVE_EVERY + 1, STEPS - 4)  # an arbitrary step, printed on failure
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.npz")
    proc = _start(ckpt, out, sleep=0.1)
    lines = []
    try:
        _wait_for_step(proc, kill_at, lines)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    with T.Checkpointer(ckpt) as ck:
        last = ck.latest_step()  # None if the kill came before the first async save committed
    assert last is None or (last % SAVE_EVERY == 0 and 0 < last < STEPS), (kill_at, last)
    log = _finish(ckpt, out)
    info = f"killed after 'step {kill_at}' was printed; latest checkpoint {last}; restart log:\n{log[-3000:]}"
    printed = [int(line.split()[1]) for line in log.splitlines() if line.startswith("step ")]
    first = printed[0]
    assert printed == list(range(first, STEPS + 1)), info
    if last is None:
        assert "resumed from checkpoint" not in log and first == 1, info
    else:
        assert f"resumed from checkpoint step {last} " in log and first == last + 1, info
    _assert_same(reference, out)


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, reference):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "final.npz")
    proc = _start(ckpt, out, sleep=0.1)
    lines = []
    try:
        _wait_for_step(proc, 6, lines)
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-4000:]
    assert "(SIGTERM): checkpoint saved" in log and "preempted=True" in log, log[-3000:]
    stopped = int(log.split("stopping at step ")[1].split()[0])
    assert 6 <= stopped < STEPS
    with T.Checkpointer(ckpt) as ck:
        assert ck.latest_step() == stopped  # saved at the step it stopped, not at a multiple of save_every
    log2 = _finish(ckpt, out)
    assert f"resumed from checkpoint step {stopped}" in log2
    _assert_same(reference, out)


class _EpochIterator:
    """A shuffling data iterator with a small checkpointable position {"epoch", "step"}."""

    def __init__(self, data, batch):
        self.data, self.batch, self.epoch, self.step = data, batch, 0, 0
        self.set_state_calls = []

    def get_state(self):
        return {"epoch": self.epoch, "step": self.step}

    def set_state(self, state):
        self.set_state_calls.append(dict(state))
        self.epoch, self.step = state["epoch"], state["step"]

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = len(self.data["x"]) // self.batch
        if self.step == per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order = np.random.default_rng(self.epoch).permutation(len(self.data["x"]))
        rows = order[self.step * self.batch : (self.step + 1) * self.batch]
        self.step += 1
        return {k: v[rows] for k, v in self.data.items()}


def test_loop_checkpoints_iterator_position_and_resumes_exactly(tmp_path):
    data = W.global_batch(0, 24, seed=5)  # a 24-sample data set, 3 batches of 8 per epoch
    loss, opt = W.loss_fn(), W.optimizer(8)
    kw = dict(optimizer=opt, seed=3, handle_sigterm=False, ema_decay=0.9)
    full = T.train(loss, W.init_params(0), _EpochIterator(data, 8), 8, **kw)
    first = T.train(loss, W.init_params(0), _EpochIterator(data, 8), 5, checkpoint_dir=tmp_path, save_every=2, **kw)
    assert first.step == 5
    with T.Checkpointer(tmp_path) as ck:
        assert ck.all_steps() == [2, 4, 5]
        assert ck.restore(full.state).extra == {"data": {"epoch": 1, "step": 2}}
    it = _EpochIterator(data, 8)
    resumed = T.train(loss, W.init_params(0), it, 8, checkpoint_dir=tmp_path, save_every=2, **kw)
    assert it.set_state_calls == [{"epoch": 1, "step": 2}]
    _equal(resumed.state, full.state)


# ------------------------------------------- no usable step, read-only, clean reports


def _tree_hashes(root):
    """{relative path: sha256} of every file, and the set of directories, under root."""
    import hashlib

    files, dirs = {}, set()
    for d, subdirs, names in os.walk(root):
        dirs.update(os.path.relpath(os.path.join(d, n), root) for n in subdirs)
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return files, dirs


def _break_meta(step_dir):
    paths = glob.glob(os.path.join(step_dir, "meta", "metadata"))
    assert paths, os.listdir(os.path.join(step_dir, "meta"))
    for p in paths:
        with open(p, "w") as f:
            f.write('{"x')


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("read_only", [True, False])
def test_no_usable_step_raises_listing_every_step_and_changes_nothing(tmp_path, read_only):
    state, _ = _state()
    with T.Checkpointer(tmp_path, save_every=1, keep=None, async_save=False) as ck:
        for i in (3, 6, 9):
            ck.save(i, _advance(state, i), {"step": i})
    for i in (3, 6, 9):
        _break_meta(str(tmp_path / str(i)))
    before = _tree_hashes(tmp_path)
    lines = []
    with T.Checkpointer(tmp_path, read_only=read_only, report=lines.append) as ck:
        with pytest.raises(T.NoUsableCheckpointError) as info:
            ck.restore(state)
    err = info.value
    assert [s for s, _ in err.rejected] == [9, 6, 3]
    msg = str(err).splitlines()
    assert msg[0].startswith(f"no usable checkpoint in {tmp_path}: all 3 steps")
    assert [m.split(":")[0].strip() for m in msg[1:]] == ["step 9", "step 6", "step 3"]
    assert all(why for _, why in err.rejected)
    assert isinstance(err, T.CheckpointCorruptError)
    assert lines == []  # the error says it all; nothing reported twice
    assert _tree_hashes(tmp_path) == before  # nothing renamed, quarantined, created or deleted


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_only_falls_back_without_touching_the_directory(tmp_path):
    state, _ = _state(shape=(64, 64))
    with T.Checkpointer(tmp_path, save_every=1, keep=None, async_save=False) as ck:
        for i in (2, 4):
            ck.save(i, _advance(state, i), {"step": i})
    _break_meta(str(tmp_path / "4"))
    os.makedirs(tmp_path / "4.orbax-checkpoint-tmp-123")  # a leftover a writer would clean up
    before = _tree_hashes(tmp_path)
    lines = []
    with T.Checkpointer(tmp_path, read_only=True, report=lines.append) as ck:
        r = ck.restore(state)
        assert r.step == 2
        _equal(r.state, _advance(state, 2))
        with pytest.raises(RuntimeError, match="read-only"):
            ck.save(5, state, force=True)
    assert len(lines) == 1 and lines[0].startswith("checkpoint step 4 ") and lines[0].endswith("using step 2")
    assert _tree_hashes(tmp_path) == before
    # a missing directory is an empty one, and is not created
    with T.Checkpointer(tmp_path / "absent", read_only=True) as ck:
        assert ck.all_steps() == [] and ck.restore(state) is None
    assert not os.path.exists(tmp_path / "absent")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_step_is_reported_as_one_clean_log_line(tmp_path):
    state, _ = _state()
    with T.Checkpointer(tmp_path, save_every=1, async_save=False) as ck:
        for i in (1, 2):
            ck.save(i, _advance(state, i))
    _break_meta(str(tmp_path / "2"))
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jdiff import train as T\n"
        "p = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)}\n"
        "s = T.init_train_state(p, T.make_optimizer(1e-3), 0)\n"
        f"r = T.Checkpointer({str(tmp_path)!r}).restore(s)\n"
        "print('restored', r.step)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "restored 1"
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(err) == 1, out.stderr[-3000:]
    assert err[0].startswith(f"checkpoint step 2 in {tmp_path} is corrupt (")
    assert err[0].endswith("using step 1; moved to corrupt_step_2")
    assert "Warning" not in err[0] and ".py:" not in err[0]


def _reference_checksum(x):
    """The checksum's definition, leaf by leaf, in numpy (uint32 arithmetic wraps)."""
    a = np.asarray(x)
    if a.dtype == np.bool_ or a.dtype.itemsize == 1:
        u = a.astype(np.uint32).reshape(-1)
    elif a.dtype.itemsize == 2:
        u = a.view(np.uint16).astype(np.uint32).reshape(-1)
    else:
        u = a.view(np.uint32).reshape(-1)
    i = np.arange(u.size, dtype=np.uint32)
    w1 = (i * np.uint32(0x9E3779B1) + np.uint32(0x7F4A7C15)) | np.uint32(1)
    w2 = (i * np.uint32(0x85EBCA6B) + np.uint32(0xC2B2AE35)) | np.uint32(1)
    return [int(np.sum(u * w1, dtype=np.uint32)), int(np.sum(u * w2, dtype=np.uint32))]


@pytest.mark.parametrize("group_words", [1 << 26, 7])
def test_tree_checksum_matches_its_leafwise_definition(monkeypatch, group_words):
    from jdiff.train import _checkpoint as C

    monkeypatch.setattr(C, "_GROUP_WORDS", group_words)  # also split into several programs
    k = jax.random.split(jax.random.key(1), 4)
    tree = {
        "f32": jax.random.normal(k[0], (5, 7)),
        "bf16": jax.random.normal(k[1], (9,)).astype(jnp.bfloat16),
        "i8": jnp.arange(-5, 6, dtype=jnp.int8),
        "bool": jnp.array([True, False, True]),
        "scalar": jnp.int32(-3),
        "empty": jnp.zeros((0, 3)),
        "u32": jax.random.bits(k[2], (300,)),
    }
    got = T.tree_checksum(tree)
    want = [_reference_checksum(x) for x in jax.tree.leaves(tree)]
    assert got == want
    assert T.tree_checksum({}) == []
    with jax.enable_x64(True):  # 8-byte leaves are two words per element
        wide = {"f64": jnp.linspace(-1.0, 1.0, 11, dtype=jnp.float64), "i64": jnp.arange(5, dtype=jnp.int64)}
        assert T.tree_checksum(wide) == [_reference_checksum(x) for x in jax.tree.leaves(wide)]
