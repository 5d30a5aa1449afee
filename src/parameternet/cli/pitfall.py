"""`parameternet pitfall`: the low-FLOPs pitfall experiment."""

from __future__ import annotations

import argparse
from pathlib import Path

from parameternet.cli.flags import check_flags


def add_pitfall(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pitfall",
        help="the low-FLOPs pitfall on Fashion-MNIST / MNIST: GhostNet vs ParameterNet, with and without pretraining",
        description="Train the grid (models x {target-only, pretrain -> fine-tune} x seeds), append each finished "
        "run to OUTPUT/results.csv (rows already there are skipped, so the command resumes), and write "
        "OUTPUT/table.md and OUTPUT/pitfall.png.",
    )
    p.add_argument(
        "--preset",
        default="full",
        choices=["full", "round3", "quick", "head256", "smoke", "round3-smoke"],
        help="the grid (default: full, round 2; round3: the pretraining-budget design with new seeds)",
    )
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 for every model (default: the preset's; 3 with --models)")
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="run these cells instead of the preset's grid (no gate), e.g. ghostnet-w0.25-h64 parameternet-w0.25-e8 "
        "(options: -h<head channels>, -e<experts>, -repconv, -softmax, -pre<fraction of the union>, -pe<epochs>, "
        "-rlr<router lr scale>, -rwd<router weight decay>)",
    )
    p.add_argument(
        "--output",
        help="results directory (default: results/pitfall for full, results/pitfall-round3 for round3, "
        "runs/pitfall-PRESET else)",
    )
    p.add_argument("--runs-dir", default="runs/pitfall", help="the individual runs (shared by the presets)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one thread each (default 1)")
    p.add_argument("--report-only", action="store_true", help="only rebuild table.md and pitfall.png from the CSV")
    p.add_argument("--pool-commits", action="store_true", help="pool rows made by different code in the report")
    p.set_defaults(func=_run_pitfall)


def _run_pitfall(args: argparse.Namespace) -> int:
    from parameternet.experiments.pitfall import PRESETS, default_output, report, run_pitfall

    check_flags(("--jobs", args.jobs, 1))
    output = Path(args.output) if args.output else default_output(args.preset)
    if args.report_only:
        print(report(output, preset=args.preset, pool_commits=args.pool_commits))
    else:
        print(run_pitfall(args.preset, output, args.runs_dir, args.seeds, args.models, args.jobs))
    where = f"Table: {output / 'table.md'}; plot: {output / 'pitfall.png'}; every run's row: {output / 'results.csv'}"
    if PRESETS[args.preset].wiring_check:
        where += f" (preset {args.preset}: a wiring check, not results)"
    print(where + ".")
    return 0
