"""Table 7 of ParameterNet (arXiv 2306.14525, sec. 5.4) at CPU scale: dense LLaMA against a top-1 mixture of experts
on one FFN projection at the same FLOPs, trained to the corpus, with a learning-rate check, upcycling and the
paper's fine-tuned classifier. ``parameternet lm experiment --preset full|quick|gpu|smoke`` (``--preset upcycle2``:
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
:func:`~parameternet.experiments.lm_report.report` rebuilds ``table7.md``, ``loss_curves.png`` and ``router.png``
from the CSVs alone; :mod:`parameternet.experiments.lm_estimate` estimates a preset's wall time before it runs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.lm_grid import (
    DENSE,
    MOE8,
    SMOKE_OVERRIDES,
    Runner,
    Task,
    Variant,
    check_grid,
    check_hardware,
    check_inputs,
    check_jobs,
    hardware,
    recipe_hash,
)
from parameternet.experiments.lm_rows import (
    COLUMNS,
    fit_change,
    read_rows,
)
from parameternet.runs import atomic_write

__all__ = [
    "COLUMNS",
    "CRITERIA",
    "PRESETS",
    "Preset",
    "Variant",
    "choose_lrs",
    "read_rows",
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
    # Table 7's main comparison at a larger size on one CUDA GPU (it refuses to start without one): the whole
    # training split once (871 steps of 64 x 128 tokens), two runs side by side on the GPU.
    "gpu": Preset(
        "gpu",
        "one CUDA GPU: hidden 512, 8 layers, batch 64 x 128 tokens; lr check on 1M tokens; dense vs MoE-8 down on "
        "the whole training split once, 3 seeds each; no upcycling, no classifier",
        main=((DENSE, (0, 1, 2)), (MOE8, (0, 1, 2))),
        eval_every=100,
        upcycle_seeds=(),
        cls_variants=(),
        overrides=(
            "device=cuda",
            "batch_size=64",
            "model.hidden_size=512",
            "model.intermediate_size=2048",
            "model.num_hidden_layers=8",
            "model.num_attention_heads=8",
        ),
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
        overrides=(*SMOKE_OVERRIDES, "ckpt_every_steps=2"),
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
                from_snapshot=str(dense.run_dir / "snapshot"), start_step=mid,
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


# ----- the command -----


COMMITTED_OUTPUTS = {"full": "results/lm", "upcycle2": "results/lm-upcycle2", "gpu": "results/lm-gpu"}


def default_output(preset: str) -> Path:
    """``results/lm``, ``results/lm-upcycle2`` and ``results/lm-gpu`` for the full, upcycle2 and gpu presets
    (committed), ``runs/lm-<preset>`` for the others."""
    return Path(COMMITTED_OUTPUTS.get(preset, f"runs/lm-{preset}"))


@contextmanager
def grid_output(
    p: Any, recipe: str | Path, overrides: Sequence[str], output: str | Path | None, jobs: int
) -> Iterator[Path]:
    """Check ``jobs`` and the base recipe of the preset ``p`` (a :class:`Preset` or an upcycling one) with
    ``overrides``, prepare its data, then hold the lock of the output directory (``output``, default
    :func:`default_output`) with the grid and the device it trains on recorded there or checked against them
    (:func:`~parameternet.experiments.lm_grid.check_grid`, :func:`~parameternet.experiments.lm_grid.check_hardware`);
    yields the directory. Bad input raises
    ParameterNetError before the output directory is made."""
    from parameternet.runs import RunLock

    check_jobs(jobs)
    base = check_inputs(p, recipe, overrides)
    device = hardware(base.device)
    output = Path(output) if output is not None else default_output(p.name)
    check_hardware(output, device, write=False)  # before the data's preparation, which can take a while
    base.data.prepare()  # bad input stops here, before the output directory exists
    with RunLock(output, "experiment results"):  # one writer of the CSVs; each run also locks its own directory
        check_hardware(output, device)
        check_grid(output, p.name, base)
        yield output


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
    p = PRESETS[preset]
    with grid_output(p, recipe, overrides, output, jobs) as output:
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
        from parameternet.experiments.lm_report import report

        return report(output, preset=p.name)
