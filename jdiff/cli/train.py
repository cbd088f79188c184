"""``jdiff train``: train from a preset (or resume a run) with the library's loop."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any

from jdiff.cli._common import CLIError
from jdiff.runs import _dir as R
from jdiff.runs._build import build_run, check_solver_nfe, denoiser_apply, make_solver, run_denoiser, to_host
from jdiff.runs._config import ConfigError, RunConfig, apply_overrides, config_to_dict
from jdiff.runs._errors import RunError
from jdiff.train import _run as record

HELP = "train a model from a preset"


def add_parser(sub, formatter, preset_names: list[str]):
    preset_list = ", ".join(preset_names)
    tr = sub.add_parser(
        "train",
        formatter_class=formatter,
        help=HELP,
        description="Train from a named preset. Writes config.json, run.json, metrics.jsonl, loss.png, sample "
        "grids and orbax checkpoints into --out. A directory that already holds checkpoints of the "
        "same configuration is resumed exactly (model, optimizer, EMA, RNG and data position). "
        "SIGTERM or Ctrl-C saves a checkpoint and exits with status 0.",
        epilog="examples:\n  jdiff train digits --out runs/digits\n"
        "  jdiff train --preset toy2d --set optim.lr=1e-3 --set model.mlp.width=64 --steps 500\n"
        "  jdiff train --out runs/digits --resume --steps 3000\n"
        "  jdiff presets digits --keys      # every key --set accepts, with its type\n"
        "multi-host: run the same command on every host with --coordinator HOST0:PORT "
        "--num-processes N --process-id I (or JDIFF_COORDINATOR / JDIFF_NUM_PROCESSES / JDIFF_PROCESS_ID, "
        "or --distributed on a TPU pod / SLURM); --out must be on a shared file system.",
    )
    tr.add_argument("preset_arg", nargs="?", metavar="PRESET", help=f"named configuration: {preset_list}")
    tr.add_argument("--preset", help="the same as the positional PRESET")
    tr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=3e-4 or model.unet.channel_mult=1,2,2 (repeatable)",
    )
    tr.add_argument("--out", metavar="DIR", help="run directory (default: runs/<preset>)")
    tr.add_argument("--steps", type=int, help="total training steps (same as --set train.steps=N)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its saved config.json (--preset not needed; --set and "
        "--steps still apply); fails if it has no checkpoint",
    )
    tr.add_argument(
        "--replace-config",
        action="store_true",
        help="resume a run whose config.json is missing or unreadable with the configuration given here "
        "(--preset NAME and every --set of the original run): you state that it is the run's full configuration",
    )
    tr.add_argument(
        "--stop-at", type=int, metavar="STEP", help="save a checkpoint and stop after this step (resume later)"
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: address of process 0")
    tr.add_argument("--num-processes", type=int, metavar="N", help="multi-host: number of processes (one per host)")
    tr.add_argument("--process-id", type=int, metavar="I", help="multi-host: this process's index in [0, N)")
    tr.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: let jax.distributed.initialize detect the cluster (Cloud TPU, SLURM, ...)",
    )
    tr.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="split the CPU into N JAX devices (data parallelism on one machine, for testing)",
    )
    tr.set_defaults(fn=run, check=resolve)
    return tr


# ------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class Request:
    """What ``jdiff train`` was asked to do, checked (see :func:`resolve`).

    Attributes:
      cfg: the configuration to train with.
      out: the run directory.
      saved: the run's recorded configuration (a dict) when ``out`` has checkpoints,
        else ``None``.
      replaced: ``config.json`` is missing or unreadable and ``cfg`` was given in its
        place (``--replace-config``).
      changes: the allowed settings changed on resume ``{key: (saved, requested)}``.
    """

    cfg: RunConfig
    out: str
    saved: dict | None = None
    replaced: bool = False
    changes: dict = dataclasses.field(default_factory=dict)


def resolve(args) -> Request:
    """The configuration to train with and the run directory, every value checked;
    creates nothing and starts no JAX backend."""
    from jdiff import presets as P
    from jdiff.cli._common import positive, writable_path

    if args.preset_arg is not None and args.preset is not None and args.preset_arg != args.preset:
        raise CLIError(f"two presets given: {args.preset_arg!r} and --preset {args.preset!r}")
    preset = args.preset if args.preset is not None else args.preset_arg
    positive(args.steps, "--steps")
    positive(args.stop_at, "--stop-at")
    positive(args.cpu_devices, "--cpu-devices")
    positive(args.num_processes, "--num-processes")
    positive(args.process_id, "--process-id", 0)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.replace_config and preset is None:
        raise CLIError(
            "--replace-config takes the run's full configuration from the command line: give --preset NAME "
            "and every --set the run was trained with"
        )
    # The full configuration given on the command line (a preset and overrides), if any.
    given = apply_overrides(P.get_preset(preset), overrides) if preset is not None else None
    out = args.out
    if out is not None:
        writable_path(out, "--out", directory=True)
    if args.resume:
        if out is None:
            raise CLIError("--resume needs --out DIR (the run to continue)")
        if not os.path.isdir(out):
            raise CLIError(f"run directory not found: {out}")
        if not R.checkpoint_steps(out):
            raise CLIError(f"--resume: no checkpoint found in {os.path.join(out, R.CKPT_DIR)}")
    elif given is None:
        raise CLIError(f"give a preset: jdiff train NAME (one of: {', '.join(P.preset_names())}) or --resume --out DIR")
    if out is None:
        out = os.path.join("runs", given.name)
        writable_path(out, "run directory", directory=True)
    if not R.checkpoint_steps(out):
        if args.replace_config:
            raise CLIError(f"--replace-config: {out} has no checkpoint, so there is no run to resume")
        return Request(given, out)  # a new run (or one killed before its first checkpoint)
    # Resuming (asked for, or implied by checkpoints in --out): the run's recorded
    # configuration decides; a missing one only with the full configuration and --replace-config.
    replacement = config_to_dict(given) if args.replace_config else None
    try:
        saved, replaced = R.read_config_dict(out, replacement=replacement)
    except RunError as e:
        raise CLIError(
            f"{e} (if you have it, resume with: jdiff train --out {out} --resume --preset NAME "
            "[--set KEY=VALUE ...] --replace-config)"
        ) from None
    base = R.config_of(saved, os.path.join(out, R.CONFIG_FILE))
    if preset is not None and preset != base.name and not replaced:
        raise CLIError(f"{out} holds a run of preset {base.name!r}, not {preset!r}")
    # --resume continues with the recorded configuration (and the overrides); a full configuration
    # given again (a preset without --resume, or --replace-config) is compared with the record.
    cfg = apply_overrides(base, overrides) if (args.resume and not args.replace_config) else given
    changes = R.check_resumable(saved, cfg, out)
    return Request(cfg, out, saved, replaced, changes)


# ------------------------------------------------------------------------- signals


class _Signals:
    """SIGTERM sets the library's stop flag (the run was preempted); a first Ctrl-C
    asks the loop to save and stop (an interrupt, reported as SIGINT); a second one
    aborts at once."""

    def __init__(self, main: bool):
        from jdiff.train import SigtermFlag

        self.flag = SigtermFlag(signals=(signal.SIGTERM,))
        self.interrupted = False
        self._main = main
        self._previous = None

    def _on_sigint(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        if self._main:
            print("\ninterrupt: saving a checkpoint and stopping (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self):
        import threading

        self.flag.install()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        self.flag.uninstall()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _init_distributed(args) -> None:
    """Start the multi-process runtime if the flags or environment ask for it."""
    from jdiff.train import initialize_distributed

    coord = args.coordinator or os.environ.get("JDIFF_COORDINATOR")
    nproc = args.num_processes if args.num_processes is not None else os.environ.get("JDIFF_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JDIFF_PROCESS_ID")
    nproc = None if nproc in (None, "") else int(nproc)
    pid = None if pid in (None, "") else int(pid)
    if args.cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", int(args.cpu_devices))
    if args.distributed and coord is None and nproc is None:
        os.environ["JDIFF_DISTRIBUTED"] = "1"  # let JAX detect the cluster (TPU pod, SLURM, ...)
        initialize_distributed()
        return
    if nproc is not None and nproc > 1:
        if coord is None or pid is None:
            raise CLIError(
                "a multi-process run needs --coordinator HOST:PORT and --process-id "
                "(or JDIFF_COORDINATOR / JDIFF_PROCESS_ID)"
            )
        if not 0 <= pid < nproc:
            raise CLIError(f"--process-id must be in [0, {nproc}), got {pid}")
        initialize_distributed(coord, nproc, pid)
    elif coord is not None and nproc is None:
        initialize_distributed(coord, None, pid)


# ---------------------------------------------------------------------------- run


def _advance(gen, send):
    """The loop's next ``(step, metrics, state)``, or its :class:`TrainResult` when it
    has finished (``None`` if it never ran a step and returned nothing)."""
    try:
        return next(gen) if send is None else gen.send(bool(send))
    except StopIteration as e:
        return e.value


def _metrics_row(step: int, host: list, steps: int, seconds: float, batch_size: int, wall: float) -> dict:
    """One metrics line: interval means of the step metrics (``lr``: the last value)."""
    import numpy as np

    row: dict[str, Any] = {"step": int(step)}
    for k in sorted(host[0]) if host else ():
        vals = [float(np.asarray(m[k])) for m in host]
        row[k] = vals[-1] if k == "lr" else float(np.mean(vals))
    rate = steps / seconds if steps and seconds > 0 else None
    row["steps_per_sec"] = rate
    row["samples_per_sec"] = None if rate is None else rate * batch_size
    row["wall_time"] = wall
    return row


def run(args, resolved) -> int:
    t_start = time.perf_counter()  # wall_time in metrics.jsonl counts from here (data, init, compile included)
    req: Request = resolved
    cfg, out = req.cfg, req.out
    _init_distributed(args)  # everything before this stays off the JAX backend

    import jax
    import numpy as np
    from jax.sharding import Mesh
    from tqdm.auto import tqdm

    import jdiff
    from jdiff import data as D
    from jdiff import models as M
    from jdiff import plotting
    from jdiff import train as T

    main_proc = jax.process_index() == 0
    ckpt_dir = os.path.join(out, R.CKPT_DIR)
    run_ = build_run(cfg)
    cfg = run_.cfg  # with the data-derived fields filled
    t = cfg.train
    n = int(run_.x.shape[0])
    if t.batch_size > n:
        raise CLIError(f"train.batch_size ({t.batch_size}) is larger than the data set ({n} examples)")
    mesh = T.make_mesh()
    n_dev = mesh.devices.size
    if t.batch_size % n_dev or (t.batch_size // cfg.optim.accum_steps) % n_dev:
        raise CLIError(
            f"train.batch_size {t.batch_size} (and each of optim.accum_steps={cfg.optim.accum_steps} "
            f"micro-batches) must be divisible by the {n_dev} devices"
        )
    s = cfg.sample
    solver = make_solver(s)
    check_solver_nfe(run_, solver, s.nfe, s.grid_kind)
    arrays = {"x": run_.x} if run_.labels is None else {"x": run_.x, "label": run_.labels}
    try:
        loader = D.Loader(arrays, t.batch_size, cfg.data.shuffle_seed)
    except ValueError as e:
        raise CLIError(str(e)) from e
    loss_fn = T.make_loss_fn(run_.apply, cfg.objective)
    stop_at = args.stop_at

    # Which step the loop will restore (read-only: nothing is moved or reported here), so
    # that a command with nothing to do changes nothing and the optimizer is built with
    # the run's learning-rate plan before training starts.
    target = _state_target(run_, cfg, mesh)
    restored = R.restorable_step(ckpt_dir, target)
    if restored is None and args.resume:
        raise CLIError(f"--resume: no checkpoint found in {ckpt_dir}")
    start = 0 if restored is None else restored
    if restored is not None and (restored >= t.steps or (stop_at is not None and stop_at <= restored)):
        if main_proc:
            why = (
                f"train.steps={t.steps} (raise it with --steps to continue)"
                if restored >= t.steps
                else f"--stop-at {stop_at}"
            )
            print(f"nothing to do: the run in {out} is at step {restored}, and {why}; nothing was changed", flush=True)
        return 0

    # The run's record: the learning-rate plan follows from the history (the totals in force
    # at each start), extended by this invocation's entry; process 0 writes.
    history = record.read_history(out) if os.path.isdir(out) else []
    argv = list(getattr(args, "argv", None) or sys.argv)
    before: list = []
    if restored is not None and not any(e.get("event") == "started" for e in history):
        # A run without a history (written before history.jsonl existed, or with it deleted):
        # its schedule was planned for the total recorded in its configuration.
        saved_total = int((req.saved or {}).get("train", {}).get("steps", t.steps))
        before.append(
            record.history_entry(
                "started",
                start_step=0,
                total_steps=saved_total,
                what=f"reconstructed at step {restored}: no history; the total recorded in config.json",
            )
        )
    in_force = record.schedule_plan(history + before)
    old_total = (in_force[1][-1][1] if in_force[1] else in_force[0]) if in_force[0] is not None else None
    what = f"trained from step {start} to {t.steps}" if restored is None else f"resumed at step {start}"
    if restored is not None and old_total is not None and old_total != t.steps:
        what += f"; train.steps {old_total} -> {t.steps}: schedule extended at {start} to {t.steps}"
    if req.replaced:
        what += "; config.json was missing or unreadable: replaced by the configuration given (--replace-config)"
    changed = {k: v for k, v in req.changes.items() if k != "train.steps"}
    if changed:
        what += "; changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    entry = record.history_entry(
        "started", argv=argv, start_step=start, total_steps=t.steps, stop_at=stop_at, what=what
    )
    base_total, extensions = record.schedule_plan(history + before + [entry])
    tx, sched = _optimizer(cfg.optim, base_total or t.steps, extensions)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jdiff_train_plan")  # every process has read the history

    wall_offset = 0.0
    if main_proc:
        os.makedirs(os.path.join(out, R.SAMPLES_DIR), exist_ok=True)
        cfg_dict = config_to_dict(cfg)
        if req.saved is None or req.replaced or cfg_dict != req.saved:
            record.write_config(out, cfg_dict)
        if not os.path.exists(os.path.join(out, R.RUN_FILE)):
            record.write_json_atomic(
                os.path.join(out, R.RUN_FILE),
                {
                    "preset": cfg.name,
                    "data_shape": list(run_.data_shape),
                    "num_classes": run_.num_classes,
                    "num_examples": n,
                    "num_params": M.count_params(run_.params),
                    "process_count": jax.process_count(),
                    "device_count": jax.device_count(),
                    "devices": str(jax.devices()[0].device_kind),
                    "platform": jax.default_backend(),
                    "jax_version": jax.__version__,
                    "jdiff_version": jdiff.__version__,
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
        for e in before + [entry]:
            record.append_history(out, e)
        # Lines past the restored step are redone (a fresh start redoes everything).
        wall_offset = record.trim_metrics(os.path.join(out, R.METRICS_FILE), start)
        print(
            f"jdiff train: preset {cfg.name}, {M.count_params(run_.params):,} parameters, data "
            f"{tuple(run_.x.shape)}{f', {run_.num_classes} classes' if run_.num_classes else ''}, "
            f"{jax.device_count()} device(s) on {jax.process_count()} process(es) -> {out}",
            flush=True,
        )
        if extensions and restored is not None and extensions[-1][0] == start:
            print(
                f"train.steps {old_total} -> {t.steps}: the learning-rate schedule continues from step {start} "
                f"(lr {float(sched(start)):.4g}) and reaches optim.final_lr at step {t.steps}",
                flush=True,
            )

    # Sample grids: process 0 alone, on its first local device, from host copies of the params.
    parts = denoiser_apply(run_)
    grid_mesh = Mesh(
        np.array(jax.local_devices()[:1], dtype=object), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    sample_labels = np.arange(s.num) % run_.num_classes if run_.num_classes else None
    reference = run_.x[:5000] if run_.x.ndim == 2 else None

    def write_grid(step, state):
        params = state.ema_params if (s.ema and state.ema_params is not None) else state.params
        den = run_denoiser(parts, run_, to_host(params), s.guidance)
        x = jdiff.generate(
            solver,
            den,
            s.num,
            run_.data_shape,
            nfe=s.nfe,
            seed=s.seed,
            cond=sample_labels,
            mesh=grid_mesh,
            grid_kind=s.grid_kind,
        )
        path = os.path.join(out, R.SAMPLES_DIR, f"step_{step:07d}.png")
        nrow = run_.num_classes if (run_.num_classes and s.num % run_.num_classes == 0) else None
        plotting.save_samples(
            x, path, nrow=nrow, reference=reference, title=f"{cfg.name} step {step} ({s.solver}, nfe {s.nfe})"
        )
        return path

    def plot_loss():
        rows = [r for r in plotting.read_metrics(os.path.join(out, R.METRICS_FILE)) if "loss" in r]
        if rows:
            plotting.plot_loss(
                [r["step"] for r in rows],
                [r["loss"] for r in rows],
                os.path.join(out, R.LOSS_PLOT),
                f"training loss: {cfg.name}",
            )

    signals = _Signals(main_proc)
    gen = T.train_iter(
        loss_fn,
        run_.params,
        loader,
        t.steps,
        optimizer=tx,
        seed=t.seed,
        mesh=mesh,
        checkpoint_dir=ckpt_dir,
        save_every=t.checkpoint_every,
        keep=t.keep,
        async_checkpointing=t.async_checkpointing,
        accum_steps=cfg.optim.accum_steps,
        ema_decay=cfg.ema.decay,
        ema_warmup=cfg.ema.warmup,
        schedule=sched,
        stop_flag=signals.flag,
    )
    result = bar = None
    last_loss = float("nan")
    pending: list = []
    interval_t0, interval_steps = t_start, 0
    start_step = None
    with signals, contextlib.closing(gen):
        try:
            item = _advance(gen, None)
            while item is not None and not isinstance(item, T.TrainResult):
                step, metrics, state = item
                if start_step is None:
                    # First step: it includes compilation, so it is left out of steps/s.
                    # (The library's loop prints the restored step of a resumed run.)
                    start_step = step - 1
                    if start_step != start:
                        raise CLIError(
                            f"the checkpoints in {ckpt_dir} changed while starting (expected to resume at "
                            f"step {start}, the loop restored step {start_step}); run the command again"
                        )
                    jax.block_until_ready(metrics)
                    interval_t0, interval_steps = time.perf_counter(), 0
                    if main_proc:
                        bar = tqdm(
                            total=t.steps,
                            initial=start_step,
                            unit="step",
                            dynamic_ncols=True,
                            desc=cfg.name,
                            smoothing=0.1,
                            file=sys.stderr,
                            disable=args.no_progress,
                        )
                else:
                    interval_steps += 1
                if main_proc:
                    pending.append(metrics)
                    bar.update(1)
                if main_proc and (step % t.log_every == 0 or step == t.steps):
                    host = jax.device_get(pending)  # waits for the steps dispatched so far
                    now = time.perf_counter()
                    row = _metrics_row(
                        step, host, interval_steps, now - interval_t0, t.batch_size, wall_offset + (now - t_start)
                    )
                    R.append_metrics(out, row)
                    last_loss = row.get("loss", float("nan"))
                    bar.set_postfix(loss=f"{last_loss:.4g}", refresh=False)
                    pending.clear()
                    interval_t0, interval_steps = now, 0
                if main_proc and t.grid_every and step % t.grid_every == 0 and step != t.steps:
                    write_grid(step, state)
                    plot_loss()
                    interval_t0, interval_steps = time.perf_counter(), 0
                stop = (stop_at is not None and step >= stop_at) or signals.interrupted
                item = _advance(gen, stop)
            result = item
            if main_proc and pending and result is not None:
                # Log the steps since the last line (a run stopped between log steps).
                host = jax.device_get(pending)
                now = time.perf_counter()
                row = _metrics_row(
                    result.step, host, interval_steps, now - interval_t0, t.batch_size, wall_offset + (now - t_start)
                )
                R.append_metrics(out, row)
                last_loss = row.get("loss", float("nan"))
        finally:
            if bar is not None:
                bar.close()
    if result is None or start_step is None:  # the loop ran no step (checked above; kept for safety)
        if main_proc:
            print(f"nothing to do: the run in {out} has reached train.steps={t.steps}", flush=True)
        return 0
    if main_proc:
        wall = wall_offset + (time.perf_counter() - t_start)
        finished = result.step >= t.steps and not result.stopped
        if finished:
            path = write_grid(result.step, result.state)
            plot_loss()
            why = None
        else:
            if result.preempted:
                why = "SIGTERM"
            elif signals.interrupted:
                why = "interrupted (SIGINT)"
            elif stop_at is not None and result.step >= stop_at:
                why = f"--stop-at {stop_at}"
            else:
                why = "stop requested"
            plot_loss()
        record.append_history(
            out,
            record.history_entry(
                "finished" if finished else "stopped",
                argv=argv,
                start_step=start,
                end_step=result.step,
                total_steps=t.steps,
                what=f"trained {start}->{result.step}" + ("" if finished else f" ({why})"),
            ),
        )
        if finished:
            print(
                f"done: step {result.step}/{t.steps}, loss {last_loss:.5g}, wall time {wall:.1f} s; "
                f"samples {path}; checkpoints {ckpt_dir}",
                flush=True,
            )
        else:
            print(
                f"stopped at step {result.step}/{t.steps} ({why}); checkpoint saved in {ckpt_dir}; "
                f"continue with: jdiff train --out {out} --resume",
                flush=True,
            )
    return 0


def _state_target(run_, cfg: RunConfig, mesh):
    """Shapes, dtypes and (replicated) shardings of the state the loop trains, as the
    target of a restore."""
    import jax

    from jdiff import train as T

    tx, _ = cfg.optim.build(cfg.train.steps)  # the state's structure does not depend on the schedule
    shapes = jax.eval_shape(
        lambda p: T.init_train_state(p, tx, cfg.train.seed, ema=cfg.ema.decay is not None), run_.params
    )
    sharding = T.replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _optimizer(o, total: int, extensions):
    """``(optax transformation, schedule)`` of :meth:`OptimizerConfig.build` for a run
    planned for ``total`` steps whose total was changed at the given steps
    (``extensions``, see :func:`jdiff.train.lr_schedule`): without extensions exactly
    ``o.build(total)``."""
    from jdiff import train as T

    if not extensions:
        return o.build(total)
    warmup = min(o.warmup_steps, max(total - 1, 0))  # as OptimizerConfig.schedule_fn
    sched = T.lr_schedule(
        o.lr,
        warmup_steps=warmup,
        total_steps=total if o.schedule == "cosine" else None,
        final_lr=o.final_lr,
        extensions=extensions,
    )
    tx = T.make_optimizer(sched, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm)
    return tx, sched


__all__ = ["add_parser", "resolve", "run", "ConfigError"]
