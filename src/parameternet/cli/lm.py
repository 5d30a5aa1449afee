"""`parameternet lm data | train | eval | experiment | finetune-cls`: the LLaMA + mixture-of-experts language
model."""

from __future__ import annotations

import argparse

from parameternet.cli.flags import check_flags, refuse
from parameternet.cli.vision import add_recipe_command, train_command


def add_lm(sub: argparse._SubParsersAction) -> None:
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

    add_recipe_command(
        lsub, "train", _run_lm_train, "configs/lm-small.yaml", "model.num_experts=4 resume=auto",
        help="train a ParameterNet LLaMA (dense or MoE) from a recipe (YAML) with key=value overrides",
        description="Train RECIPE (e.g. configs/lm-small.yaml) with dotted key=value overrides, e.g. "
        "`parameternet lm train configs/lm-small.yaml model.moe_projections=[down_proj] output_dir=runs/x`.",
    )  # fmt: skip

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
        choices=["full", "quick", "gpu", "smoke", "upcycle2", "upcycle2-smoke"],
        help="the grid (default: full; gpu: the main comparison at hidden 512 on one CUDA GPU; upcycle2: upcycling "
        "round 2, five continuations of one dense snapshot)",
    )
    p.add_argument(
        "--recipe", default="configs/lm-small.yaml", help="the base recipe every run starts from (default: %(default)s)"
    )
    p.add_argument(
        "--runs", default="runs/lm-experiment", help="directory of the individual runs (default: %(default)s)"
    )
    p.add_argument(
        "--output",
        "--results",
        dest="output",
        help="default: results/lm (full), results/lm-gpu (gpu), results/lm-upcycle2 (upcycle2), runs/lm-PRESET else",
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

    return train_command(load_lm_config, train_lm, args)


def _run_lm_eval(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.lm_eval import evaluate_saved_lm

    r = evaluate_saved_lm(args.model, args.data, args.items, val_tokens=args.val_tokens, export=args.export_tasks)
    print(json.dumps(r, indent=1))
    return 0


def _run_lm_experiment(args: argparse.Namespace) -> int:
    from parameternet.experiments import lm, lm_estimate, lm_report, lm_upcycle

    output = args.output or lm.default_output(args.preset)
    check_flags(("--jobs", args.jobs, 1))
    upcycle = lm_upcycle.PRESETS.get(args.preset)
    if args.simulate:
        refuse("--simulate", upcycle is None, f"to the upcycling presets ({', '.join(lm_upcycle.PRESETS)})",
                "pass --preset upcycle2")  # fmt: skip
        print(lm_upcycle.simulation(args.recipe, upcycle, args.overrides))
        return 0
    if args.estimate:
        if upcycle is not None:
            print(lm_upcycle.estimate_text(args.recipe, upcycle, args.overrides, jobs=args.jobs))
        else:
            print(lm_estimate.estimate_text(args.recipe, lm.PRESETS[args.preset], args.overrides, jobs=args.jobs))
        return 0
    if args.report_only:
        print(lm_report.report(output, preset=args.preset, pool_commits=args.pool_commits))
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
    p.add_argument(
        "--task", default="brown-genre", choices=("brown-genre", "source"),
        help="brown-genre (informative vs imaginative, default) or source (which corpus)",
    )  # fmt: skip
    p.add_argument("--data", help="prepared text directory (default: the one the run's recipe names)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-len", type=int, default=128, help="tokens per passage at most")
    p.add_argument("--train-per-class", type=int, default=2000, help="training passages per label at most")
    p.add_argument("--test-per-class", type=int, default=500, help="test passages per label at most")
    p.add_argument("--amp", choices=("bf16", "none"), default="bf16", help="bf16 autocast (default) or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--output",
        help="the run directory: checkpoints (a rerun resumes, or returns a finished run's result), summary.json "
        "and the fine-tuned classifier/ (with its tokenizer); default: a temporary directory, removed",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(func=_run_lm_cls)


def _run_lm_cls(args: argparse.Namespace) -> int:
    import json

    from parameternet.train.lm_cls import finetune_classifier

    r = finetune_classifier(
        args.model, args.task, data_dir=args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, max_len=args.max_len, train_per_class=args.train_per_class,
        test_per_class=args.test_per_class, amp=args.amp, seed=args.seed, threads=args.threads, output=args.output,
        device=args.device,
    )  # fmt: skip
    print(json.dumps(r, indent=1))
    return 0
