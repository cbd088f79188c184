"""``jdiff sample --student DIR``: draw from a student folder written by ``jdiff
distill`` with its method's own sampler at ``--steps`` (default: the steps it was
trained for; more is the method's one-line error): :func:`jdiff.distill.sample_student`.
The options shared with ``--run`` keep their meaning; the solver options (``--solver``,
``--order``, ``--nfe``, ``--grid-kind``) and the run-only ones are refused."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from jdiff.cli._args import check_output
from jdiff.cli._common import CLIError, positive

_REFUSED = {
    "solver": "--solver",
    "order": "--order",
    "nfe": "--nfe",
    "grid_kind": "--grid-kind",
    "ema": "--ema/--no-ema",
    "step": "--step",
}


@dataclasses.dataclass(frozen=True)
class StudentRequest:
    """The checked options of ``jdiff sample --student``."""

    folder: str
    method: str
    steps: int
    num: int
    seed: int
    label: int | None
    guidance: float | None
    out: str


def resolve(args, outputs) -> StudentRequest:
    """Check the options, the folder's record and the output paths; creates nothing.
    ``outputs(out)`` gives the image and ``.npz`` paths of ``--out`` (checked)."""
    if args.run is not None or args.model is not None:
        raise CLIError("give --student DIR alone: not with --run or --model")
    for key, flag in _REFUSED.items():
        if getattr(args, key) is not None:
            hint = ": give --steps N" if key == "nfe" else ""
            raise CLIError(f"{flag} does not apply to --student: a student samples with its own method{hint}")
    if args.batch_size:
        raise CLIError("--batch-size does not apply to --student (its samples are drawn in one call)")
    positive(args.steps, "--steps")
    positive(args.num, "--num")
    positive(args.seed, "--seed", 0)
    from jdiff.distill import shipped_students, student_dir

    folder = student_dir(args.student)
    record = os.path.join(folder, "student.json")
    if not os.path.isfile(record):
        shipped = ", ".join(shipped_students()) or "none"
        raise CLIError(
            f"--student {args.student}: no student there (no student.json); train one with jdiff distill "
            f"(shipped students: {shipped})"
        )
    try:
        with open(record) as f:
            info = json.load(f)
        method, trained, nc = str(info["method"]), int(info["steps"]), int(info["teacher"]["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CLIError(f"--student {args.student}: cannot read student.json: {e}") from None
    if args.label is not None and not nc:
        raise CLIError("this student is unconditional: --label does not apply")
    if args.label is not None and not 0 <= args.label < nc:
        raise CLIError(f"--label must be in [0, {nc}), got {args.label}")
    steps = trained if args.steps is None else args.steps
    num, seed = args.num or 16, args.seed or 0
    if args.out is None:
        parts = [f"steps{steps}", f"n{num}", f"seed{seed}"]
        parts += [f"label{args.label}"] if args.label is not None else []
        parts += [f"w{args.guidance:g}"] if args.guidance is not None else []
        # a folder takes its own samples; a shipped student's go under ./samples, not into the package
        home = os.path.join(folder, "samples") if os.path.isdir(args.student) else f"samples/student_{args.student}"
        out = os.path.join(home, "sample_" + "_".join(parts) + ".png")
    else:
        out = args.out
    for path in outputs(out):
        check_output(path, "--out", force=args.force or args.out is None)
    return StudentRequest(folder, method, steps, num, seed, args.label, args.guidance, out)


def run(r: StudentRequest, outputs) -> int:
    import jax
    import numpy as np

    from jdiff import plotting
    from jdiff.distill import load_student, sample_student

    s = load_student(r.folder)
    nc = s.teacher.num_classes
    labels = None
    if nc:
        labels = np.full(r.num, r.label, np.int32) if r.label is not None else (np.arange(r.num) % nc).astype(np.int32)
    kw = {} if r.guidance is None else {"guidance": r.guidance}
    t0 = time.perf_counter()
    try:
        x = sample_student(s, r.num, jax.random.key(r.seed), steps=r.steps, cond=labels, **kw)
    except TypeError as e:
        if kw and "guidance" in str(e):
            raise CLIError(f"the {s.method} student takes no --guidance") from None
        raise
    x = np.asarray(jax.block_until_ready(x))
    seconds = time.perf_counter() - t0
    if not np.all(np.isfinite(x)):
        print(f"warning: {int((~np.isfinite(x)).sum())} non-finite values in the samples", file=sys.stderr)
    img, npz = outputs(r.out)
    nrow = nc if (nc and r.label is None and r.num % nc == 0) else None
    plotting.save_samples(x, img, nrow=nrow, title=f"{s.method} student, {r.steps} step(s)")
    os.makedirs(os.path.dirname(os.path.abspath(npz)), exist_ok=True)
    np.savez(
        npz,
        samples=x,
        labels=labels if labels is not None else np.zeros((0,), np.int32),
        method=s.method,
        steps=r.steps,
        seed=r.seed,
        student=os.path.abspath(r.folder),
    )
    took = f"in {seconds:.1f} s -> {img}, {npz}"
    print(f"{r.num} samples of the {s.method} student {r.folder} with {r.steps} step(s) {took}")
    return 0
