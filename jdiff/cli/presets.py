"""``jdiff presets``: list the presets, show one as JSON, or list the config keys."""

from __future__ import annotations

import json

from jdiff import runs
from jdiff.cli._common import CLIError

HELP = "list presets, show one, or list config keys"


def add_parser(sub, formatter):
    pr = sub.add_parser(
        "presets",
        formatter_class=formatter,
        help=HELP,
        description="Without NAME: list the presets. With NAME: print its resolved config as JSON "
        "(after --set). --keys: every settable key with its type and value.",
    )
    pr.add_argument("name", nargs="?", help="preset to show")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key before showing")
    pr.add_argument("--keys", action="store_true", help="list keys with types and values")
    pr.set_defaults(fn=run, check=resolve)
    return pr


def resolve(args):
    if args.name:
        return runs.apply_overrides(runs.get_preset(args.name), args.set or [])
    if args.set:
        raise CLIError("--set needs a preset NAME")
    return None


def run(args, cfg) -> int:
    if cfg is not None:
        print(runs.describe_keys(cfg) if args.keys else json.dumps(runs.config_to_dict(cfg), indent=2))
        return 0
    if args.keys:
        print(runs.describe_keys())
        return 0
    for name, summary in runs.preset_summaries().items():
        print(f"{name:14s} {summary}")
    return 0
