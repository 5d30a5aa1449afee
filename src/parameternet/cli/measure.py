"""`parameternet profile | export | benchmark`: parameters, MACs and latency; the ONNX export; the benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from parameternet.cli.flags import check_flags, img_size_check, refuse
from parameternet.errors import ParameterNetError


def add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="parameters, MACs and latency: the paper's table (default), named models, or Table 6",
        description="`parameternet profile` (or `profile paper`) checks the paper's parameter and MAC counts; "
        "`profile models NAME...` measures any timm models; `profile table6` compares RepConv and dynamic convs.",
    )
    psub = p.add_subparsers(dest="profile_command", metavar="COMMAND")

    def counts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        q.add_argument("--batch-size", type=int, help="images per forward pass (default 1)")
        q.add_argument("--latency", action="store_true", help="also time the forward pass (median and p90)")
        q.add_argument("--threads", type=int, help="torch threads for --latency (default 1)")

    counts(p)  # bare `profile`: the paper's table
    p.set_defaults(func=_run_profile, models=[], img_size=None)
    q = psub.add_parser("paper", help="the paper's 8 vision rows at 224 px: paper / measured / difference (exit 1 "
                        "when a row is off by more than 0.5%%)")  # fmt: skip
    counts(q)
    q.set_defaults(func=_run_profile, models=[], img_size=None)
    q = psub.add_parser("models", help="parameters, MACs (and latency) of timm models, each on its own input")
    q.add_argument("models", nargs="+", metavar="MODEL", help="timm model names, e.g. parameternet_600m")
    q.add_argument("--img-size", type=int, help="input height and width (default: each model's own)")
    counts(q)
    q.set_defaults(func=_run_profile)
    q = psub.add_parser("table6", help="Table 6: train vs inference params of RepConv and dynamic conv")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--img-size", type=int, default=224, help="input height and width (default 224)")
    q.set_defaults(func=_run_table6)


def _run_profile(args: argparse.Namespace) -> int:
    from parameternet.profiling.report import run_profile_command

    check_flags(img_size_check(args.img_size), ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1))
    refuse(
        "--threads", args.threads is not None and not args.latency, "only with --latency", "add --latency or drop it"
    )
    return run_profile_command(
        args.models,
        as_json=args.json,
        img_size=args.img_size,
        batch_size=args.batch_size or 1,
        latency=args.latency,
        threads=args.threads or 1,
    )


def _run_table6(args: argparse.Namespace) -> int:
    from parameternet.experiments.table6 import run_table6

    check_flags(img_size_check(args.img_size))
    return run_table6(as_json=args.json, img_size=args.img_size)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model's deploy() graph to ONNX (symbolic batch by default) and check it in onnxruntime",
    )
    p.add_argument("model", nargs="?", help="a timm model name, e.g. parameternet_600m (default: the checkpoint's)")
    p.add_argument(
        "--arch", help="the same as MODEL: the timm model name, for a checkpoint that does not record its architecture"
    )
    p.add_argument("--onnx", required=True, metavar="PATH.onnx", help="the ONNX file to write")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, help="a graph for exactly this many images (1: the fastest)")
    batch.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dimension (the default)")
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights to load: a parameternet or timm checkpoint, or a train run directory",
    )
    p.add_argument("--img-size", type=int, help="input height and width (default: the model's)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument(
        "--exporter", default="torchscript", choices=("torchscript", "dynamo"),
        help="torchscript (default, fast) or dynamo (torch.export)",
    )  # fmt: skip
    p.add_argument("--no-deploy", action="store_true", help="export the model as it is, BatchNorms unfolded")
    p.add_argument(
        "--runtime",
        default="any",
        help="any: a portable ONNX graph (default); onnxruntime-cpu: the fastest graph for ONNX Runtime's CPU "
        "provider on this CPU (dynamic convs in its NCHWc kernels; a symbolic batch runs image by image)",
    )
    p.add_argument(
        "--per-image",
        action="store_true",
        help="a symbolic batch run image by image (an ONNX Scan over the one-image graph): standard ONNX, and in ONNX "
        "Runtime on a CPU faster than the batch-agnostic graph",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from parameternet.export.onnx_export import export_onnx
    from parameternet.io import load_source_model
    from parameternet.models import create_model_for_size, fixed_input_size
    from parameternet.toolkit import model_name

    check_flags(img_size_check(args.img_size))
    if args.model and args.arch and args.model != args.arch:
        raise ParameterNetError(
            f"the model is named twice, {args.model!r} and --arch {args.arch!r}; give one name (MODEL or --arch)."
        )
    name = args.model or args.arch
    img_size = args.img_size
    if args.checkpoint:
        model, _, _ = load_source_model(args.checkpoint, arch=name)
        fixed = fixed_input_size(model)
        if fixed is not None and img_size is not None and (img_size, img_size) != fixed:
            raise ParameterNetError(
                f"--img-size {img_size}: this checkpoint's {model_name(model)} was built for {fixed[0]}x{fixed[1]} "
                "images only (its attention masks are for one size); drop --img-size."
            )
        if fixed is not None:
            img_size = fixed
        elif img_size is None and (Path(args.checkpoint).suffix == ".safetensors" or Path(args.checkpoint).is_dir()):
            from parameternet.io import read_metadata

            img_size = read_metadata(args.checkpoint)["img_size"]  # the size the run trained at
    elif name:
        model = create_model_for_size(name, img_size)  # as `parameternet profile` builds it: the same sizes
    else:
        raise ParameterNetError(
            "export needs a model name or --checkpoint FILE; e.g. export parameternet_600m --onnx m.onnx"
        )
    report = export_onnx(
        model,
        args.onnx,
        dynamic_batch=args.batch_size is None,
        batch_size=1 if args.batch_size is None else args.batch_size,  # 0 is refused, not a batch-1 graph
        opset=args.opset,
        deploy=not args.no_deploy,
        img_size=img_size,
        exporter=args.exporter,
        runtime=args.runtime,
        per_image=True if args.per_image else None,
    )
    print(report)
    return 0


def add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="time ParameterNet against GhostNet: onnx (the paper's protocol), modes (every execution mode), gpu",
        description="Three benchmarks, each writing its CSV under --output: `onnx`, the paper's latency protocol; "
        "`modes`, every way a model can be run; `gpu`, training, memory and inference on one CUDA GPU.",
    )
    bsub = p.add_subparsers(dest="benchmark_command", required=True, metavar="COMMAND")

    def timing(q: argparse.ArgumentParser, img_size_help: str) -> None:
        q.add_argument("--img-size", type=int, help=img_size_help)
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
        q.add_argument("--runs", type=int, default=50, help="timed rounds (default 50)")
        q.add_argument("--output", default="results/benchmark", help="where the CSV, JSON and plot go")

    q = bsub.add_parser(
        "onnx",
        help="the paper's latency protocol (ONNX Runtime, batch 1, 1 thread) plus eager PyTorch; CSV and plot",
        description="Export every model's deploy() graph, time it in ONNX Runtime and in eager PyTorch (batch 1, "
        "interleaved rounds, median and p90) and write OUTPUT/benchmark.csv, benchmark.json and latency_top1.png "
        "(top-1 reported by the paper or timm, not measured).",
    )
    q.add_argument("--models", nargs="+", metavar="MODEL", help="timm model names (default: ours and five peers)")
    q.add_argument("--no-eager", action="store_true", help="time ONNX Runtime only")
    timing(q, "input height and width (default 224)")
    q.set_defaults(func=_run_onnx_benchmark)

    q = bsub.add_parser(
        "modes",
        help="a ParameterNet against its static twin in every execution mode (eager, compile, ONNX)",
        description="Time each model in the named execution modes at --batch-sizes and write OUTPUT/modes.csv and "
        "modes.json with the ParameterNet / twin ratio per mode and batch size.",
    )
    q.add_argument(
        "modes",
        nargs="*",
        metavar="MODE",
        help="default: all of eager, compile-static, compile-dynamic, compile-auto, onnx-portable, onnx-per-image, "
        "onnx-ort",
    )
    q.add_argument("--models", nargs="+", metavar="MODEL", help="default: ghostnet_600m parameternet_600m")
    q.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 8")
    timing(q, "input height and width (default: each model's own)")
    q.set_defaults(func=_run_modes)

    q = bsub.add_parser(
        "gpu",
        help="ParameterNet-600M against GhostNet-600M and a LLaMA-MoE against dense, side by side on one CUDA GPU",
        description="Training, peak memory and inference of ParameterNet-600M against GhostNet-600M, and a LLaMA "
        "with 8 experts on down_proj against the dense one, side by side in one process on one CUDA GPU; prints "
        "the ratio table and appends OUTPUT/gpu.csv.",
    )
    q.add_argument("--smoke", action="store_true", help="the same code on a CPU at tiny sizes, in seconds (a test, "
                   "not a measurement; writes OUTPUT/gpu_smoke.csv)")  # fmt: skip
    q.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows (default: all)")
    q.add_argument("--output", default="results/benchmark", help="where gpu.csv goes")
    q.set_defaults(func=_run_gpu)


def _run_gpu(args: argparse.Namespace) -> int:
    from parameternet.benchmark.gpu import format_gpu_table, run_gpu_benchmark, write_gpu_csv
    from parameternet.experiments.provenance import provenance
    from parameternet.runs import make_dir

    make_dir(args.output)

    rows, meta = run_gpu_benchmark(smoke=args.smoke, rows=tuple(args.rows) if args.rows else None)
    path = write_gpu_csv(rows, meta, Path(args.output) / ("gpu_smoke.csv" if args.smoke else "gpu.csv"), provenance())
    print(format_gpu_table(rows, meta))
    print(f"wrote {path}")
    return 0


def _timing_checks(args: argparse.Namespace) -> None:
    """The bounds of the timing flags, then the output directory: refused before minutes of timing."""
    from parameternet.runs import make_dir

    check_flags(
        img_size_check(args.img_size),
        ("--threads", args.threads, 1),
        ("--warmup", args.warmup, 0),
        ("--runs", args.runs, 1),
        ("--batch-sizes", getattr(args, "batch_sizes", None), 1),
    )
    make_dir(args.output)


def _run_modes(args: argparse.Namespace) -> int:
    from parameternet.benchmark.modes import MODES, format_modes, run_modes, write_modes

    _timing_checks(args)

    rows, meta = run_modes(
        args.models or ("ghostnet_600m", "parameternet_600m"),
        modes=args.modes or MODES,
        batch_sizes=args.batch_sizes or [1, 8],
        threads=args.threads,
        rounds=args.runs,
        warmup=args.warmup,
        img_size=args.img_size,
    )
    print(format_modes(rows, meta))
    paths = write_modes(rows, meta, args.output)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_onnx_benchmark(args: argparse.Namespace) -> int:
    _timing_checks(args)
    from parameternet.benchmark.cpu import OURS, PEERS, format_table, run_benchmark, write_outputs

    rows, meta = run_benchmark(
        args.models or OURS + PEERS,
        img_size=args.img_size or 224,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        eager=not args.no_eager,
        progress=True,
    )
    print(format_table(rows, meta))
    paths = write_outputs(rows, meta, args.output)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
