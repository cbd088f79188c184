"""``jdiff presets``: list the presets, show one as JSON, or list the config keys."""

from __future__ import annotations

import json

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
    from jdiff import presets as P

    if args.name:
        return P.apply_overrides(P.get_preset(args.name), args.set or [])
    if args.set:
        from jdiff.cli._common import CLIError

        raise CLIError("--set needs a preset NAME")
    return None


def run(args, cfg) -> int:
    from jdiff import presets as P

    if cfg is not None:
        print(P.describe_keys(cfg) if args.keys else json.dumps(P.config_to_dict(cfg), indent=2))
        return 0
    if args.keys:
        print(P.describe_keys())
        return 0
    for name, fn in P.PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"{name:14s} {doc}")
    return 0
