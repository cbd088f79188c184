"""Malformed command lines: each is answered by one line on stderr, a non-zero exit
status, and nothing created on disk (checked before any data, model or JAX backend)."""

from __future__ import annotations

import json
import os

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
    (["sample", "--run", "{run}", "--guidance", "nan"], "--guidance must be finite"),
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
