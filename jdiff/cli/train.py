"""``jdiff train``: train from a preset (or resume a run): :func:`jdiff.runs.train_run`."""

from __future__ import annotations

import os

from jdiff.cli._common import CLIError, positive
from jdiff.runs import TrainRequest, plan_training, train_run

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


def resolve(args) -> TrainRequest:
    """The configuration to train with and the run directory, every value checked
    (:func:`jdiff.runs.plan_training`); creates nothing and starts no JAX backend."""
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
    return plan_training(preset, overrides, out=args.out, resume=args.resume, replace_config=args.replace_config)


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


def run(args, req: TrainRequest) -> int:
    _init_distributed(args)  # everything before this stays off the JAX backend
    import jax

    o = train_run(req, stop_at=args.stop_at, argv=getattr(args, "argv", None), progress=not args.no_progress)
    if jax.process_index() != 0:
        return 0
    if o.nothing_to_do is not None:
        print(
            f"nothing to do: the run in {o.out} is at step {o.step}, and {o.nothing_to_do}; nothing was changed",
            flush=True,
        )
    elif o.finished:
        print(
            f"done: step {o.step}/{o.total_steps}, loss {o.loss:.5g}, wall time {o.wall_time:.1f} s; "
            f"samples {o.samples}; checkpoints {o.checkpoints}",
            flush=True,
        )
    else:
        print(
            f"stopped at step {o.step}/{o.total_steps} ({o.stopped}); checkpoint saved in {o.checkpoints}; "
            f"continue with: jdiff train --out {o.out} --resume",
            flush=True,
        )
    return 0


__all__ = ["add_parser", "resolve", "run"]
