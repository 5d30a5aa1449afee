"""The low-FLOPs pitfall on real data (ParameterNet, arXiv 2306.14525, sec. 1 and 4.1, Figures 1-3, Tables 2, 4, 6).

The paper's claim: small-FLOPs models gain little or nothing from a larger pretraining set, and the same models
with more parameters at about the same FLOPs (ParameterNet: dynamic convs) do gain. Here, at CPU scale:

- target task: 1,000 Fashion-MNIST training images per class (recipe ``pitfall-target.yaml``);
- large pretraining set: the 20-class MNIST + Fashion-MNIST union, 120,000 images (``pitfall-pretrain.yaml``);
- evaluation: the Fashion-MNIST test set, which neither regime trains on.

The recipes ship with the package (``parameternet/experiments/recipes``). Each model is a :class:`Cell`, named by a
small grammar (``ghostnet-w0.25-h64``, ``parameternet-w0.25-h64-e4``, ``...-repconv``, ``...-softmax``,
``...-pre0.25`` for a quarter of the pretraining set, ``...-pe9`` for 9 pretraining epochs). It is trained in two
regimes per seed: *target-only* (30 epochs from scratch) and *pretrain -> fine-tune* (3 epochs on the union, then
15 on the target with a fresh classifier, ``pitfall-finetune.yaml``). A cell that changes only the pretraining
shares its target-only runs with its base cell.

The ``full`` preset first runs a *gate*: the smallest static baseline must be in the pitfall (its gain from
pretraining not above +0.5 on every one of three seeds), else the next smaller width is tried. The grid is then
built around the width it settled on (:func:`design`). The ``round3`` preset runs round 3's design instead
(:mod:`parameternet.experiments.pitfall_round3`: no gate, new seeds, a verdict rule stated before the run). Every
row records the git commit, a dirty flag and the package version; resuming skips only rows made by the same code,
and the report never pools rows of one cell from different code unless asked to.

Every training is one ``parameternet train`` run in its own directory under ``runs_dir``, named by the model,
seed and a hash of its resolved recipe; runs resume from their last checkpoint. Each finished row is appended to
``<output>/results.csv`` at once, with routing diagnostics of every dynamic model in ``routing.csv``; ``report``
rebuilds ``table.md`` and ``pitfall.png`` from the CSVs alone. Each training is a subprocess of ``parameternet
train`` of its resolved recipe (``<run_dir>.yaml``, with ``resume=auto``) through
:func:`~parameternet.experiments.grid.run_jobs`, one torch thread each, ``jobs`` of them side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.grid import Job, run_jobs
from parameternet.experiments.pitfall_cells import (
    UNION_PER_CLASS,
    Cell,
    dynamic_cell,
    scaled_head,
    static_cell,
    twin_width,
)
from parameternet.experiments.pitfall_cells import profile_cell as _profile_cell
from parameternet.experiments.pitfall_presets import (
    GATE_MAX_GAIN,
    PRESETS,
    Grid,
    Preset,
    default_output,
    design,
    gate_decision,
)
from parameternet.experiments.pitfall_report import CRITERIA, markdown_table, report, verdict
from parameternet.experiments.pitfall_tables import FLOATS, INTS, read_rows, summarize
from parameternet.experiments.pitfall_tables import gains as _gains
from parameternet.experiments.provenance import code_id, provenance, rows_of_this_code
from parameternet.experiments.rows import append_rows
from parameternet.runs import atomic_write

# This module runs the grids; the cells, presets, tables and reports live in pitfall_cells, pitfall_presets,
# pitfall_tables and pitfall_report, round 3's design and report in pitfall_round3 and pitfall_round3_report.

__all__ = [
    "COLUMNS",
    "CRITERIA",
    "PRESETS",
    "REGIMES",
    "ROUTING_COLUMNS",
    "Cell",
    "Preset",
    "default_output",
    "design",
    "dynamic_cell",
    "gate_decision",
    "markdown_table",
    "read_rows",
    "report",
    "run_pitfall",
    "scaled_head",
    "static_cell",
    "summarize",
    "twin_width",
    "verdict",
]

log = logging.getLogger(__name__)

REGIMES = ("target-only", "pretrain-finetune")
COLUMNS = (
    "model", "base_model", "family", "width", "head_chs", "experts", "method", "router", "pretrain_fraction",
    "pretrain_epochs", "macs", "params", "img_size", "regime", "seed", "top1", "top5", "epochs", "steps", "wall_s",
    "pretrain_top1", "pretrain_wall_s", "route_coef_std", "route_kernel_dist", "preset", "recipe", "run_dir",
    "commit", "dirty", "version",
)  # fmt: skip
ROUTING_COLUMNS = (
    "model", "regime", "seed", "layer", "experts", "coef_mean", "coef_std", "kernel_dist", "commit", "dirty",
)  # fmt: skip


# ----- recipes and runs -----


@dataclass
class _Task:
    """One training run: its stage (target | pretrain | finetune), resolved config and run directory."""

    cell: Cell
    seed: int
    stage: str
    cfg: dict[str, Any]
    run_dir: Path
    recipe: str  # hash of the resolved config, the part of the run name that changes with the recipe
    after: _Task | None = None
    summary: dict[str, Any] | None = None
    routing: list[dict[str, Any]] | None = None

    @property
    def regime(self) -> str:
        return "target-only" if self.stage == "target" else "pretrain-finetune"

    @property
    def name(self) -> str:
        """The run in the log: cell, stage and seed."""
        return f"{self.cell.name} {self.stage} seed {self.seed}"


def _recipe_hash(cfg: dict[str, Any]) -> str:
    cfg = {k: v for k, v in cfg.items() if k not in ("output_dir", "resume", "progress")}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _scale_per_class(spec: str, fraction: float) -> str:
    """``spec`` with a class-balanced ``fraction`` of its images (``per_class`` scaled, or added for the union)."""
    m = re.search(r"per_class=(\d+)", spec)
    if m:
        return spec.replace(m.group(0), f"per_class={max(1, round(int(m.group(1)) * fraction))}")
    return f"{spec}:per_class={round(UNION_PER_CLASS * fraction)}"


def _build_cfg(stage: str, cell: Cell, seed: int, preset: Preset, extra: list[str]) -> dict[str, Any]:
    from parameternet.train.config import load_config

    overrides = [*cell.overrides(), f"seed={seed}", "progress=false", *preset.overrides]
    overrides += preset.pretrain_overrides if stage == "pretrain" else preset.target_overrides
    if stage == "pretrain":
        overrides += cell.pretrain_overrides()
    recipe = resources.files("parameternet.experiments") / "recipes" / f"pitfall-{stage}.yaml"
    with resources.as_file(recipe) as path:
        cfg = load_config(path, overrides + extra).to_dict()
    if stage == "pretrain" and cell.pretrain_fraction != 1.0:
        cfg["data"]["train"] = _scale_per_class(cfg["data"]["train"], cell.pretrain_fraction)
    return cfg


def _new_task(cell: Cell, seed: int, stage: str, cfg: dict[str, Any], runs_dir: Path) -> _Task:
    """A run in ``runs_dir/<stage>/<model>-s<seed>-<recipe hash>``; ``runs_dir`` is per code version, so a finished
    run is never credited to other code."""
    recipe = _recipe_hash(cfg)
    name = cell.base.name if stage == "target" else cell.name
    run_dir = runs_dir / stage / f"{name}-s{seed}-{recipe}"
    cfg = {**cfg, "output_dir": str(run_dir), "resume": "auto"}
    return _Task(cell, seed, stage, cfg, run_dir, recipe)


def _plan(preset: Preset, cell: Cell, seeds: Sequence[int], runs_dir: Path, done: set) -> list[_Task]:
    """The runs of ``cell`` still needed, in order; a fine-tune waits for its pretraining. A cell that changes
    only the pretraining has no target-only row of its own (its base cell's is used)."""
    tasks: list[_Task] = []
    for seed in seeds:
        if cell.base == cell and (cell.name, "target-only", seed) not in done:
            tasks.append(_new_task(cell, seed, "target", _build_cfg("target", cell, seed, preset, []), runs_dir))
        if (cell.name, "pretrain-finetune", seed) not in done:
            pre = _new_task(cell, seed, "pretrain", _build_cfg("pretrain", cell, seed, preset, []), runs_dir)
            cfg = _build_cfg("finetune", cell, seed, preset, [f"init_from={pre.run_dir}"])
            fine = _new_task(cell, seed, "finetune", cfg, runs_dir)
            fine.after = pre
            tasks += [pre, fine]
    return tasks


def _routing(cfg_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Routing diagnostics of a finished run's final weights on its evaluation set; cached in ``routing.json``."""
    import torch

    from parameternet.data.images import build_dataset
    from parameternet.data.pipeline import LoaderDataset, collate
    from parameternet.profiling.routing import routing_stats
    from parameternet.train.checkpoint import load_into, load_weights, resolve_weights
    from parameternet.train.config import config_from_dict
    from parameternet.train.image_build import build_transforms, create_model

    run_dir = Path(cfg_dict["output_dir"])
    cached = run_dir / "routing.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    cfg = config_from_dict(cfg_dict)
    weights = resolve_weights(str(run_dir / "checkpoints" / "final.safetensors"))
    sd, meta = load_weights(weights)
    model = create_model(cfg, int(meta["num_classes"]))
    load_into(model, sd, str(weights), strict=True)
    ds = build_dataset(cfg.data.val)
    (per_image, batch_tf), _ = build_transforms(cfg, ds, False, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(LoaderDataset(ds, per_image), batch_size=500, collate_fn=collate)
    stats = routing_stats(model, (batch_tf(x) for x, _ in loader))
    tmp = cached.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, cached)
    return stats


def _row(task: _Task, preset: Preset, params: int, macs: int, prov: dict[str, Any]) -> dict[str, Any]:
    from parameternet.profiling.routing import summarize_routing

    s, c = task.summary or {}, task.cell
    val = (s.get("val") or {}).get("model") or {}
    row = {
        "model": c.name,
        "base_model": c.base.name,
        "family": c.family,
        "width": c.width,
        "head_chs": c.head_chs,
        "experts": c.experts if c.experts is not None else "",
        "method": c.method,
        "router": c.router if c.family == "parameternet" else "",
        "pretrain_fraction": c.pretrain_fraction,
        "pretrain_epochs": c.pretrain_epochs or "",
        "macs": macs,
        "params": params,
        "img_size": task.cfg["img_size"],
        "regime": task.regime,
        "seed": task.seed,
        "top1": round(val["top1"], 2),
        "top5": round(val["top5"], 2),
        "epochs": round(s.get("epochs", 0), 2),
        "steps": s.get("steps"),
        "wall_s": s.get("wall_s"),
        "preset": preset.name,
        "recipe": task.recipe,
        "run_dir": str(task.run_dir),
        **summarize_routing(task.routing or []),
        **prov,
    }
    if task.after is not None:
        pre = task.after.summary or {}
        pre_val = (pre.get("val") or {}).get("model") or {}
        row["pretrain_top1"] = round(pre_val["top1"], 2) if pre_val else ""
        row["pretrain_wall_s"] = pre.get("wall_s", "")
    return row


# ----- running -----


class _Runner:
    """Plans and executes rows of one preset into one output directory, skipping rows this code already made."""

    def __init__(self, preset: Preset, output: Path, runs_dir: Path, jobs: int, heartbeat_s: float):
        self.preset, self.output, self.jobs, self.heartbeat_s = preset, output, jobs, heartbeat_s
        self.csv_path = output / "results.csv"
        self.prov = provenance()
        self.code = code_id(self.prov)
        self.runs_dir = runs_dir / self.code
        rows = [r for r in read_rows(self.csv_path) if r.get("preset") == preset.name]
        self.rows, _ = rows_of_this_code(rows, f"pitfall {preset.name}", self.csv_path)
        self.sizes: dict[str, tuple[int, int]] = {}

    def done(self) -> set[tuple[str, str, int]]:
        return {(r["model"], r["regime"], r["seed"]) for r in self.rows}

    def gains(self, cell: Cell) -> dict[int, float]:
        return _gains(self.rows, cell.name)

    def run(self, grid: Grid) -> None:
        done = self.done()
        tasks: list[_Task] = []
        for name, seeds in grid:
            tasks += _plan(self.preset, Cell.parse(name), seeds, self.runs_dir, done)
        img_size = int(tasks[0].cfg["img_size"]) if tasks else 28
        for cell in {t.cell.name: t.cell for t in tasks}.values():
            if cell.name not in self.sizes:
                self.sizes[cell.name] = _profile_cell(cell, img_size)
        log.info(
            "pitfall %s: %d rows of this code (%s) in %s, %d to run (%d trainings, %d at a time, 1 thread each)",
            self.preset.name, len(done), self.code, self.csv_path, sum(t.stage != "pretrain" for t in tasks),
            len(tasks), self.jobs,
        )  # fmt: skip
        self._execute(tasks)

    def _finish(self, task: _Task) -> None:
        if task.stage == "pretrain":
            val = (task.summary.get("val") or {}).get("model") or {}
            log.info(
                "  pretrained %s seed %d: union top-1 %.2f (%.0f s)",
                task.cell.name, task.seed, val.get("top1", math.nan), task.summary.get("wall_s", 0),
            )  # fmt: skip
            return
        if task.cell.method == "dynamic" and task.routing is None:
            task.routing = _routing(task.cfg)
        row = _row(task, self.preset, *self.sizes[task.cell.name], self.prov)
        append_rows(self.csv_path, [row], COLUMNS)
        routing = [
            {"model": row["model"], "regime": row["regime"], "seed": task.seed, **s, **self.prov}
            for s in task.routing or []
        ]
        append_rows(self.output / "routing.csv", routing, ROUTING_COLUMNS)
        self.rows.append(read_rows_from_dict(row))
        log.info(
            "[%d rows] %-40s %-17s seed %d: top-1 %.2f  (%.0f s)",
            len(self.rows), task.cell.name, row["regime"], task.seed, row["top1"], row["wall_s"] or 0,
        )  # fmt: skip

    def _execute(self, tasks: list[_Task]) -> None:
        """Run ``tasks`` (a fine-tune after its pretraining), each a ``parameternet train`` subprocess of its
        resolved recipe, writing each row as it lands. A stop (SIGINT / SIGTERM) lets the running runs save and
        raises RunInterrupted; the same command resumes (:func:`~parameternet.experiments.grid.run_jobs`)."""
        import yaml

        jobs: dict[int, Job] = {}
        for t in tasks:
            recipe = t.run_dir.with_name(t.run_dir.name + ".yaml")
            recipe.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(recipe, yaml.safe_dump(t.cfg, sort_keys=False))
            jobs[id(t)] = job = Job(t.name, ["train", str(recipe)], t.run_dir, payload=t)
            job.after = [jobs[id(t.after)]] if t.after is not None else []
        start = time.perf_counter()
        run_jobs(list(jobs.values()), self.jobs, self._done, heartbeat_s=self.heartbeat_s)
        log.info("pitfall %s: %.1f min", self.preset.name, (time.perf_counter() - start) / 60)

    def _done(self, job: Job) -> None:
        task: _Task = job.payload
        task.summary = job.summary
        self._finish(task)


def read_rows_from_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A row as :func:`read_rows` would return it after a CSV round trip (strings for the text columns)."""
    out = {k: row.get(k, "") for k in COLUMNS}
    for k in INTS:
        out[k] = int(out[k]) if out[k] not in (None, "") else None
    for k in FLOATS:
        if k in out:
            out[k] = float(out[k]) if out[k] not in (None, "") else None
    out["dirty"] = str(out["dirty"])
    return out


def _run_gate(runner: _Runner) -> float:
    """Run the preset's gate and return the width it settled on; writes ``gate.json`` in the output."""
    p = runner.preset
    tried = []
    width = p.gate[-1]
    for candidate in p.gate:
        cell = static_cell(candidate)
        runner.run(tuple((cell.name, (s,)) for s in p.gate_seeds))
        gains = {s: g for s, g in runner.gains(cell).items() if s in p.gate_seeds}  # what the gate decided on
        in_pitfall = gate_decision(gains)
        tried.append({"model": cell.name, "gains": gains, "in_pitfall": in_pitfall})
        log.info(
            "gate: %s gains %s from pretraining -> %s",
            cell.name, ", ".join(f"{g:+.2f}" for g in gains.values()),
            "in the pitfall: settled" if in_pitfall else f"above +{GATE_MAX_GAIN} on every seed: not in the pitfall",
        )  # fmt: skip
        if in_pitfall:
            width = candidate
            break
    else:
        log.warning("gate: no candidate width is in the pitfall; the grid uses the smallest, %g", width)
    record = {"preset": p.name, "settled_width": width, "rule": f"gain > +{GATE_MAX_GAIN} on every seed: go smaller"}
    record.update(seeds=list(p.gate_seeds), tried=tried, **runner.prov)
    _write_gate(runner.output, record)
    return width


def _write_gate(output: Path, record: dict[str, Any]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "gate.json").write_text(json.dumps(record, indent=2) + "\n")


def run_pitfall(
    preset: str = "full",
    output: str | Path | None = None,
    runs_dir: str | Path = "runs/pitfall",
    seeds: int | None = None,
    models: Sequence[str] | None = None,
    jobs: int = 1,
    heartbeat_s: float = 60.0,
) -> str:
    """Run the gate and grid of ``preset`` (skipping rows this code already made), then write and return the
    report. ``models`` replaces the grid by these cells (no gate), with ``seeds`` 0..N-1 (default 3); a round-3
    preset takes neither (its seeds are fixed before the run).

    Raises :class:`ParameterNetError` for an unknown preset, a bad cell name or count, ``models`` or ``seeds`` with
    a round-3 preset, or failed runs.
    """
    if preset not in PRESETS:
        raise ParameterNetError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if jobs < 1:
        raise ParameterNetError(f"jobs={jobs} is invalid; use 1 or more parallel runs")
    if seeds is not None and seeds < 1:
        raise ParameterNetError(f"seeds={seeds} is invalid; use 1 or more")
    cells = [Cell.parse(m) for m in models or ()]
    p = PRESETS[preset]
    if p.round3 is not None and (cells or seeds is not None):
        raise ParameterNetError(
            f"preset {preset} fixes its cells and seeds (new seeds, chosen before the run); drop --models / --seeds, "
            "or run your own cells with another preset"
        )
    output = Path(output) if output is not None else default_output(preset)
    from parameternet.runs import RunLock

    with RunLock(output, "pitfall results"):  # one writer of results.csv; each run also locks its own directory
        runner = _Runner(p, output, Path(runs_dir), jobs, heartbeat_s)
        if cells:
            grid = tuple((c.name, tuple(range(seeds or 3))) for c in cells)
        else:
            width = _run_gate(runner) if p.gate else p.width
            if p.gate_record is not None:
                _write_gate(output, {"preset": p.name, **p.gate_record, **runner.prov})
            grid = p.grid(width)
            if seeds is not None:
                grid = tuple((n, tuple(range(seeds))) for n in dict.fromkeys(n for n, _ in grid))
        runner.run(grid)
        return report(output, preset=p.name)
