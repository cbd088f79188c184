"""Few-step students of the digits model against its solvers: FD-digits on 1,000 samples
and class accuracy per student and step count, on the main job's quality-versus-NFE figure.

    python benchmarks/distill.py students/* --out benchmarks/results/distill
    python benchmarks/distill.py --rows rows.csv --solver-nfes 4,20 --out /tmp/d   # rows measured elsewhere
    python benchmarks/distill.py students/* --solver-nfes 4 --reference-nfes 20 --out D  # every solver at 4 only

Students are folders of ``jdiff distill`` (``jdiff.distill.load_student``): each is
sampled at every step count of ``--steps`` up to the count it was trained for (and at
that count), 1,000 class-conditional samples (labels 0..9 cycling, seed 0), scored as
``scripts/check_pretrained_digits.py`` and ``jdiff bench`` score the teacher: FD-digits
against the 450 held-out digits and the digits classifier's accuracy on the labels.
``--rows`` adds rows measured by other scripts (``experiments/distill/*.py``): a CSV with
the columns ``method``, ``steps`` (or ``nfe``), ``fd_digits``, ``accuracy`` and
optionally ``train_seconds``, measured the same way.

The baseline is the teacher itself, on the same sample count and seed: every solver of
the registry at ``--solver-nfes`` (:func:`jdiff.sweep.nfe_sweep`, resumable, written to
``OUT/solvers/``). Written: ``OUT/students.csv`` (one row per student and step count),
``OUT/fd_vs_nfe.png`` (the solvers' families as lines, the students as points), and the
table and the issue's three checks on stdout: the best one-step student within 1.5x the
teacher's FD-digits at NFE 20 (its best solver), the best two-step one within 1.2x, and
the best student at 2 NFE below every solver at 4 NFE.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import jax
import numpy as np

from jdiff import solvers as S
from jdiff.bench import digits_metrics
from jdiff.distill import DistillError, load_student, sample_student
from jdiff.features.digits import digits_classifier, digits_split
from jdiff.runs import pretrained
from jdiff.sweep import nfe_sweep, plot_results

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import machine, today  # noqa: E402

COLUMNS = ["method", "steps", "nfe", "fd_digits", "accuracy", "sample_seconds", "train_seconds", "train_steps"]
COLUMNS += ["source"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def student_rows(folder: str, counts, num: int, seed: int, metrics) -> list[dict]:
    """One row per step count of the student in ``folder`` (counts above its trained
    count are left out; a count its method refuses is reported and skipped)."""
    s = load_student(folder)
    per_step = int(s.info.get("notes", {}).get("nfe_per_step", 1))
    train = s.info.get("training", {})
    labels = (np.arange(num) % max(s.teacher.num_classes, 1)).astype(np.int32) if s.teacher.num_classes else None
    rows = []
    for k in sorted({c for c in counts if c <= s.steps} | {s.steps}):
        t0 = time.perf_counter()
        try:
            x = np.asarray(jax.block_until_ready(sample_student(s, num, jax.random.key(seed), steps=k, cond=labels)))
        except DistillError as e:
            print(f"{folder}: {k} step(s) skipped: {e}", file=sys.stderr)
            continue
        dt = time.perf_counter() - t0
        m = metrics(x) if np.all(np.isfinite(x)) else {"fd_digits": float("nan"), "accuracy": float("nan")}
        rows.append(
            dict(
                method=s.method,
                steps=k,
                nfe=k * per_step,
                fd_digits=m["fd_digits"],
                accuracy=m.get("accuracy"),
                sample_seconds=round(dt, 2),
                train_seconds=train.get("wall_time"),
                train_steps=train.get("step"),
                source=folder,
            )
        )
        print(f"{s.method} ({folder}) {k} step(s): FD-digits {m['fd_digits']:.4g}, accuracy {m.get('accuracy')}")
    return rows


def csv_rows(path: str) -> list[dict]:
    """Rows measured by another script (see the module docstring)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            steps = int(r.get("steps") or r["nfe"])
            rows.append(
                dict(
                    method=r["method"],
                    steps=steps,
                    nfe=int(r.get("nfe") or steps),
                    fd_digits=float(r["fd_digits"]),
                    accuracy=float(r["accuracy"]) if r.get("accuracy") not in (None, "") else None,
                    sample_seconds=None,
                    train_seconds=float(r["train_seconds"]) if r.get("train_seconds") not in (None, "") else None,
                    train_steps=r.get("train_steps") or None,
                    source=path,
                )
            )
    return rows


def best(rows: list[dict], nfe: int, key: str = "fd_digits") -> dict | None:
    ok = [r for r in rows if r["nfe"] == nfe and r.get(key) is not None and math.isfinite(r[key])]
    return min(ok, key=lambda r: r[key], default=None)


def checks(students: list[dict], solvers: list[dict]) -> list[str]:
    """The issue's three checks, one line each (``-`` where a number is missing)."""
    ran = [r for r in solvers if "skipped" not in r and r.get("fd_digits") is not None]
    t20, s4 = best(ran, 20), [r for r in ran if r["nfe"] == 4]
    lines = []
    for k, factor in ((1, 1.5), (2, 1.2)):
        b = best(students, k)
        if b is None or t20 is None:
            lines.append(f"best {k}-step student within {factor}x the teacher at NFE 20: - (not measured)")
            continue
        ratio = b["fd_digits"] / t20["fd_digits"]
        lines.append(
            f"best {k}-step student within {factor}x the teacher at NFE 20: {b['method']} {b['fd_digits']:.4g} / "
            f"{t20['solver']} {t20['fd_digits']:.4g} = {ratio:.2f}x -> {'yes' if ratio <= factor else 'NO'}"
        )
    b2 = best(students, 2)
    if b2 is None or not s4:
        lines.append("best student at 2 NFE below every solver at 4 NFE: - (not measured)")
    else:
        best4 = min(s4, key=lambda r: r["fd_digits"])
        ok = b2["fd_digits"] < best4["fd_digits"]
        lines.append(
            f"best student at 2 NFE below every solver at 4 NFE: {b2['method']} {b2['fd_digits']:.4g} against the "
            f"best at 4, {best4['solver']} {best4['fd_digits']:.4g} -> {'yes' if ok else 'NO'}"
        )
    return lines


def table(rows: list[dict]) -> str:
    out = ["| method | steps | NFE | FD-digits | accuracy | train time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["nfe"])):
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        tt = "-" if r.get("train_seconds") is None else f"{float(r['train_seconds']):.0f}"
        out.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['fd_digits']:.4g} | {acc} | {tt} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("students", nargs="*", help="student folders written by jdiff distill")
    ap.add_argument("--rows", action="append", default=[], help="a CSV of rows measured elsewhere (repeatable)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=_ints, default=[1, 2, 4], help="student step counts (comma list)")
    ap.add_argument("--solver-nfes", type=_ints, default=[2, 3, 4, 6, 10, 20], help="the teacher's NFEs")
    ap.add_argument("--solvers", type=lambda s: s.split(","), default=None, help="registry names (default: all)")
    ap.add_argument(
        "--reference-nfes",
        type=_ints,
        default=[],
        help="more NFEs for --reference-solvers only (e.g. 20: the teacher's quality the students are measured "
        "against, without every solver at every NFE)",
    )
    ap.add_argument(
        "--reference-solvers",
        type=lambda s: s.split(","),
        default=["dpm++2m", "dpm++3m", "unipc2", "unipc3", "deis3-log_rho", "ipndm4"],
        help="registry names run at --reference-nfes",
    )
    args = ap.parse_args(argv)
    if not args.students and not args.rows:
        ap.error("give student folders or --rows")
    os.makedirs(args.out, exist_ok=True)

    clf = digits_classifier()
    _, _, x_held, _ = digits_split()
    ref = clf.stats(x_held)
    labels = (np.arange(args.num) % 10).astype(np.int32)
    metrics = digits_metrics(clf, ref, labels)
    students = []
    for folder in args.students:
        students += student_rows(folder, args.steps, args.num, args.seed, metrics)
    for path in args.rows:
        students += csv_rows(path)
    with open(os.path.join(args.out, "students.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(students)

    den, cfg = pretrained("digits")

    def sweep(names, nfes, sub):
        return nfe_sweep(
            den,
            cfg.data.shape,
            solvers=names,
            nfes=nfes,
            num=args.num,
            metrics=metrics,
            cond=labels,
            seed=args.seed,
            out_dir=os.path.join(args.out, sub),
            settings=dict(model="pretrained:digits", guidance=1.0, metric="fd_digits"),
            label="teacher",
            title=f"shipped digits model: FD-digits ({args.num} samples) against held-out digits",
            headline="fd_digits",
        )

    solvers = sweep(args.solvers or S.names(), args.solver_nfes, "solvers")
    if args.reference_nfes:
        solvers += sweep(args.reference_solvers, args.reference_nfes, "reference")
    points = [dict(label=r["method"], nfe=r["nfe"], fd_digits=r["fd_digits"]) for r in students]
    title = f"digits: solvers (lines) and few-step students (points), FD-digits on {args.num} samples"
    plot_results(solvers, os.path.join(args.out, "fd_vs_nfe.png"), metric=["fd_digits"], title=title, points=points)

    print(f"\n{machine()}, {today()}; {args.num} samples, seed {args.seed}\n")
    print(table(students))
    print()
    for line in checks(students, solvers):
        print(line)
    with open(os.path.join(args.out, "checks.json"), "w") as f:
        json.dump({"checks": checks(students, solvers), "machine": machine(), "date": today()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
