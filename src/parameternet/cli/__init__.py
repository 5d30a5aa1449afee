"""`parameternet <command>`: the only place in the package that parses arguments.

Each command group has its module (:mod:`.vision`: data, train, eval, convert; :mod:`.lm`; :mod:`.pitfall`;
:mod:`.measure`: profile, export, benchmark) whose ``add_<name>(subparsers)`` registers its parser and sets
``func``; the function it points to imports what it needs lazily so `parameternet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from parameternet.cli.lm import add_lm
from parameternet.cli.measure import add_benchmark, add_export, add_profile
from parameternet.cli.pitfall import add_pitfall
from parameternet.cli.vision import add_convert, add_data, add_eval, add_train
from parameternet.errors import ParameterNetError

# Bad input the CLI reports in one line. FileNotFoundError covers missing paths raised by the standard library.
USER_ERRORS = (ParameterNetError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parameternet",
        description="ParameterNet (arXiv 2306.14525): more parameters, same FLOPs. The paper's models, converting a "
        "model, training, profiling, export and the paper's experiments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    add_profile(sub)
    add_convert(sub)
    add_data(sub)
    add_train(sub)
    add_eval(sub)
    add_lm(sub)
    add_pitfall(sub)
    add_export(sub)
    add_benchmark(sub)
    return parser


LM_COMMANDS = ("data", "train", "eval", "finetune-cls", "experiment")
PROFILE_COMMANDS = ("paper", "models", "table6")


def _check_profile_command(parser: argparse.ArgumentParser, rest: list[str]) -> None:
    """A model name where ``profile``'s command goes gets the command that profiles it."""
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        i += 2 if rest[i] in ("--batch-size", "--threads") else 1
    if i < len(rest) and rest[i] not in PROFILE_COMMANDS:
        parser.error(f"argument COMMAND: invalid choice: {rest[i]!r}; profile models with 'parameternet profile "
                     f"models {' '.join(rest[i:])}'")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    old = next((a for a in given if not a.startswith("-")), "")
    if old.startswith("lm-") and old[3:] in LM_COMMANDS:  # a command name of the first version, not a typo
        parser.error(f"argument command: invalid choice: {old!r}; the language-model commands are 'parameternet lm "
                     f"{old[3:]}' now")  # fmt: skip
    if given[:1] == ["profile"]:
        _check_profile_command(parser, given[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from parameternet.runs import RunInterrupted, fs_error

    nested = (getattr(args, f"{name}_command", None) for name in ("lm", "benchmark", "data"))
    command = " ".join(c for c in (args.command, *nested) if c)
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as e:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the command ends after its stop: a later SIGTERM is the same
        print(f"parameternet {command}: {e}; continue with:\n  {_resume_line(argv, command)}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:
        print(f"parameternet {command}: error: {_one_sentence(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a write the library did not route through its atomic writer
        err = fs_error(e.filename or ".", e) if e.filename else None
        if err is None:
            raise
        print(f"parameternet {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"parameternet {command}: interrupted", file=sys.stderr)
        return 130


def _one_sentence(e: BaseException) -> str:
    """The error's own sentence: a DataLoader worker re-raises it with the worker's traceback around it."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _resume_line(argv: list[str] | None, command: str) -> str:
    """The command line that continues an interrupted run: train / lm train with ``resume=auto``, the experiment
    commands (which resume by themselves) as they were."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    if command in ("train", "lm train"):
        args = [a for a in args if not a.startswith("resume=")] + ["resume=auto"]
    return "parameternet " + " ".join(shlex.quote(a) for a in args)
