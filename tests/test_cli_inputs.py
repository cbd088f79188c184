"""Malformed command lines: each is answered by one line on stderr, a non-zero exit
status, and nothing created on disk (checked before any data, model or JAX backend);
failures deep inside a command are one line too (exit status 2 for bad input, 1 for
I/O), the traceback only under ``--debug`` or ``JDIFF_DEBUG=1``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jdiff import cli
from jdiff import presets as P


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A run directory with a config and an (empty) checkpoint folder: enough for the
    parse-time checks of ``jdiff sample``."""
    run = tmp_path_factory.mktemp("fake") / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(P.config_to_dict(P.get_preset("toy2d"))))
    return run


def _snapshot(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


T = ["train", "toy2d"]
BAD = [
    (T + ["--set", "optim.lr=inf"], "optim.lr: expected a finite number"),
    (T + ["--set", "optim.lr=nan"], "optim.lr: expected a finite number"),
    (T + ["--set", "optim.lr=0"], "lr must be a finite positive number"),
    (T + ["--set", "optim.lr=-1e-3"], "lr must be a finite positive number"),
    (["train", "digits", "--set", "model.unet.dropout=1.5"], r"model.unet.dropout must be a probability in \[0, 1\)"),
    (T + ["--set", "model.mlp.dropout=-0.1"], "model.mlp.dropout must be a probability"),
    (T + ["--set", "model.mlp.class_dropout=1"], "model.mlp.class_dropout must be a probability"),
    (["train", "digits", "--set", "objective.label_dropout=1.0"], "objective.label_dropout must be a probability"),
    (T + ["--stop-at", "-1"], "--stop-at must be >= 1"),
    (T + ["--steps", "0"], "--steps must be >= 1"),
    (T + ["--set", "train.batch_size=0"], "batch_size must be an integer >= 1"),
    (T + ["--set", "train.log_every=-5"], "log_every must be an integer >= 1"),
    (T + ["--set", "sample.nfe=0"], "nfe must be >= 1"),
    (T + ["--set", "sample.num=-3"], "num must be >= 1"),
    (T + ["--set", "train.batch_size=30000"], r"train.batch_size \(30000\) is larger than the data set \(20000"),
    (["train", "digits", "--set", "train.batch_size=2048"], r"larger than the data set \(1797 examples\)"),
    (["train", "digtis"], "unknown preset 'digtis' \\(did you mean 'digits'\\?\\)"),
    (T + ["--set", "optim.lrr=1"], "unknown config key 'optim.lrr' \\(did you mean optim.lr"),
    (T + ["--set", "objective.process=vp_cosin"], "did you mean vp_cosine"),
    (T + ["--set", "model.kind=mpl"], "invalid choice 'mpl' \\(did you mean mlp\\?\\)"),
    (T + ["--set", "sample.solver=dpm++9m"], "unknown solver 'dpm\\+\\+9m'"),
    (T + ["--set", "model.mlp.dim=3"], "filled from the data"),
    (T + ["--set", "optim.b2=1.0"], r"b2 must be in \[0, 1\)"),
    (T + ["--set", "ema.decay=1.5"], r"decay must be in \[0, 1\)"),
    (T + ["--out", "{tmp}/afile"], "exists and is not a directory"),
    (T + ["--out", "{tmp}/afile/sub"], "cannot be created"),
    (T + ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "digits", "--preset", "toy2d"], "two presets given"),
    (["sample", "--run", "{run}", "--batch-size", "-1"], "--batch-size must be >= 0"),
    (["sample", "--run", "{run}", "--nfe", "0"], "--nfe must be >= 1"),
    (["sample", "--run", "{run}", "--num", "0"], "--num must be >= 1"),
    (["sample", "--run", "{run}", "--out", "{tmp}/s.gif"], "cannot write an image as '.gif'"),
    (["sample", "--run", "{run}", "--solver", "rk4"], "unknown solver 'rk4'"),
    (["sample", "--run", "{run}", "--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
    (["sample", "--run", "{run}", "--guidance", "inf"], "argument --guidance: must be a finite number, got 'inf'"),
    (["sample", "--run", "{run}", "--guidance=-inf"], "argument --guidance: must be a finite number"),
    (["sample", "--run", "{run}", "--out", ""], "--out must name a file, got ''"),
    (["sample", "--run", "{run}", "--out", "{tmp}/"], "is a directory: give a file name"),
    (["sample", "--run", "{run}", "--out", "{tmp}/afile/s.png"], "cannot be created: .*afile is not a directory"),
    (["sample", "--run", "{run}", "--out", "{tmp}/taken.png"], "taken.png exists: give --force to overwrite it"),
    (["sample", "--run", "{run}", "--out", "{tmp}/taken"], "taken.png exists: give --force"),  # no extension: .png
    (["sample", "--run", "{run}", "--out", "{tmp}/half.jpg"], "half.npz exists: give --force"),  # the .npz beside
    (["sample", "--run", "{run}", "--debug", "--nfe", "x"], "argument --nfe: invalid int value: 'x'"),  # usage: 1 line
    (["prefer", "--scale", "nan"], "argument --scale: must be a finite number > 0, got 'nan'"),
    (["prefer", "--scale", "inf"], "argument --scale: must be a finite number > 0, got 'inf'"),
    (["prefer", "--scale", "0"], "argument --scale: must be a finite number > 0, got '0'"),
    (["prefer", "--scale=-2"], "argument --scale: must be a finite number > 0"),
    (
        ["prefer", "--out", "{tmp}/afile/x.json"],
        "--out .*afile/x.json cannot be created: .*afile is not a writable dir",
    ),
    (["prefer", "--out", ""], "--out must name a file, got ''"),
    (["prefer", "--out", "{tmp}"], "--out must name a file"),
    (["prefer", "--out", "{tmp}/afile"], "afile exists: give --force to overwrite it"),
    (["plot", "--run", "{run}", "--out", ""], "--out must name a file, got ''"),
    (["plot", "--run", "{run}", "--out", "{tmp}/taken.png"], "taken.png exists: give --force"),
    (["plot", "--run", "{run}", "--out", "{tmp}/afile/loss.png"], "cannot be created: .*afile is not a directory"),
    (["sample", "--run", "{tmp}/nope"], "run directory not found"),
    (["presets", "toy2", "--keys"], "did you mean 'toy2d'"),
    (["plot", "--run", "{run}", "--out", "{tmp}/loss.txt"], "cannot write an image as '.txt'"),
]


def _api_cases():
    """name -> (call, message) for malformed library inputs; built lazily (JAX imports)."""
    import jax.numpy as jnp
    from flax import nnx

    import jdiff
    from jdiff import models as M
    from jdiff import solvers as S
    from jdiff import train as Tr
    from jdiff import wrappers as W

    proc = jdiff.vp_linear()
    den = jdiff.denoiser(lambda x, t, c: 0.1 * x, proc, "eps")
    x = jnp.ones((4, 2))
    nan_x = x.at[1, 0].set(jnp.nan)
    inf_x = x.at[3, 1].set(jnp.inf)
    grid = jdiff.time_grid(proc, 4)
    mlp = M.MLPResNet(M.MLPResNetConfig(dim=2, width=8, num_blocks=1, num_classes=10), rngs=nnx.Rngs(0))
    t = jnp.full((4,), 0.5)
    return {
        "x_T with NaN": (lambda: jdiff.sample(S.ddim(), den, nan_x, nfe=4), "non-finite values"),
        "x_T with inf": (lambda: jdiff.sample(S.get("dpm++2m"), den, inf_x, nfe=4), "non-finite values"),
        "increasing grid": (lambda: jdiff.sample(S.ddim(), den, x, grid[::-1]), "strictly decreasing"),
        "grid past t_max": (lambda: jdiff.sample(S.ddim(), den, x, grid.at[0].set(2.0)), "outside the valid range"),
        "grid with NaN": (lambda: jdiff.sample(S.ddim(), den, x, grid.at[2].set(jnp.nan)), "non-finite"),
        "cond batch": (lambda: jdiff.sample(S.ddim(), den, x, nfe=4, cond=jnp.zeros((3, 5))), "batch 4 of x_T"),
        "guided cond batch": (
            lambda: jdiff.sample(S.ddim(), W.guidance(den, 2.0, 0), x, nfe=4, cond=jnp.zeros((3,), jnp.int32)),
            r"cond has shape \(3,\).*batch 4 of x_T",
        ),
        "label 11": (lambda: mlp(x, t, jnp.array([0, 1, 11, 2])), r"class labels must lie in \[0, 9\]"),
        "label -1": (lambda: mlp(x, t, jnp.array([-1, 1, 2, 3])), r"class labels must lie in \[0, 9\]"),
        "unknown solver": (lambda: S.get("dpm++9m"), "unknown solver 'dpm\\+\\+9m'"),
        "solver setting clash": (lambda: S.get("dpm++2m", order=3), "fixes order"),
        "ddim eta": (lambda: S.ddim(eta=1.5), r"eta must be in \[0, 1\]"),
        "unipc variant": (lambda: S.unipc(2, variant="bh3"), "unknown UniPC variant"),
        "nfe 0": (lambda: jdiff.sample(S.ddim(), den, x, nfe=0), "nfe must be a positive integer"),
        "integer x_T": (lambda: jdiff.sample(S.ddim(), den, jnp.ones((4, 2), jnp.int32), nfe=4), "floating point"),
        "stochastic without key": (lambda: jdiff.sample(S.ddpm(), den, x, nfe=4), "pass key="),
        "neither grid nor nfe": (lambda: jdiff.sample(S.ddim(), den, x), "give a time grid or a target nfe"),
        "grid kind": (lambda: jdiff.time_grid(proc, 4, kind="cosine"), "unknown grid kind"),
        "prediction": (lambda: jdiff.denoiser(lambda x, t, c: x, proc, "noise"), "unknown parameterization"),
        "label dropout": (lambda: Tr.LossConfig(process=proc, label_dropout=1.5), "label_dropout must be"),
        "lr inf": (lambda: Tr.OptimizerConfig(lr=float("inf")), "lr must be a finite positive number"),
        "ema decay": (lambda: Tr.EMAConfig(decay=1.5), r"decay must be in \[0, 1\)"),
        "train steps": (lambda: Tr.TrainConfig(steps=0), "steps must be an integer >= 1"),
        "generate num": (lambda: jdiff.generate(S.ddim(), den, 0, (2,), nfe=4), "num must be >= 1"),
        "generate batch": (lambda: jdiff.generate(S.ddim(), den, 4, (2,), nfe=4, batch_size=-1), "batch_size must be"),
        "threshold range": (lambda: W.static_threshold(den, 1.0, -1.0), "need lo < hi"),
    }


API = [
    "x_T with NaN",
    "x_T with inf",
    "increasing grid",
    "grid past t_max",
    "grid with NaN",
    "cond batch",
    "guided cond batch",
    "label 11",
    "label -1",
    "unknown solver",
    "solver setting clash",
    "ddim eta",
    "unipc variant",
    "nfe 0",
    "integer x_T",
    "stochastic without key",
    "neither grid nor nfe",
    "grid kind",
    "prediction",
    "label dropout",
    "lr inf",
    "ema decay",
    "train steps",
    "generate num",
    "generate batch",
    "threshold range",
]
CASES = [("cli", argv, msg) for argv, msg in BAD] + [("api", name, None) for name in API]


@pytest.fixture(scope="module")
def api_cases():
    return _api_cases()


@pytest.mark.parametrize(
    "kind,what,msg", CASES, ids=[(" ".join(w[1:])[:60] if k == "cli" else f"api: {w}") for k, w, _ in CASES]
)
def test_malformed_input_is_one_line_and_writes_nothing(kind, what, msg, tmp_path, fake_run, capsys, request):
    """At least 25 malformed command lines and as many malformed library calls: each is
    answered by a one-line error (the CLI: exit status 2 and one stderr line; the
    library: an exception with a one-line message), and nothing is written."""
    import re

    (tmp_path / "afile").write_text("not a directory")
    for name in ("taken.png", "half.npz"):
        (tmp_path / name).write_bytes(b"an earlier result")
    before_tmp, before_run, cwd_before = _snapshot(tmp_path), _snapshot(fake_run), _snapshot(os.getcwd())
    if kind == "cli":
        argv = [a.format(tmp=tmp_path, run=fake_run) for a in what]
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("jdiff"), err
        assert re.search(msg, lines[0]), lines[0]
    else:
        call, msg = request.getfixturevalue("api_cases")[what]
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        text = str(info.value)
        assert "\n" not in text.strip(), text
        assert re.search(msg, text), text
    assert _snapshot(tmp_path) == before_tmp and _snapshot(fake_run) == before_run
    assert _snapshot(os.getcwd()) == cwd_before  # no runs/<preset> either


# ------------------------------------------------- failures deep inside a command


@pytest.fixture
def plot_run(tmp_path):
    """A run directory with one metrics line: ``jdiff plot`` gets past its checks."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    return run


def _fails_with(monkeypatch, make_error):
    """Make ``jdiff plot``'s work raise what ``make_error()`` raises (or returns)."""
    from jdiff.cli import plot

    def run(args, resolved):
        e = make_error()
        raise e

    monkeypatch.setattr(plot, "run", run)


def _weights(kind, tmp_path):
    from jdiff.features import load_inception, load_npz_state_dict

    if kind == "unsafe":
        return load_inception(os.path.join(os.path.dirname(__file__), "fixtures", "malicious", "malicious_zip.pth"))
    np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
    return load_npz_state_dict(tmp_path / "objects.npz")


def _checked_in_jit(mechanism):
    """A value check that fails inside a compiled program, by ``mechanism``."""
    import jax
    import jax.numpy as jnp

    import jdiff
    from jdiff import solvers as S

    x = jnp.ones((4, 2)).at[1, 0].set(jnp.nan)
    if mechanism == "jdiff.sample":  # jdiff's own checks (equinox.error_if today)
        den = jdiff.denoiser(lambda x, t, c: 0.1 * x, jdiff.vp_linear(), "eps")
        return jax.block_until_ready(jax.jit(lambda x: jdiff.sample(S.ddim(), den, x, nfe=2))(x))
    if mechanism == "checkify":
        from jax.experimental import checkify

        def f(x):
            checkify.check(jnp.all(jnp.isfinite(x)), "x_T has non-finite values")
            return x

        err, _ = jax.jit(checkify.checkify(f))(x)
        return err.throw()

    def host_check(bad):  # a host callback that raises (a check of a reduced flag)
        if bad:
            raise ValueError("x_T has non-finite values")

    f = jax.jit(lambda x: (jax.debug.callback(host_check, jnp.any(~jnp.isfinite(x))), x)[1])
    return jax.block_until_ready(f(x))


def _deep_cases(tmp):
    import errno

    from jdiff.cli import CLIError, ConfigError
    from jdiff.train._checkpoint import CheckpointMismatchError

    debug_hint = r" \(--debug shows the traceback\)$"
    return {
        "ValueError": (lambda: ValueError("the value is bad:\n  a second line"), 2, "the value is bad: a second line"),
        "CLIError": (lambda: CLIError("--label must be in [0, 2), got 5"), 2, r"--label must be in \[0, 2\), got 5"),
        "ConfigError": (lambda: ConfigError("optim.lr: expected a number"), 2, "optim.lr: expected a number"),
        "CheckpointMismatchError": (lambda: CheckpointMismatchError("a different model"), 2, "a different model"),
        "disk full": (
            lambda: OSError(errno.ENOSPC, "No space left on device", "/d/x"),
            1,
            "No space left on device: /d/x",
        ),
        "read-only": (lambda: PermissionError(errno.EACCES, "Permission denied", "/ro"), 1, "^Permission denied: /ro$"),
        "unexpected": (lambda: KeyError("w"), 1, "^KeyError: 'w'" + debug_hint),
        "unsafe weights": (lambda: _weights("unsafe", tmp), 2, r"malicious_zip\.pth: refusing to load global builtins"),
        "object .npz": (lambda: _weights("npz", tmp), 2, r"objects\.npz: array 'w' cannot be read as a numeric"),
        "jit: jdiff.sample": (lambda: _checked_in_jit("jdiff.sample"), 2, r"^x_T of shape \(4, 2\) has non-finite"),
        "jit: checkify": (lambda: _checked_in_jit("checkify"), 2, r"^x_T has non-finite values$"),
        "jit: host callback": (lambda: _checked_in_jit("callback"), 2, r"^x_T has non-finite values$"),
    }


DEEP = [
    "ValueError",
    "CLIError",
    "ConfigError",
    "CheckpointMismatchError",
    "disk full",
    "read-only",
    "unexpected",
    "unsafe weights",
    "object .npz",
    "jit: jdiff.sample",
    "jit: checkify",
    "jit: host callback",
]


@pytest.mark.parametrize("name", DEEP)
def test_a_failure_deep_in_a_command_is_one_line(name, plot_run, tmp_path, monkeypatch, capsys):
    """An exception from inside a command's work (the library, numpy, a compiled
    program) is one line on stderr in the user's terms: exit status 2 for bad input
    (``ValueError`` and its subclasses, a check failing under jit: its own message, not
    the XLA context), 1 for I/O (``OSError``) and anything unexpected."""
    import re

    make, status, msg = _deep_cases(tmp_path)[name]
    _fails_with(monkeypatch, make)
    monkeypatch.delenv("JDIFF_DEBUG", raising=False)
    code = cli.main(["plot", "--run", plot_run])
    out, err = capsys.readouterr()
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jdiff plot: error: "), err
    said = lines[0][len("jdiff plot: error: ") :]
    assert re.search(msg, said), said
    for noise in ("INTERNAL", "CpuCallback", "filter_jit", "(`check` failed)", "\\n"):
        assert noise not in said, said


@pytest.mark.parametrize(
    "argv,env",
    [(["plot", "--run", "{run}", "--debug"], None), (["--debug", "plot", "--run", "{run}"], None)]
    + [(["plot", "--run", "{run}"], "1"), (["plot", "--run", "{run}"], "0")],
    ids=["--debug after", "--debug before", "JDIFF_DEBUG=1", "JDIFF_DEBUG=0"],
)
def test_debug_prints_the_traceback_then_the_same_line(argv, env, plot_run, monkeypatch, capsys):
    _fails_with(monkeypatch, lambda: ValueError("the value is bad"))
    monkeypatch.delenv("JDIFF_DEBUG", raising=False)
    if env is not None:
        monkeypatch.setenv("JDIFF_DEBUG", env)
    code = cli.main([a.format(run=plot_run) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1] == "jdiff plot: error: the value is bad", err
    debug = env != "0"
    assert ("Traceback (most recent call last)" in err) == debug and (len(lines) > 3) == debug, err
    assert ("ValueError: the value is bad" in err) == debug


def test_every_command_accepts_debug():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "sample", "plot", "prefer", "bench", "tune", "presets"} <= set(commands)
    for name, sub in commands.items():
        assert "--debug" in sub._option_string_actions, name
    assert parser.parse_args(["presets", "--debug"]).debug is True
    assert parser.parse_args(["--debug", "presets"]).debug is True
    assert parser.parse_args(["presets"]).debug is False


def test_ctrl_c_in_a_command_is_exit_130(plot_run, monkeypatch, capsys):
    _fails_with(monkeypatch, KeyboardInterrupt)
    assert cli.main(["plot", "--run", plot_run]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_library_warnings_are_quiet_unless_debugging(plot_run, monkeypatch, caplog):
    """orbax's absl warnings (a missing ``_CHECKPOINT_METADATA``) are not shown by a
    command; ``--debug`` shows them. The logger's level is restored afterwards."""
    import logging

    def warn():
        logging.getLogger("absl").warning("Metadata file does not exist: x/_CHECKPOINT_METADATA")
        return ValueError("stop")

    _fails_with(monkeypatch, warn)
    level = logging.getLogger("absl").level
    caplog.set_level(logging.WARNING)
    cli.main(["plot", "--run", plot_run])
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
    assert logging.getLogger("absl").level == level
    cli.main(["plot", "--run", plot_run, "--debug"])
    assert [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]


def test_a_check_failing_under_jit_is_one_line_in_a_real_process(tmp_path):
    """The whole stderr of ``python -m jdiff`` (JAX's own log of the failed callback
    included) is the one line."""
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    code = (
        "import sys, test_cli_inputs as t\n"
        "from jdiff import cli\n"
        "from jdiff.cli import plot\n"
        "plot.run = lambda args, resolved: t._checked_in_jit('jdiff.sample')\n"
        f"sys.exit(cli.main(['plot', '--run', {str(run)!r}]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.dirname(__file__)]), JDIFF_CACHE_DIR="off")
    env.pop("JDIFF_DEBUG", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines() == ["jdiff plot: error: x_T of shape (4, 2) has non-finite values (NaN or inf)"], (
        r.stderr
    )


def test_sample_default_names_differ_by_every_setting_that_changes_the_samples():
    """``jdiff sample --num 16`` and ``--num 32`` (or ``--seed 5``, ...) never write the
    same file by default."""
    import dataclasses

    import jdiff
    from jdiff.cli.sample import _tag

    base = jdiff.SamplingConfig(solver="heun", nfe=4, num=16)
    assert _tag(base, 2, None, 1.0) == "heun_nfe4_step2_n16_seed0"
    names = {_tag(base, 2, None, 1.0)}
    for change in ({"num": 32}, {"seed": 5}, {"nfe": 6}, {"solver": "ddim"}, {"grid_kind": "uniform"}, {"ema": False}):
        names.add(_tag(dataclasses.replace(base, **change), 2, None, 1.0))
    names |= {_tag(base, 3, None, 1.0), _tag(base, 2, 1, 1.0), _tag(base, 2, None, 2.0)}
    names.add(_tag(jdiff.SamplingConfig(solver="dpm_solver_pp", order=2, nfe=4, num=16), 2, None, 1.0))
    assert len(names) == 11, names
    assert _tag(dataclasses.replace(base, seed=5), 2, 1, 1.5) == "heun_nfe4_step2_n16_seed5_label1_w1.5"


def test_force_overwrites_an_explicit_out(fake_run, tmp_path):
    """An existing ``--out`` is refused without ``--force`` and accepted with it (the
    checks create nothing)."""
    from jdiff.cli import plot, prefer, sample

    parser = cli.build_parser()
    (tmp_path / "s.png").write_bytes(b"old")
    (tmp_path / "r.json").write_bytes(b"old")
    for module, argv in (
        (sample, ["sample", "--run", str(fake_run), "--out", str(tmp_path / "s.png")]),
        (plot, ["plot", "--run", str(fake_run), "--out", str(tmp_path / "s.png")]),
        (prefer, ["prefer", "--out", str(tmp_path / "r.json")]),
    ):
        with pytest.raises(ValueError, match="exists: give --force"):
            module.resolve(parser.parse_args(argv))
        try:
            module.resolve(parser.parse_args(argv + ["--force"]))
        except cli.CLIError as e:  # plot: the fake run has no metrics
            assert module is plot and "no metrics" in str(e), e
    assert sorted(os.listdir(tmp_path)) == ["r.json", "s.png"]
    assert (tmp_path / "s.png").read_bytes() == b"old"


def test_preset_positional_and_flag_are_the_same(capsys):
    assert cli.main(["presets", "digits"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == P.config_to_dict(P.get_preset("digits"))
    from jdiff.cli import train

    parser = cli.build_parser()
    a = train.resolve(parser.parse_args(["train", "digits", "--out", "/tmp/x-never-created"]))
    b = train.resolve(parser.parse_args(["train", "--preset", "digits", "--out", "/tmp/x-never-created"]))
    assert P.config_to_dict(a.cfg) == P.config_to_dict(b.cfg) and not os.path.exists("/tmp/x-never-created")


def test_config_keys_follow_the_library():
    """Library settings the old hand-written specs lacked are configurable, and
    config.json round-trips (process by name and settings, dtypes by name)."""
    cfg = P.apply_overrides(
        P.get_preset("digits"),
        [
            "objective.process=vp_discrete",
            "objective.time_sampling=discrete",
            "objective.time_input=timestep",
            "objective.process.t_min=0.002",
            "model.unet.dtype=bfloat16",
            "model.unet.num_groups=8",
            "sample.solver=dpm++2m",
            "sample.order=0",
            "optim.clip_norm=none",
        ],
    )
    o = cfg.objective
    assert type(o.process).__name__ == "VPDiscrete" and o.process.t_min == 0.002
    assert o.time_sampling == "discrete" and o.time_input == "timestep" and o.num_classes == 10
    d = json.loads(json.dumps(P.config_to_dict(cfg)))
    assert d["objective"]["process"]["name"] == "vp_discrete" and d["model"]["unet"]["dtype"] == "bfloat16"
    assert P.config_to_dict(P.config_from_dict(d)) == d
    assert cfg.sample.make_solver() == cfg.sample.make_solver()  # solvers are values
    assert cfg.sample.make_solver().name == "dpm++2m"
    # The models keep their own class dropout (the loss drops labels).
    assert cfg.model.unet.class_dropout == 0.0


def test_label_dropout_rate_through_the_cli_config(monkeypatch):
    """Labels reach the model as the null class at rate p (counted at the loss level,
    on the labels the loss passes to the network)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jdiff import train as T

    p, n = 0.3, 20000
    cfg = P.apply_overrides(P.get_preset("toy2d"), ["data.class_conditional=true", f"objective.label_dropout={p}"])
    lc = cfg.objective
    assert lc.label_dropout == p and lc.num_classes == 2
    seen = {}

    def apply(params, x, t, cond, key=None):
        seen["cond"] = cond
        return jnp.zeros_like(x)

    loss = T.make_loss_fn(apply, lc)
    batch = {"x": jnp.zeros((n, 2)), "label": jnp.zeros((n,), jnp.int32)}
    jax.eval_shape  # noqa: B018 (the loss runs eagerly: cond is concrete)
    loss({}, batch, jax.random.key(0))
    cond = np.asarray(seen["cond"])
    frac = float(np.mean(cond == lc.num_classes))
    assert set(np.unique(cond)) <= {0, lc.num_classes}
    assert abs(frac - p) < 3 * np.sqrt(p * (1 - p) / n), frac


def test_drop_tracebacks_drops_only_the_named_error():
    """The stderr filter of a command drops bare tracebacks ending in the named error
    (written in pieces, as the C++ side prints them) and passes everything else."""
    import io

    from jdiff.cli._errors import DropTracebacks

    out = io.StringIO()
    s = DropTracebacks(out)
    noise = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n'
    noise += "RuntimeError: Event loop is closed\n"
    other = 'Traceback (most recent call last):\n  File "y.py", line 2, in h\nValueError: kept\n'
    for piece in ("jdiff train: error: disk", " full\n", noise[:30], noise[30:], other, noise, "last line\n"):
        s.write(piece)
    # a traceback that stops after its first line and a blank one (printed at interpreter
    # exit, as seen in CI) is never completed, and never written
    s.write("Traceback (most recent call last):\n\n")
    s.flush()
    assert out.getvalue() == "jdiff train: error: disk full\n" + other + "last line\n"


def test_drop_tracebacks_keeps_each_threads_lines_apart():
    """A traceback a background thread is printing is not ended by the main thread's
    report line written in between (the CI failure: the report line was taken as the
    traceback's error line and the whole block came out)."""
    import io
    import threading

    from jdiff.cli._errors import DropTracebacks

    out = io.StringIO()
    s = DropTracebacks(out)
    started, reported = threading.Event(), threading.Event()

    def background():
        s.write("Traceback (most recent call last):\n")
        s.write('  File "base_events.py", line 806, in call_soon_threadsafe\n')
        started.set()
        reported.wait(5)
        s.write("RuntimeError: Event loop is closed\n")

    t = threading.Thread(target=background)
    t.start()
    started.wait(5)
    s.write("jdiff train: error: cannot write step 20: File too large\n")
    reported.set()
    t.join(5)
    s.flush()
    assert out.getvalue() == "jdiff train: error: cannot write step 20: File too large\n"
