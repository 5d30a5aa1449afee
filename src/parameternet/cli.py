"""`parameternet <command>`: the only place in the package that parses arguments.

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its parser and sets ``func``; the
function it points to imports what it needs lazily so `parameternet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from parameternet.errors import ParameterNetError

# Bad input the CLI reports in one line. FileNotFoundError covers missing paths raised by the standard library.
USER_ERRORS = (ParameterNetError, FileNotFoundError)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="parameters, MACs and latency; with no model, the paper's table")
    p.add_argument("models", nargs="*", help="timm model names (default: the paper's vision rows)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--latency", action="store_true", help="also time the forward pass (median and p90)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --latency")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from parameternet.profile.report import run_profile_command

    return run_profile_command(
        args.models,
        as_json=args.json,
        img_size=args.img_size,
        batch_size=args.batch_size,
        latency=args.latency,
        threads=args.threads,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parameternet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_profile(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"parameternet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parameternet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
