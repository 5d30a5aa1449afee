"""Table 7 of ParameterNet (arXiv 2306.14525, sec. 5.4) at CPU scale: dense LLaMA against a top-1 mixture of experts
on one FFN projection at the same FLOPs, trained to the corpus, with a learning-rate check, upcycling and the
paper's fine-tuned classifier. ``parameternet lm experiment --preset full|quick|smoke`` (``--preset upcycle2``:
upcycling, round 2, :mod:`parameternet.experiments.lm_upcycle`).

Every language-model run is one ``lm train`` run of the base recipe (``configs/lm-small.yaml``: 4 layers, hidden
256, batch 16 x 128 tokens) with the variant's ``model.moe_projections`` / ``model.num_experts`` / ``seed`` /
``optim.lr``. All runs read the same token windows in the same order (``data.order_seed``), each token at most
once. The grid, in run order:

1. *Learning-rate check* (``kind=lr``): dense and 8 experts on ``down_proj`` at each of ``Preset.lrs`` for
   ``Preset.lr_tokens`` tokens, seed 0. The best learning rate of each on the final validation loss is its
   learning rate for the rest (one shared value when both pick the same); written to ``lr.json``.
2. *Main comparison* (``kind=main``): the preset's share of the training split, each token seen once, for dense and
   8 experts on ``down_proj`` at 3 seeds and the other projections and 4 experts at 1 seed; validation on the full
   validation split every ``Preset.eval_every`` steps; router diagnostics at every evaluation.
3. *Upcycling* (``kind=upcycle``): each dense main run saves its weights at its midpoint; a branch converts them
   with ``from_dense`` (8 experts on ``down_proj``) and trains the second half on the same windows in the same
   order with the dense run's schedule, to be compared with the dense run's own second half (paired by seed).
4. *Fine-tuned classifier* (``kind=cls``): the final dense and ``down_proj``-8 main models of each seed are
   fine-tuned on a text classification task with held-out documents (:mod:`parameternet.train.lm_cls`) with the
   same budget; the accuracy is the Table 7 SST-2 column's stand-in.

Runs go to worker processes with one torch thread each (``jobs`` side by side); the thread count is recorded in
every row. Each finished run appends a row to ``<output>/runs.csv`` at once (with the git commit, a dirty flag
and the package version; a language-model run that reaches the end of its schedule also its loss on the held-out
split, ``heldout_loss``), its validation curve to ``curves.csv`` and its router diagnostics to ``router.csv``
(:mod:`parameternet.experiments.lm_grid`, :mod:`parameternet.experiments.lm_rows`).
Run directories live under ``<runs_dir>/<code id>/``, so a rerun resumes an interrupted run from its last
checkpoint and skips only rows made by the same code; the report never pools rows of different code unless asked.
:func:`report` rebuilds ``table7.md``, ``loss_curves.png`` and ``router.png`` from the CSVs alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.lm_grid import (
    DENSE,
    MOE8,
    Runner,
    Task,
    Variant,
    check_grid,
    check_inputs,
    check_jobs,
    recipe_hash,
)
from parameternet.experiments.lm_rows import (
    COLUMNS,
    fit_change,
    fmt_mean,
    load_report_rows,
    mean_curve,
    read_rows,
    seed_curves,
)
from parameternet.runs import atomic_write

__all__ = [
    "COLUMNS",
    "CRITERIA",
    "PRESETS",
    "Preset",
    "Variant",
    "choose_lrs",
    "estimate_wall_s",
    "measure_tokens_per_s",
    "read_rows",
    "report",
    "run_lm_experiment",
    "verdict",
]

log = logging.getLogger(__name__)

# The pre-stated reading (docs/experiments/table7.md), in nats of final validation loss.
CRITERIA = {
    "min_gap": 0.02,  # reproduced: dense - MoE >= this at the end ...
    "min_se": 2.5,  # ... and > this many standard errors of the difference over seeds ...
    "flat": 0.01,  # ... and the gap not shrinking: its fitted change over the second half >= -flat
}


def _main_grid(three: tuple[int, ...] = (0, 1, 2), one: tuple[int, ...] = (0,)) -> tuple[tuple[str, tuple], ...]:
    others = [f"{p}-{m}" for p in ("gate_proj", "up_proj", "down_proj") for m in (4, 8) if f"{p}-{m}" != MOE8]
    return ((DENSE, three), (MOE8, three), *((v, one) for v in others))


@dataclass(frozen=True)
class Preset:
    """The grid of one ``lm experiment`` preset (see the module docstring for the four kinds of run).

    ``corpus_fraction`` of the training windows are read once by every main run (``main_tokens`` overrides it);
    ``overrides`` apply to every language-model run; ``cls`` holds the arguments of
    :func:`~parameternet.train.lm_cls.finetune_classifier` shared by every fine-tune.
    """

    name: str
    description: str
    lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3)
    lr_tokens: int = 1_048_576
    lr_variants: tuple[str, ...] = (DENSE, MOE8)
    corpus_fraction: float = 1.0
    main_tokens: int | None = None
    main: tuple[tuple[str, tuple[int, ...]], ...] = field(default_factory=_main_grid)
    eval_every: int = 250
    eval_tokens: int | None = None  # validation tokens per evaluation; None = the full validation split
    upcycle_seeds: tuple[int, ...] = (0, 1, 2)
    upcycle_variant: str = MOE8
    cls_variants: tuple[str, ...] = (DENSE, MOE8)
    cls_seeds: tuple[int, ...] = (0, 1, 2)
    cls: dict[str, Any] = field(default_factory=lambda: dict(task="brown-genre", steps=300, batch_size=16, lr=1e-4))
    overrides: tuple[str, ...] = ()
    zero_shot_items: int = 300
    warmup_fraction: float = 0.05  # linear warmup over this share of a run's steps, then cosine to 10%

    @property
    def compare(self) -> str:
        """The MoE variant the verdict compares with dense (and the one upcycled)."""
        return self.upcycle_variant


PRESETS = {
    # Sized from a measured 1-thread throughput (docs/experiments/table7.md, "Wall time"): the whole training split
    # (7.14M tokens) for every main run would take far more than ~3 hours of two cores, so the full preset trains on
    # half of it, each token once.
    "full": Preset(
        "full",
        "lr check (1e-3/2e-3/4e-3, 1M tokens); half the training split once: dense and MoE-8 down at 3 seeds, "
        "gate/up/down at 4 and 8 experts at 1 seed; upcycling at the midpoint, 3 seeds; brown-genre classifier",
        corpus_fraction=0.5,
    ),
    "quick": Preset(
        "quick",
        "lr check on 262k tokens; dense vs MoE-8 down on 1M tokens, one seed; upcycling and classifier, one seed",
        lrs=(1e-3, 2e-3),
        lr_tokens=262_144,
        main_tokens=1_048_576,
        main=((DENSE, (0,)), (MOE8, (0,))),
        eval_every=128,
        upcycle_seeds=(0,),
        cls_seeds=(0,),
        cls=dict(task="brown-genre", steps=100, batch_size=16, lr=1e-4),
        zero_shot_items=100,
    ),
    # A wiring check for tests and CI: tiny model, a few steps of everything; checks the command, not the science.
    "smoke": Preset(
        "smoke",
        "tiny model, a few steps of each kind of run: checks the command, not the science",
        lrs=(1e-3, 3e-3),
        lr_tokens=4 * 4 * 32,
        lr_variants=(DENSE, "down_proj-4"),
        main_tokens=8 * 4 * 32,
        main=((DENSE, (0, 1)), ("down_proj-4", (0, 1)), ("up_proj-2", (0,))),
        eval_every=3,
        eval_tokens=4096,  # the validation split (20% of the corpora) would take most of the smoke run's time
        upcycle_seeds=(0, 1),
        upcycle_variant="down_proj-4",
        cls_variants=(DENSE, "down_proj-4"),
        cls_seeds=(0,),
        cls=dict(task="source", steps=3, batch_size=4, lr=1e-4, max_len=32, train_per_class=20, test_per_class=10),
        overrides=(
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "model.num_hidden_layers=2",
            "data.vocab_size=300",
            "data.val_fraction=0.2",
            "data.eval_fraction=0.2",
            "data.seq_len=32",
            "batch_size=4",
            "log_every=1",
            "eval_batch_size=8",
            "ckpt_every_steps=2",
        ),  # fmt: skip
        zero_shot_items=8,
    ),
}


# ----- choosing the learning rate -----


def choose_lrs(rows: Sequence[dict[str, Any]], variants: Sequence[str] = (DENSE, MOE8)) -> dict[str, Any]:
    """The learning rate of each variant with the lowest final validation loss among ``kind=lr`` rows.

    Returns ``{"dense": lr, "moe": lr, "shared": bool, "val": {variant: {lr: loss}}}``; "moe" is the second
    variant's choice and applies to every model with experts. Raises when a variant has no row.
    """
    val: dict[str, dict[str, float]] = {}
    best = {}
    for v in variants:
        got = {float(r["lr"]): float(r["val_loss"]) for r in rows if r["kind"] == "lr" and r["variant"] == v}
        if not got:
            raise ParameterNetError(f"the learning-rate check has no row for {v!r}; run it before the main runs")
        val[v] = {f"{lr:g}": loss for lr, loss in sorted(got.items())}
        best[v] = min(got, key=lambda lr: (got[lr], lr))
    dense, moe = best[variants[0]], best[variants[1]]
    return {"dense": dense, "moe": moe, "shared": dense == moe, "val": val, "variants": list(variants)}


# ----- the pre-stated verdict -----


def verdict(
    dense_final: Sequence[float],
    moe_final: Sequence[float],
    gap_curve: Sequence[tuple[int, float]],
    total_steps: int,
    start_step: int = 0,
    paired: bool = False,
) -> dict[str, Any]:
    """The pre-stated reading (:data:`CRITERIA`) of MoE against dense.

    ``dense_final`` / ``moe_final``: final validation losses, one per seed (paired by position when ``paired``).
    ``gap_curve``: ``(step, mean dense loss - mean MoE loss)`` at the evaluations (positive = MoE better).
    The *second half* is the evaluations at or after ``start_step + (total_steps - start_step) / 2``.

    - **reproduced**: the mean gap at the end is >= ``min_gap`` nats and > ``min_se`` standard errors of the
      difference over seeds (Welch's, or of the per-seed differences when ``paired``), and the gap is not
      shrinking: its least-squares change over the second half is >= ``-flat``;
    - **refuted**: MoE >= dense at the end (gap <= 0) and the gap flat or growing in dense's favour: its fitted
      change over the second half is <= ``+flat``;
    - **not resolved** otherwise, or with fewer than two seeds on either side.

    Returns ``{"verdict", "gap", "se", "ci95", "change", "n", "reason"}``.
    """
    from parameternet.experiments.stats import summary, welch

    k = CRITERIA
    out: dict[str, Any] = {"n": (len(dense_final), len(moe_final))}
    if len(dense_final) < 2 or len(moe_final) < 2 or (paired and len(dense_final) != len(moe_final)):
        return {**out, "verdict": "not resolved", "reason": "fewer than two seeds on a side"}
    if paired:
        s = summary([d - m for d, m in zip(dense_final, moe_final)])
        gap, se, ci95 = s.mean, s.se, (s.low, s.high)
    else:
        w = welch(dense_final, moe_final)
        gap, se, ci95 = w.diff, w.se, w.ci95
    half = start_step + (total_steps - start_step) / 2
    second = [(s, g) for s, g in gap_curve if s >= half]
    change = fit_change(second, total_steps - half)
    out.update(gap=gap, se=se, ci95=ci95, change=change, second_half_points=len(second))
    not_shrinking = math.isfinite(change) and change >= -k["flat"]
    if gap >= k["min_gap"] and gap > k["min_se"] * se and not_shrinking:
        return {**out, "verdict": "reproduced", "reason": "MoE lower by the margin, and the gap is not shrinking"}
    if gap <= 0 and math.isfinite(change) and change <= k["flat"]:
        return {**out, "verdict": "refuted", "reason": "MoE >= dense at the end, gap flat or growing for dense"}
    out["seeds_needed"] = _seeds_needed(dense_final, moe_final, paired)
    return {**out, "verdict": "not resolved", "reason": "neither criterion holds"}


def _seeds_needed(dense: Sequence[float], moe: Sequence[float], paired: bool) -> int | None:
    """Seeds per model for 80% power to see a ``min_gap`` gap beyond ``min_se`` standard errors (one-sided alpha
    = 1 - Phi(min_se)), with the spreads seen; None when a spread is unknown."""
    from scipy.stats import norm

    from parameternet.experiments.stats import seeds_for_power, summary

    alpha = float(norm.sf(CRITERIA["min_se"]))
    if paired:
        sd = summary([d - m for d, m in zip(dense, moe)]).sd
        n = seeds_for_power([sd / 2**0.5, sd / 2**0.5], CRITERIA["min_gap"], alpha)
    else:
        n = seeds_for_power([summary(dense).sd, summary(moe).sd], CRITERIA["min_gap"], alpha)
    return n


# ----- the runner -----


class _Runner(Runner):
    """The Table 7 grid: the learning-rate check, then the main runs, upcycled branches and classifiers."""

    # --- the grid
    def lr_tasks(self) -> list[Task]:
        p = self.preset
        _, per_step = self.train_windows()
        common = [
            f"max_tokens={p.lr_tokens}", f"schedule.warmup_steps={self.warmup(p.lr_tokens // per_step)}",
            self.eval_tokens, "eval_every_steps=0", "zero_shot_items=0",
        ]  # fmt: skip
        return [self.task("lr", v, 0, lr, common) for v in p.lr_variants for lr in p.lrs]

    def main_tasks(self, lrs: dict[str, Any]) -> tuple[list[Task], int]:
        p = self.preset
        split, per_step = self.train_windows()
        tokens = p.main_tokens or int(split * p.corpus_fraction) // per_step * per_step
        steps = tokens // per_step
        mid = steps // 2
        common = [
            f"max_tokens={tokens}", f"eval_every_steps={p.eval_every}", self.eval_tokens,
            f"schedule.warmup_steps={self.warmup(steps)}",
        ]  # fmt: skip
        tasks, dense_by_seed = [], {}
        for variant, seeds in p.main:
            lr = lrs["dense"] if variant == DENSE else lrs["moe"]
            for seed in seeds:
                opts = {"snapshot_step": mid} if variant == DENSE and seed in p.upcycle_seeds else {}
                t = self.task("main", variant, seed, lr, common, **opts)
                tasks.append(t)
                if variant == DENSE:
                    dense_by_seed[seed] = t
        for seed in p.upcycle_seeds:
            dense = dense_by_seed.get(seed)
            if dense is None:
                raise ParameterNetError(f"preset {p.name!r} upcycles seed {seed} but has no dense main run of it")
            up = self.task(
                "upcycle", p.upcycle_variant, seed, lrs["dense"], common,
                branch_from=str(dense.run_dir / "snapshot"), start_step=mid,
            )  # fmt: skip
            up.after = [dense]
            tasks.append(up)
        by = {(t.variant, t.seed): t for t in tasks if t.kind == "main"}
        for variant in p.cls_variants:
            for seed in p.cls_seeds:
                src = by.get((variant, seed))
                if src is None:
                    raise ParameterNetError(
                        f"preset {p.name!r} fine-tunes {variant} seed {seed}, which has no main run"
                    )
                kwargs = {**p.cls, "seed": seed}
                recipe = recipe_hash([src.recipe, kwargs])
                t = Task("cls", variant, seed, kwargs.get("lr"), [], self.runs_dir / "cls" / f"{variant}-s{seed}" /
                          recipe, recipe, {"kwargs": kwargs}, after=[src])  # fmt: skip
                tasks.append(t)
        return tasks, steps


# ----- wall-time estimate -----


def measure_tokens_per_s(recipe: str = "configs/lm-small.yaml", overrides: Sequence[str] = (), steps: int = 6):
    """Training tokens per second of one torch thread for dense and 8 experts on ``down_proj`` (``dense``,
    ``moe``: the recipe's size, batch, sequence length and ``amp``), timed over ``steps`` steps after two warm-up
    steps, and evaluation tokens per second (``dense_eval``, ``moe_eval``: forward passes of ``eval_batch_size``
    windows in float32 without gradients, as validation runs); the median step, random tokens."""
    import torch

    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
    from parameternet.train.lm import load_lm_config

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, variant in (("dense", Variant(None)), ("moe", Variant("down_proj", 8))):
            cfg = load_lm_config(recipe, [*overrides, *variant.overrides()])
            m, d = cfg.model, cfg.data
            config = ParameterNetLlamaConfig(
                vocab_size=d.vocab_size, max_position_embeddings=d.seq_len, **dataclasses.asdict(m)
            )
            torch.manual_seed(0)
            model = ParameterNetLlamaForCausalLM(config).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(3, d.vocab_size, (cfg.batch_size, d.seq_len))
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.float().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            times.sort()
            out[name] = cfg.batch_size * d.seq_len / times[len(times) // 2]
            model.eval()
            ids = torch.randint(3, d.vocab_size, (cfg.eval_batch_size, d.seq_len))
            times = []
            with torch.no_grad():
                for i in range(steps + 2):
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
            times.sort()
            out[f"{name}_eval"] = cfg.eval_batch_size * d.seq_len / times[len(times) // 2]
    finally:
        torch.set_num_threads(prev)
    return out


def estimate_wall_s(
    preset: Preset, tokens_per_s: dict[str, float], train_tokens: int, val_tokens: int, per_step: int, jobs: int = 2
) -> dict[str, float]:
    """Wall seconds of ``preset`` with ``jobs`` one-thread runs side by side at ``tokens_per_s`` (``dense``,
    ``moe``): training tokens at that speed, evaluations (forward only) at three times it, classifier steps at it.
    Returns the total and the part of each kind; a lower bound when runs cannot pair up at the end."""
    p = preset
    val_tokens = min(val_tokens, p.eval_tokens) if p.eval_tokens else val_tokens
    tokens = p.main_tokens or int(train_tokens * p.corpus_fraction) // per_step * per_step
    steps = tokens // per_step
    evals = steps // p.eval_every + 1
    parts = {"lr": 0.0, "main": 0.0, "upcycle": 0.0, "cls": 0.0}
    for v in p.lr_variants:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["lr"] += len(p.lrs) * (p.lr_tokens + val_tokens / 3) / speed
    for v, seeds in p.main:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["main"] += len(seeds) * (tokens + evals * val_tokens / 3) / speed
    parts["upcycle"] = len(p.upcycle_seeds) * (tokens / 2 + (evals / 2 + 1) * val_tokens / 3) / tokens_per_s["moe"]
    cls_tokens = p.cls.get("steps", 300) * p.cls.get("batch_size", 16) * p.cls.get("max_len", 128)
    for v in p.cls_variants:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["cls"] += len(p.cls_seeds) * cls_tokens / speed
    total = sum(parts.values()) / jobs
    return {"total": total, **{k: x / jobs for k, x in parts.items()}, "main_tokens": tokens}


def estimate_text(recipe: str, preset: Preset, overrides: Sequence[str] = (), jobs: int = 2) -> str:
    """Measure 1-thread tokens/s here and estimate the preset's wall time with ``jobs`` one-thread runs side by side,
    at its corpus share and at the whole. Raises ParameterNetError for ``jobs`` below 1 or a bad override (as
    :func:`run_lm_experiment` does)."""
    from parameternet.data.text import prepare_text_data

    check_jobs(jobs)
    cfg = check_inputs(preset, recipe, overrides)
    d = cfg.data
    data = prepare_text_data(
        d.dir, corpora=d.corpora, vocab_size=d.vocab_size, val_fraction=d.val_fraction, eval_fraction=d.eval_fraction
    )
    train, val = int(data.manifest["tokens"]["train"]), int(data.manifest["tokens"]["val"])
    speed = measure_tokens_per_s(recipe, [*preset.overrides, *overrides])
    per_step = cfg.batch_size * d.seq_len
    lines = [
        f"measured training throughput, one torch thread: dense {speed['dense']:.0f} tokens/s, "
        f"MoE-8 down {speed['moe']:.0f} tokens/s (recipe {recipe}, batch {cfg.batch_size} x {d.seq_len})"
    ]
    variants = [(preset, preset.main_tokens is None and preset.corpus_fraction)]
    if preset.main_tokens is None and preset.corpus_fraction != 1.0:
        variants.append((dataclasses.replace(preset, corpus_fraction=1.0), 1.0))
    cores = (
        "1 core (one one-thread run at a time)" if jobs == 1 else f"{jobs} cores ({jobs} one-thread runs side by side)"
    )
    for p, fraction in variants:
        est = estimate_wall_s(p, speed, train, val, per_step, jobs)
        share = f"{fraction:g} of the training split" if fraction else "fixed token budget"
        lines.append(
            f"preset {preset.name} with {share} ({est['main_tokens']:,} tokens per main run): about "
            f"{est['total'] / 3600:.1f} h on {cores}: lr check "
            f"{est['lr'] / 3600:.1f} h, main {est['main'] / 3600:.1f} h, upcycling {est['upcycle'] / 3600:.1f} h, "
            f"classifier {est['cls'] / 3600:.1f} h"
        )
    return "\n".join(lines)


# ----- the command -----


COMMITTED_OUTPUTS = {"full": "results/lm", "upcycle2": "results/lm-upcycle2"}


def default_output(preset: str) -> Path:
    """``results/lm`` for the full preset and ``results/lm-upcycle2`` for upcycle2 (committed), ``runs/lm-<preset>``
    for the others."""
    return Path(COMMITTED_OUTPUTS.get(preset, f"runs/lm-{preset}"))


def preset_names() -> list[str]:
    """Every preset of ``lm experiment``: Table 7's (:data:`PRESETS`) and upcycling round 2's."""
    from parameternet.experiments.lm_upcycle import PRESETS as UPCYCLE

    return [*PRESETS, *UPCYCLE]


def run_lm_experiment(
    preset: str = "full",
    recipe: str = "configs/lm-small.yaml",
    overrides: Sequence[str] = (),
    runs_dir: str | Path = "runs/lm-experiment",
    output: str | Path | None = None,
    jobs: int = 1,
) -> str:
    """Run the learning-rate check, then the main runs, upcycling and classifiers of ``preset`` (skipping rows this
    code already made), and write and return the report. Raises :class:`ParameterNetError` on bad input (an unknown
    preset, ``jobs`` below 1, a bad override or one of :data:`GRID_KEYS`: all checked before anything starts or the
    output directory is made) or on failed runs. An upcycling-round-2 preset runs
    :func:`~parameternet.experiments.lm_upcycle.run_upcycle`."""
    from parameternet.experiments import lm_upcycle

    if preset in lm_upcycle.PRESETS:
        return lm_upcycle.run_upcycle(preset, recipe, overrides, runs_dir, output, jobs)
    if preset not in PRESETS:
        raise ParameterNetError(f"preset {preset!r} is unknown; use one of {', '.join(preset_names())}")
    check_jobs(jobs)
    from parameternet.runs import RunLock

    p = PRESETS[preset]
    base = check_inputs(p, recipe, overrides)
    base.data.prepare()  # bad input stops here, before the output directory exists
    output = Path(output) if output is not None else default_output(preset)
    with RunLock(output, "experiment results"):  # one writer of the CSVs; each run also locks its own directory
        check_grid(output, p.name, base)
        runner = _Runner(p, str(recipe), overrides, output, Path(runs_dir), jobs)
        lr_tasks = runner.lr_tasks()
        runner.execute(lr_tasks)
        lrs = choose_lrs([t.result["row"] for t in lr_tasks], p.lr_variants)
        record = {**lrs, "preset": p.name, "rule": "lowest final validation loss of each; shared when both agree"}
        atomic_write(output / "lr.json", json.dumps({**record, **runner.prov}, indent=1) + "\n")
        shared = " (shared)" if lrs["shared"] else ""
        log.info("learning rates: dense %g, MoE %g%s", lrs["dense"], lrs["moe"], shared)
        tasks, _ = runner.main_tasks(lrs)
        runner.execute(tasks)
        return report(output, preset=p.name)


# ----- the report -----


def _variant_order(name: str) -> tuple:
    v = Variant.parse(name)
    return (v.projection is not None, ("gate_proj", "up_proj", "down_proj", None).index(v.projection), v.num_experts)


def crossing(gap: Sequence[tuple[int, float]]) -> float | None:
    """The step where ``gap`` (dense - MoE) last turns from negative to >= 0, linearly interpolated; None if it
    never ends positive after being negative."""
    out = None
    for (s0, g0), (s1, g1) in zip(gap, gap[1:]):
        if g0 < 0 <= g1:
            out = s0 + (s1 - s0) * (-g0) / (g1 - g0) if g1 != g0 else s1
        elif g0 >= 0 > g1:
            out = None
    return out


def crossing_text(gap: Sequence[tuple[int, float]], tokens_per_step: int) -> str:
    """The crossing point of ``gap`` (dense - MoE per step) in words: where the MoE goes below dense for good, in
    training tokens, or why there is none (below at every evaluation, or not below at the end)."""
    cross = crossing(gap)
    if cross is not None:
        return f"{cross * tokens_per_step:,.0f} tokens"
    if gap and all(g > 0 for _, g in gap):
        return f"none, the MoE is below dense at every evaluation (the first at {gap[0][0] * tokens_per_step:,} tokens)"
    return "none, the MoE is not below dense at the end"


def gap_text(gap: Sequence[tuple[int, float]], tokens_per_step: int) -> str:
    """``gap`` (dense - MoE per step) as ``tokens: nats`` pairs, for the report."""
    return "; ".join(f"{s * tokens_per_step:,} tokens {g:+.3f}" for s, g in gap) or "no shared evaluation"


def router_summary(
    router: Sequence[dict[str, Any]], collapsed: float = 0.9, kinds: Sequence[str] = ("main", "upcycle")
) -> list[str]:
    """One line per MoE variant of the runs of ``kinds`` (main and upcycled runs) in ``router`` rows: over its
    seeds and layers, the range of the mean top-1 router probability and of the largest and smallest expert shares
    at the first and the last evaluation; then every layer whose largest share at the last evaluation is above
    ``collapsed``."""
    lines, dead = [], []
    for kind, name in sorted({(r["kind"], r["variant"]) for r in router if r["kind"] in kinds},
                             key=lambda g: (list(kinds).index(g[0]), _variant_order(g[1]))):  # fmt: skip
        rs = [r for r in router if r["kind"] == kind and r["variant"] == name]
        first, last = min(r["step"] for r in rs), max(r["step"] for r in rs)

        def span(key: str, step: int, rs: list[dict[str, Any]] = rs) -> str:
            xs = [r[key] for r in rs if r["step"] == step]
            return f"{min(xs):.2f}-{max(xs):.2f}"

        seeds, layers = len({r["seed"] for r in rs}), len({r["layer"] for r in rs})
        at = {s: f"{rs[0]['tokens'] * s // max(1, rs[0]['step']):,}" for s in (first, last)}
        label = name if kind == "main" else f"{name} upcycled" if kind == "upcycle" else f"{name} {kind}"
        lines.append(
            f"Routers of {label} ({seeds} seed{'s' if seeds > 1 else ''} x {layers} layers; balanced share "
            f"{1 / Variant.parse(name).num_experts:.3f}): mean top-1 probability {span('top1_prob', first)} at "
            f"{at[first]} tokens, {span('top1_prob', last)} at {at[last]}; largest expert share "
            f"{span('max_share', first)} -> {span('max_share', last)}; smallest {span('min_share', first)} -> "
            f"{span('min_share', last)}."
        )
        dead += [f"{label} seed {r['seed']} layer {r['layer']} ({r['max_share']:.2f})" for r in rs
                 if r["step"] == last and r["max_share"] > collapsed]  # fmt: skip
    lines.append(
        f"Layers where one expert takes more than {collapsed:.0%} of the tokens at the last evaluation: "
        f"{', '.join(dead) or 'none'}."
    )
    return lines


def _table(rows: list[dict[str, Any]]) -> str:
    main = [r for r in rows if r["kind"] == "main"]
    cls = [r for r in rows if r["kind"] == "cls"]
    task = next((r["cls_task"] for r in cls), None)
    lines = [
        "| Model | #Expert | Parameters | Seeds | Train loss | Val loss | Val ppl | Held-out loss "
        f"| Next sentence (acc_norm) | Last word (acc) | Fine-tuned {task or 'classifier'} (acc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted({r["variant"] for r in main}, key=_variant_order):
        rs = [r for r in main if r["variant"] == name]
        v = Variant.parse(name)
        ppl = [r["val_ppl"] for r in rs if r["val_ppl"] is not None]
        acc = [r["cls_acc"] for r in cls if r["variant"] == name]
        held = [r.get("heldout_loss") for r in rs if r.get("heldout_loss") is not None]
        lines.append(
            "| " + " | ".join([
                v.label, str(v.num_experts) if v.projection else "-", f"{rs[0]['params'] / 1e6:.2f}M", str(len(rs)),
                fmt_mean([r["train_loss"] for r in rs]), fmt_mean([r["val_loss"] for r in rs]),
                f"{sum(ppl) / len(ppl):.1f}" if ppl else "-", fmt_mean(held) if held else "not measured",
                fmt_mean([r["next_sentence_acc"] for r in rs]),
                fmt_mean([r["last_word_acc"] for r in rs]), fmt_mean(acc) if acc else "-",
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def _verdict_lines(title: str, v: dict[str, Any]) -> list[str]:
    lines = [f"**{title}: {v['verdict']}** ({v['reason']})."]
    if "gap" in v:
        lines.append(
            f"Gap dense - MoE at the end: {v['gap']:+.4f} ± {v['se']:.4f} nats (s.e., seeds {v['n'][0]} and "
            f"{v['n'][1]}), 95% CI [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]; fitted change of the gap over the "
            f"second half: {v['change']:+.4f} nats ({v['second_half_points']} evaluations)."
        )
    if v.get("seeds_needed"):
        lines.append(
            f"About {v['seeds_needed']} seeds per model would give 80% power to see a {CRITERIA['min_gap']}-nat gap "
            f"beyond {CRITERIA['min_se']} standard errors with the spreads seen."
        )
    return lines


def report(output: str | Path, preset: str | None = "full", pool_commits: bool = False) -> str:
    """Write ``table7.md``, ``loss_curves.png`` and ``router.png`` from the CSVs in ``output``; return the text.

    Rows made by different code are not pooled: the report uses the code version with the most rows of the
    preset and says how many it left out, unless ``pool_commits``. Raises ParameterNetError when ``output`` or its
    ``runs.csv`` does not exist, or when it holds no row of ``preset`` (naming the presets it holds). An
    upcycling-round-2 preset's report is :func:`~parameternet.experiments.lm_upcycle.report`'s.
    """
    from parameternet.experiments import lm_upcycle

    if preset in lm_upcycle.PRESETS:
        return lm_upcycle.report(output, preset, pool_commits)
    output = Path(output)
    got = load_report_rows(output, preset, pool_commits)
    rows, curves, router, note = got.rows, got.curves, got.router, got.note
    threads = sorted({r["threads"] for r in rows if r["threads"] is not None})
    main = [r for r in rows if r["kind"] == "main"]
    parts = []
    if main:
        tokens = main[0]["tokens"]
        p = PRESETS.get(rows[0]["preset"])
        share = ""
        if p and not p.main_tokens:
            share = f" ({p.corpus_fraction:g} of the training split, each token once"
            if p.corpus_fraction < 1:
                share += "; the whole split does not fit about 3 hours of two CPU cores"
            share += ")"
        parts += [
            f"Dense LLaMA vs top-1 MoE on one FFN projection, {tokens:,} training tokens per run{share}, the same "
            "windows in the same order for every run. Mean ± standard error over seeds (number of seeds).",
            "",
            _table(rows),
            "",
        ]
    lr_path = output / "lr.json"
    if lr_path.is_file():
        lr = json.loads(lr_path.read_text())
        head = "| learning rate | " + " | ".join(lr["variants"]) + " |"
        lrs = sorted({k for v in lr["val"].values() for k in v}, key=float)
        body = [
            f"| {k} | " + " | ".join(f"{lr['val'][v].get(k, math.nan):.4f}" for v in lr["variants"]) + " |" for k in lrs
        ]
        parts += [
            "Learning-rate check (final validation loss, seed 0): chosen dense "
            f"{lr['dense']:g}, MoE {lr['moe']:g}{' (shared: both agree)' if lr['shared'] else ''}.",
            "",
            head,
            "|---|" + "---|" * len(lr["variants"]),
            *body,
            "",
        ]
    preset_obj = PRESETS.get(rows[0]["preset"])
    compare = preset_obj.compare if preset_obj else MOE8
    if main:
        dense = [r for r in main if r["variant"] == DENSE]
        moe = [r for r in main if r["variant"] == compare]
        moe_name = compare
        if dense and moe:
            gap = _gap(curves, "main", DENSE, "main", moe_name)
            v = verdict([r["val_loss"] for r in dense], [r["val_loss"] for r in moe], gap, dense[0]["steps"])
            parts += _verdict_lines(f"Verdict, dense vs {moe_name} (criteria stated before the runs)", v)
            per_step = dense[0]["tokens"] // dense[0]["steps"]
            parts += [
                "Crossing point (MoE's mean validation loss goes below dense's for good): "
                f"{crossing_text(gap, per_step)}.",
                f"Gap at each evaluation: {gap_text(gap, per_step)}.",
                "",
            ]
    up = [r for r in rows if r["kind"] == "upcycle"]
    if up:
        dense = {r["seed"]: r for r in main if r["variant"] == DENSE}
        pairs = [(dense[r["seed"]], r) for r in sorted(up, key=lambda r: r["seed"]) if r["seed"] in dense]
        lines = [
            f"Upcycling: each dense run branched at its midpoint (step {up[0]['start_step']}) into {up[0]['variant']}"
            " with `from_dense`, trained on the second half (same windows, same order, the dense run's schedule, "
            "fresh optimizer state) against the dense run's own second half.",
            "",
            "| seed | dense at midpoint | dense at end | upcycled at end | dense - upcycled |",
            "|---|---|---|---|---|",
        ]
        for d, u in pairs:
            lines.append(
                f"| {u['seed']} | {d['mid_val_loss']} | {d['val_loss']:.4f} | {u['val_loss']:.4f} | "
                f"{d['val_loss'] - u['val_loss']:+.4f} |"
            )
        gap = _gap(curves, "main", DENSE, "upcycle", up[0]["variant"])
        v = verdict(
            [d["val_loss"] for d, _ in pairs], [u["val_loss"] for _, u in pairs], gap, up[0]["steps"],
            start_step=up[0]["start_step"], paired=True,
        )  # fmt: skip
        per_step = up[0]["tokens"] // max(1, up[0]["steps"] - up[0]["start_step"])
        parts += [
            *lines, "", *_verdict_lines("Verdict, upcycled vs dense (paired by seed)", v),
            f"Gap dense - upcycled at each evaluation: {gap_text(gap, per_step)}.", "",
        ]  # fmt: skip
    if router:
        parts += [*router_summary(router), ""]
    cls = [r for r in rows if r["kind"] == "cls"]
    if cls:
        from parameternet.train.lm_cls import CLS_TASKS

        task = cls[0]["cls_task"]
        parts.append(
            f"Fine-tuned classifier ({task}: {' / '.join(CLS_TASKS.get(task, ()))}; {cls[0]['cls_items']} balanced "
            f"held-out passages, chance {1 / max(1, len(CLS_TASKS.get(task, (1,)))):.2f}): "
            + "; ".join(
                f"{name} {fmt_mean([r['cls_acc'] for r in cls if r['variant'] == name])}"
                for name in sorted({r["variant"] for r in cls}, key=_variant_order)
            )
            + f", after {cls[0]['steps']} steps each (the same budget)."
        )
        parts.append("")
    wall = sum(r["wall_s"] or 0 for r in rows)
    kinds = dict.fromkeys(r["kind"] for r in rows)
    by_kind = ", ".join(f"{k} {sum(r['wall_s'] or 0 for r in rows if r['kind'] == k) / 3600:.1f} h" for k in kinds)
    parts.append(
        f"Compute: {wall / 3600:.1f} h of run time over {len(rows)} runs ({by_kind}), torch threads per run: "
        f"{', '.join(str(t) for t in threads) or '-'}. Zero-shot tasks near chance (0.25) are reported, not used as a "
        f"criterion. {note}"
    )
    text = "\n".join(parts) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    _plot_curves(curves, rows, output / "loss_curves.png", compare)
    if router:
        _plot_router(router, output / "router.png")
    atomic_write(output / "table7.md", text)
    return text


def _gap(curves, kind_a: str, a: str, kind_b: str, b: str) -> list[tuple[int, float]]:
    ma, mb = mean_curve(seed_curves(curves, kind_a, a)), mean_curve(seed_curves(curves, kind_b, b))
    db = dict(mb)
    return [(s, x - db[s]) for s, x in ma if s in db]


def _plot_curves(curves: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path, compare: str = MOE8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"dense": "black", "gate_proj": "tab:blue", "up_proj": "tab:orange", "down_proj": "tab:green"}
    per_step = {}
    for r in rows:
        if r["kind"] in ("main", "upcycle") and r["steps"]:
            per_step[r["kind"]] = r["tokens"] // max(1, r["steps"] - (r["start_step"] or 0))
    tok = per_step.get("main") or per_step.get("upcycle") or 1
    for kind in ("main", "upcycle"):
        for name in sorted({r["variant"] for r in curves if r["kind"] == kind}, key=_variant_order):
            v = Variant.parse(name)
            mean = mean_curve(seed_curves(curves, kind, name))
            n = len(seed_curves(curves, kind, name))
            style = dict(
                color=colors[v.projection or "dense"],
                linestyle=":" if kind == "upcycle" else ("-" if v.num_experts in (0, 8) else "--"),
                marker="o" if kind == "main" else "s", markersize=3,
                label=f"{name}{' upcycled' if kind == 'upcycle' else ''} ({n} seed{'s' if n > 1 else ''})",
            )  # fmt: skip
            ax.plot([s * tok for s, _ in mean], [x for _, x in mean], **style)
    gap = _gap(curves, "main", DENSE, "main", compare)
    if gap:
        gx.plot(
            [s * tok for s, _ in gap], [g for _, g in gap], color="tab:green", marker="o", label=f"dense - {compare}"
        )
        cross = crossing(gap)
        if cross is not None:
            for axis in (ax, gx):
                axis.axvline(cross * tok, color="red", linewidth=0.8, linestyle="--")
            gx.annotate(f"crossing\n{cross * tok:,.0f} tokens", (cross * tok, 0), fontsize=8, color="red")
    up = _gap(curves, "main", DENSE, "upcycle", compare)
    if up:
        gx.plot([s * tok for s, _ in up], [g for _, g in up], color="tab:purple", marker="s",
                label=f"dense - {compare} upcycled")  # fmt: skip
    gx.axhline(0, color="black", linewidth=0.8)
    gx.axhline(CRITERIA["min_gap"], color="gray", linewidth=0.8, linestyle="--", label="+0.02 nats (criterion)")
    ax.set(xlabel="training tokens", ylabel="validation loss (full split, nats)", title="validation loss (seed mean)")
    gx.set(xlabel="training tokens", ylabel="dense - MoE (nats; > 0: MoE better)", title="gap")
    ax.legend(fontsize=7)
    gx.legend(fontsize=7)
    ax.grid(alpha=0.3)
    gx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_router(router: list[dict[str, Any]], path: Path) -> None:
    """Per MoE variant (first seed): mean top-1 router probability and the largest / smallest expert share per
    layer against training tokens, and every expert's share per layer at the last evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["kind"], r["variant"]) for r in router if r["kind"] in ("main", "upcycle")},
                    key=lambda g: (g[0] == "upcycle", _variant_order(g[1])))  # fmt: skip
    n = max(1, len(groups))
    fig, axes = plt.subplots(3, n, figsize=(4 * n, 10), squeeze=False)
    for j, (kind, name) in enumerate(groups):
        group = [r for r in router if r["kind"] == kind and r["variant"] == name]
        seed = min(r["seed"] for r in group)
        rs = [r for r in group if r["seed"] == seed]
        m = Variant.parse(name).num_experts
        layers = sorted({r["layer"] for r in rs})
        for layer in layers:
            pts = sorted(
                (r["tokens"], r["top1_prob"], r["max_share"], r["min_share"]) for r in rs if r["layer"] == layer
            )
            xs = [p[0] for p in pts]
            axes[0][j].plot(xs, [p[1] for p in pts], marker="o", markersize=3, label=f"layer {layer}")
            line = axes[1][j].plot(xs, [p[2] for p in pts], marker="o", markersize=3, label=f"layer {layer}")
            axes[1][j].plot(xs, [p[3] for p in pts], linestyle="--", color=line[0].get_color())
        last = max(r["tokens"] for r in rs)
        bottom = [0.0] * len(layers)
        for e in range(m):
            shares = [
                float(next(r for r in rs if r["layer"] == layer and r["tokens"] == last)["shares"].split()[e])
                for layer in layers
            ]
            axes[2][j].bar(layers, shares, bottom=bottom, label=f"expert {e}")
            bottom = [b + x for b, x in zip(bottom, shares)]
        axes[2][j].set_xticks(layers)
        for row in (0, 1):
            axes[row][j].axhline(1 / m, color="gray", linewidth=0.8, linestyle=":")
            axes[row][j].grid(alpha=0.3)
            axes[row][j].set_xlabel("training tokens")
        title = f"{name}{' upcycled' if kind == 'upcycle' else ''} (seed {seed})"
        axes[0][j].set(title=title, ylabel="mean top-1 router probability")
        axes[1][j].set(ylabel="expert token share: max (solid), min (dashed)")
        axes[2][j].set(xlabel="layer", ylabel=f"expert shares at {last:,} tokens")
        axes[0][j].legend(fontsize=7)
        if j == n - 1:
            axes[2][j].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
