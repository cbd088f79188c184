"""Write a ``jdiff train`` run as a shipped model folder under ``jdiff/assets/``.

    python scripts/ship_pretrained.py /tmp/models25/digits_dit jdiff/assets/digits_dit \
        --command "jdiff train digits_dit --out /tmp/models25/digits_dit --no-progress" \
        --notes "Trained 2026-12-08 on 2 CPU cores ..."

:func:`jdiff.runs.export_pretrained` writes ``params.npz`` (the EMA weights of the newest
checkpoint), ``config.json``, ``run.json``, the loss history and ``TRAINED.md``; the run's
newest sample grid is copied to ``samples.png``. Checkpoints and intermediate grids stay
behind, so the folder holds only what :func:`jdiff.presets.pretrained` reads and the record.
Measurements (``scripts/check_pretrained_digits.py``) are appended to ``TRAINED.md`` by hand.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

from jdiff.runs import export_pretrained


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a jdiff train run directory")
    ap.add_argument("out_dir", help="the model folder to write (e.g. jdiff/assets/digits_dit)")
    ap.add_argument("--command", default="", help="the command that trained the run")
    ap.add_argument("--notes", default="", help="more lines for TRAINED.md (machine, date, wall time)")
    args = ap.parse_args(argv)
    out = export_pretrained(args.run_dir, args.out_dir, command=args.command, notes=args.notes)
    grids = sorted(glob.glob(os.path.join(args.run_dir, "samples", "*.png")))
    if grids:
        shutil.copyfile(grids[-1], os.path.join(args.out_dir, "samples.png"))
    print(f"wrote {out}" + (f" and samples.png ({os.path.basename(grids[-1])})" if grids else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
