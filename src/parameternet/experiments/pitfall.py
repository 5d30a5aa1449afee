"""The low-FLOPs pitfall on real data (ParameterNet, arXiv 2306.14525, sec. 1 and 4.1, Figures 1-3, Tables 2, 4, 6).

The paper's claim: small-FLOPs models gain little or nothing from a larger pretraining set, and the same models
with more parameters at about the same FLOPs (ParameterNet: dynamic convs) do gain. Here, at CPU scale
(DESIGN.md section 4):

- target task: 1,000 Fashion-MNIST training images per class (``configs/pitfall-target.yaml``);
- large pretraining set: the 20-class MNIST + Fashion-MNIST union, 120,000 images (``configs/pitfall-pretrain.yaml``);
- evaluation: the Fashion-MNIST test set, which neither regime trains on.

Each model (a :class:`Cell`: a GhostNet-mini width, or a ParameterNet-mini with a number of experts, or its RepConv
alternative) is trained in two regimes per seed: *target-only* (30 epochs from scratch) and *pretrain -> fine-tune*
(3 epochs on the union, then 15 on the target with a fresh classifier, ``configs/pitfall-finetune.yaml``). The
pretraining run depends only on (model, seed, pretraining recipe), so it is shared by every target design.

Every training is one ``parameternet train`` run in its own directory under ``runs_dir``, named by the model, seed
and a hash of its resolved recipe; runs resume from their last checkpoint. Each finished row is appended to
``<output>/results.csv`` at once, and rows already there are skipped, so an interrupted command loses at most
the runs in progress. ``report`` rebuilds ``table.md`` and ``pitfall.png`` from the CSV alone.

Runs go to worker processes with one torch thread each (``jobs`` of them side by side): on a small CPU one
thread per run and two runs in parallel beat one run with two threads for these tiny models.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError

__all__ = [
    "CELLS",
    "COLUMNS",
    "PRESETS",
    "REGIMES",
    "Cell",
    "Preset",
    "read_rows",
    "report",
    "run_pitfall",
    "summarize",
]

log = logging.getLogger(__name__)

REGIMES = ("target-only", "pretrain-finetune")
COLUMNS = (
    "model", "timm_model", "width", "experts", "method", "macs", "params", "img_size", "regime", "seed", "top1",
    "top5", "epochs", "steps", "wall_s", "pretrain_top1", "pretrain_wall_s", "preset", "recipe", "run_dir",
)  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One model of the grid: a timm name plus the expert options (``method`` static | dynamic | repconv)."""

    name: str
    timm_model: str
    width: float
    experts: int | None = None
    method: str = "static"

    @property
    def is_parameternet(self) -> bool:
        return self.method != "static"

    def overrides(self) -> list[str]:
        out = [f"model={self.timm_model}"]
        if self.experts is not None:
            out.append(f"model_kwargs.num_experts={self.experts}")
        if self.method == "repconv":
            out.append("model_kwargs.method=repconv")
        return out


def _cells() -> dict[str, Cell]:
    cells = [Cell(f"ghostnet_mini_{w}", f"ghostnet_mini_{w}", int(w) / 100) for w in ("025", "050", "100", "200")]
    for w in ("025", "050", "100"):
        cells += [
            Cell(f"parameternet_mini_{w}-e{e}", f"parameternet_mini_{w}", int(w) / 100, e, "dynamic")
            for e in (1, 2, 4, 8)
        ]
        cells.append(Cell(f"parameternet_mini_{w}-repconv4", f"parameternet_mini_{w}", int(w) / 100, 4, "repconv"))
    return {c.name: c for c in cells}


CELLS = _cells()


@dataclass(frozen=True)
class Preset:
    """A grid: (cell name, seeds) in the order they run, and recipe overrides (all stages, then per stage)."""

    name: str
    grid: tuple[tuple[str, tuple[int, ...]], ...]
    overrides: tuple[str, ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    target_overrides: tuple[str, ...] = ()  # target-only and fine-tune
    description: str = ""


_LOW, _PN = "ghostnet_mini_025", "parameternet_mini_025-e4"
PRESETS = {
    "full": Preset(
        "full",
        (
            # the essential cells first, seed by seed: the smallest GhostNet, its ParameterNet (4 experts) and a
            # second baseline width; then the widest of the essential baselines
            *((name, (seed,)) for seed in (0, 1, 2) for name in (_LOW, _PN, "ghostnet_mini_050")),
            ("ghostnet_mini_100", (0, 1, 2)),
            # five seeds for the smallest models, whose gain is the headline
            (_LOW, (3, 4)),
            (_PN, (3, 4)),
            # the expert ablation (1, 2, 8; 4 is above) and RepConv at the same size
            ("parameternet_mini_025-e1", (0, 1, 2)),
            ("parameternet_mini_025-e2", (0, 1, 2)),
            ("parameternet_mini_025-e8", (0, 1, 2)),
            ("parameternet_mini_025-repconv4", (0, 1, 2)),
            ("ghostnet_mini_200", (0, 1, 2)),
        ),
        description="4 GhostNet widths, ParameterNet-0.25 with 1/2/4/8 experts and RepConv, 3-5 seeds",
    ),
    "quick": Preset(
        "quick",
        ((_LOW, (0,)), (_PN, (0,))),
        description="GhostNet vs ParameterNet at width 0.25, one seed, the full recipes",
    ),
    # A wiring check for tests and CI: two cells, a few steps on a few tiny images; its numbers mean nothing.
    "smoke": Preset(
        "smoke",
        ((_LOW, (0,)), ("parameternet_mini_025-e2", (0,))),
        overrides=(
            "img_size=16",
            "batch_size=8",
            "eval_batch_size=50",
            "max_steps=2",
            "ckpt_every_epochs=0",
        ),
        pretrain_overrides=("data.train=union:train:per_class=2", "data.val=union:test:per_class=1"),
        target_overrides=("data.train=fashion-mnist:train:per_class=4", "data.val=fashion-mnist:test:per_class=5"),
        description="two cells, two steps each, 16 px: checks the command, not the science",
    ),
}


def _configs_dir() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (base / "configs" / "pitfall-target.yaml").is_file():
            return base / "configs"
    raise ParameterNetError(
        "configs/pitfall-target.yaml was not found; run `parameternet pitfall` from the repository root"
    )


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
    started: float = 0.0


def _recipe_hash(cfg: dict[str, Any]) -> str:
    cfg = {k: v for k, v in cfg.items() if k not in ("output_dir", "resume", "progress")}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _build_cfg(stage: str, cell: Cell, seed: int, preset: Preset, extra: list[str]) -> dict[str, Any]:
    from parameternet.train.config import load_config

    recipe = {"target": "pitfall-target", "pretrain": "pitfall-pretrain", "finetune": "pitfall-finetune"}[stage]
    overrides = [*cell.overrides(), f"seed={seed}", "progress=false", *preset.overrides]
    overrides += preset.pretrain_overrides if stage == "pretrain" else preset.target_overrides
    cfg = load_config(_configs_dir() / f"{recipe}.yaml", overrides + extra)
    return cfg.to_dict()


def _plan(preset: Preset, cell: Cell, seeds: Sequence[int], runs_dir: Path, done: set) -> list[_Task]:
    """The runs of ``cell`` still needed, in priority order; a fine-tune waits for its pretraining."""
    tasks: list[_Task] = []
    for seed in seeds:
        if (cell.name, "target-only", seed) not in done:
            tasks.append(_new_task(cell, seed, "target", _build_cfg("target", cell, seed, preset, []), runs_dir))
        if (cell.name, "pretrain-finetune", seed) not in done:
            pre = _new_task(cell, seed, "pretrain", _build_cfg("pretrain", cell, seed, preset, []), runs_dir)
            cfg = _build_cfg("finetune", cell, seed, preset, [f"init_from={pre.run_dir}"])
            fine = _new_task(cell, seed, "finetune", cfg, runs_dir)
            fine.after = pre
            tasks += [pre, fine]
    return tasks


def _new_task(cell: Cell, seed: int, stage: str, cfg: dict[str, Any], runs_dir: Path) -> _Task:
    recipe = _recipe_hash(cfg)
    run_dir = runs_dir / stage / f"{cell.name}-s{seed}-{recipe}"
    cfg = {**cfg, "output_dir": str(run_dir), "resume": "auto"}
    return _Task(cell, seed, stage, cfg, run_dir, recipe)


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that completed earlier (its final weights and summary.json exist), else None."""
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / "checkpoints" / "final.safetensors").is_file():
        return json.loads(summary.read_text())
    return None


def _init_worker() -> None:
    import torch

    from parameternet.runs import die_with_parent

    die_with_parent()  # SIGTERM when the parent dies: the run saves a checkpoint and exits, never left running

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _train_worker(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Run one recipe in a worker process (one torch thread) and return its summary."""
    from parameternet.train.config import config_from_dict
    from parameternet.train.trainer import train

    return train(config_from_dict(cfg_dict).validate())


def _profile_cell(cell: Cell, img_size: int) -> tuple[int, int]:
    """(training parameters, inference MACs) at ``img_size``; RepConv merges into the static twin for inference."""
    import timm

    import parameternet.models  # noqa: F401
    from parameternet.profile import profile

    kwargs = {}
    if cell.experts is not None:
        kwargs["num_experts"] = cell.experts
    if cell.method == "repconv":
        kwargs["method"] = "repconv"
    result = profile(timm.create_model(cell.timm_model, **kwargs), img_size=img_size)
    if cell.method == "repconv":
        static = timm.create_model(cell.timm_model.replace("parameternet", "ghostnet"))
        return result.params, profile(static, img_size=img_size).macs
    return result.params, result.macs


def read_rows(csv_path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results CSV with numbers parsed (missing file: no rows)."""
    path = Path(csv_path)
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in ("macs", "params", "img_size", "seed", "steps", "experts"):
                row[k] = int(float(row[k])) if row.get(k) not in (None, "") else None
            for k in ("width", "top1", "top5", "epochs", "wall_s", "pretrain_top1", "pretrain_wall_s"):
                row[k] = float(row[k]) if row.get(k) not in (None, "") else None
            out.append(row)
    return out


def _append_row(csv_path: Path, row: dict[str, Any]) -> None:
    new = not csv_path.is_file() or csv_path.stat().st_size == 0
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def _row(task: _Task, preset: Preset, params: int, macs: int) -> dict[str, Any]:
    s = task.summary or {}
    val = (s.get("val") or {}).get("model") or {}
    row = {
        "model": task.cell.name,
        "timm_model": task.cell.timm_model,
        "width": task.cell.width,
        "experts": task.cell.experts if task.cell.experts is not None else "",
        "method": task.cell.method,
        "macs": macs,
        "params": params,
        "img_size": task.cfg["img_size"],
        "regime": "target-only" if task.stage == "target" else "pretrain-finetune",
        "seed": task.seed,
        "top1": round(val["top1"], 2),
        "top5": round(val["top5"], 2),
        "epochs": round(s.get("epochs", 0), 2),
        "steps": s.get("steps"),
        "wall_s": s.get("wall_s"),
        "preset": preset.name,
        "recipe": task.recipe,
        "run_dir": str(task.run_dir),
    }
    if task.after is not None:
        pre = task.after.summary or {}
        pre_val = (pre.get("val") or {}).get("model") or {}
        row["pretrain_top1"] = round(pre_val["top1"], 2) if pre_val else ""
        row["pretrain_wall_s"] = pre.get("wall_s", "")
    return row


def _progress(task: _Task) -> str:
    """``step k/N`` of a running task from its metrics.jsonl (written every ``log_every`` steps)."""
    path = task.run_dir / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines()[-5:]:
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                continue
    return f"{task.cell.name} {task.stage} s{task.seed} step {step} ({time.perf_counter() - task.started:.0f} s)"


def run_pitfall(
    preset: str = "full",
    output: str | Path | None = None,
    runs_dir: str | Path = "runs/pitfall",
    seeds: int | None = None,
    models: Sequence[str] | None = None,
    jobs: int = 1,
    heartbeat_s: float = 60.0,
) -> str:
    """Run the grid of ``preset`` (skipping rows already in the CSV), then write and return the table."""
    if preset not in PRESETS:
        raise ParameterNetError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if jobs < 1:
        raise ParameterNetError(f"jobs={jobs} is invalid; use 1 or more parallel runs")
    if seeds is not None and seeds < 1:
        raise ParameterNetError(f"seeds={seeds} is invalid; use 1 or more")
    p = PRESETS[preset]
    output = Path(output) if output is not None else default_output(preset)
    runs_dir = Path(runs_dir)
    unknown = [m for m in models or () if m not in CELLS]
    if unknown:
        raise ParameterNetError(f"model {unknown[0]!r} is not in the grid; choose from {', '.join(CELLS)}")
    # The preset's order: each (cell, seed group) in turn, so the essential cells finish first. --models keeps
    # that order for the cells it names (three seeds for a cell the preset lacks); --seeds N gives seeds 0..N-1.
    order = [(n, list(s)) for n, s in p.grid if not models or n in models]
    order += [(n, [0, 1, 2]) for n in dict.fromkeys(models or ()) if n not in {name for name, _ in p.grid}]
    if seeds is not None:
        order = [(n, list(range(seeds))) for n in dict.fromkeys(n for n, _ in order)]

    csv_path = output / "results.csv"
    done = {(r["model"], r["regime"], r["seed"]) for r in read_rows(csv_path) if r["preset"] == p.name}
    tasks: list[_Task] = []
    for name, cell_seeds in order:
        tasks += _plan(p, CELLS[name], cell_seeds, runs_dir, done)
    img_size = int(tasks[0].cfg["img_size"]) if tasks else 28
    sizes = {c.name: _profile_cell(c, img_size) for c in {t.cell.name: t.cell for t in tasks}.values()}
    rows_due = sum(t.stage != "pretrain" for t in tasks)
    log.info(
        "pitfall %s: %d rows already in %s, %d to run (%d trainings, %d at a time, 1 thread each)",
        p.name, len(done), csv_path, rows_due, len(tasks), jobs,
    )  # fmt: skip
    _execute(tasks, p, sizes, csv_path, jobs, heartbeat_s)
    return report(output, preset=p.name)


def default_output(preset: str) -> Path:
    """``results/pitfall`` for the full preset (committed), ``runs/pitfall-<preset>`` for the others."""
    return Path("results/pitfall") if preset == "full" else Path(f"runs/pitfall-{preset}")


def _execute(tasks: list[_Task], preset: Preset, sizes, csv_path: Path, jobs: int, heartbeat_s: float) -> None:
    pending = list(tasks)
    for t in pending:  # runs that finished before the CSV row was written (a crash in between)
        t.summary = _finished_summary(t.run_dir)
    failures: list[str] = []
    rows_total = sum(t.stage != "pretrain" for t in tasks)
    rows_written = 0
    start = time.perf_counter()

    def finish(task: _Task) -> None:
        nonlocal rows_written
        if task.stage == "pretrain":
            val = (task.summary.get("val") or {}).get("model") or {}
            log.info(
                "  pretrained %s seed %d: union top-1 %.2f (%.0f s)",
                task.cell.name, task.seed, val.get("top1", math.nan), task.summary.get("wall_s", 0),
            )  # fmt: skip
            return
        row = _row(task, preset, *sizes[task.cell.name])
        _append_row(csv_path, row)
        rows_written += 1
        log.info(
            "[%d/%d] %-32s %-17s seed %d: top-1 %.2f  (%.0f s; %.1f min elapsed)",
            rows_written, rows_total, task.cell.name, row["regime"], task.seed, row["top1"],
            row["wall_s"] or 0, (time.perf_counter() - start) / 60,
        )  # fmt: skip

    for t in [t for t in pending if t.summary is not None]:
        if t.stage == "pretrain" or t.after is None or t.after.summary is not None:
            pending.remove(t)
            finish(t)

    ctx = get_context("spawn")
    running: dict[Future, _Task] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker) as pool:
        while pending or running:
            while len(running) < jobs:
                ready = next((t for t in pending if t.after is None or t.after.summary is not None), None)
                if ready is None:
                    break
                pending.remove(ready)
                if ready.summary is not None:  # finished earlier; its pretraining is now known too
                    finish(ready)
                    continue
                ready.started = time.perf_counter()
                log.info("  start %s %s seed %d -> %s", ready.cell.name, ready.stage, ready.seed, ready.run_dir)
                running[pool.submit(_train_worker, ready.cfg)] = ready
            if not running:
                break
            done, _ = wait(running, timeout=heartbeat_s, return_when=FIRST_COMPLETED)
            if not done:
                log.info("  running: %s", "; ".join(_progress(t) for t in running.values()))
            for fut in done:
                task = running.pop(fut)
                try:
                    task.summary = fut.result()
                except Exception as e:  # one broken run must not stop the grid; it is reported at the end
                    failures.append(f"{task.cell.name} {task.stage} seed {task.seed}: {e}")
                    log.error("  FAILED %s %s seed %d: %s", task.cell.name, task.stage, task.seed, e)
                    pending = [t for t in pending if t.after is not task]
                    continue
                finish(task)
    log.info("pitfall %s: %d rows written in %.1f min", preset.name, rows_written, (time.perf_counter() - start) / 60)
    if failures:
        raise ParameterNetError(
            f"{len(failures)} run(s) failed, first: {failures[0]}; fix the cause and run the command again to resume"
        )


# ----- report: table and figure from the CSV alone -----


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: mean / sd of each regime, and the per-seed pretraining gain (mean, standard error, values)."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    out = []
    for rs in by_model.values():
        first = rs[0]
        entry = {k: first[k] for k in ("model", "width", "experts", "method", "macs", "params")}
        for regime in REGIMES:
            top = {r["seed"]: r["top1"] for r in rs if r["regime"] == regime}
            entry[regime] = top
        t, f = entry["target-only"], entry["pretrain-finetune"]
        entry["deltas"] = {s: round(f[s] - t[s], 2) for s in sorted(set(t) & set(f))}
        out.append(entry)
    out.sort(key=lambda e: (e["method"] != "static", e["width"], e["method"], e["experts"] or 0))
    return out


def _fmt(values: dict[int, float]) -> str:
    if not values:
        return "-"
    m, sd = _mean_sd(list(values.values()))
    return f"{m:.2f} ± {sd:.2f} ({len(values)})" if len(values) > 1 else f"{m:.2f} (1)"


def _fmt_delta(deltas: dict[int, float]) -> tuple[str, str]:
    if not deltas:
        return "-", "-"
    vals = list(deltas.values())
    m, sd = _mean_sd(vals)
    se = sd / math.sqrt(len(vals)) if len(vals) > 1 else math.nan
    main = f"{m:+.2f} ± {se:.2f}" if len(vals) > 1 else f"{m:+.2f}"
    return main, ", ".join(f"{v:+.2f}" for v in vals)


def _label(e: dict[str, Any]) -> str:
    if e["method"] == "static":
        return f"GhostNet-mini {e['width']:g}"
    kind = f"{e['experts']} experts" if e["method"] == "dynamic" else f"RepConv x{e['experts']}"
    return f"ParameterNet-mini {e['width']:g}, {kind}"


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| model | MACs | params | target-only top-1 | pretrain → fine-tune top-1 | gain (mean ± s.e.) "
        "| gain per seed |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        gain, per_seed = _fmt_delta(e["deltas"])
        lines.append(
            f"| {_label(e)} | {e['macs'] / 1e6:.2f}M | {e['params'] / 1e3:.1f}k | {_fmt(e['target-only'])} | "
            f"{_fmt(e['pretrain-finetune'])} | {gain} | {per_seed} |"
        )
    return "\n".join(lines)


def _plot(entries: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"target-only": "tab:blue", "pretrain-finetune": "tab:orange"}
    names = {"target-only": "target only", "pretrain-finetune": "pretrain → fine-tune"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw=dict(width_ratios=[1.2, 1]))
    static = sorted((e for e in entries if e["method"] == "static"), key=lambda e: e["macs"])
    for regime in REGIMES:
        pts = [(e["macs"] / 1e6, *_mean_sd(list(e[regime].values()))) for e in static if e[regime]]
        if pts:
            x, m, sd = zip(*pts)
            sd = [0 if math.isnan(v) else v for v in sd]
            ax.errorbar(x, m, yerr=sd, marker="o", color=colors[regime], capsize=3, label=f"GhostNet, {names[regime]}")
        for e in entries:
            if e["method"] == "static" or not e[regime]:
                continue
            m, sd = _mean_sd(list(e[regime].values()))
            main = e["method"] == "dynamic" and e["experts"] == 4
            if e["method"] == "dynamic" and not main:
                continue  # the ablation is in the right panel
            ax.errorbar(
                e["macs"] / 1e6, m, yerr=0 if math.isnan(sd) else sd, color=colors[regime], capsize=3,
                marker="*" if main else "D", markersize=14 if main else 7, linestyle="none",
                label=f"{'ParameterNet (4 experts)' if main else 'RepConv x4'}, {names[regime]}",
            )  # fmt: skip
    ax.set_xscale("log")
    macs = sorted({e["macs"] / 1e6 for e in entries})
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(macs))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("top-1 against MACs (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    gains = [e for e in entries if e["deltas"]]
    for i, e in enumerate(gains):
        vals = list(e["deltas"].values())
        m, sd = _mean_sd(vals)
        se = sd / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
        color = "tab:gray" if e["method"] == "static" else "tab:red"
        bx.bar(i, m, yerr=se, color=color, alpha=0.8, capsize=3, hatch="" if e["method"] == "static" else "//")
        bx.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
    bx.axhline(0, color="black", linewidth=0.8)
    bx.set_xticks(range(len(gains)))
    bx.set_xticklabels([_label(e).replace("-mini", "").replace(", ", "\n") for e in gains], rotation=60, fontsize=7)
    bx.set_ylabel("gain from pretraining (top-1 points)")
    bx.set_title("pretrain → fine-tune minus target-only\n(paired by seed: mean ± s.e.; dots = seeds)", fontsize=10)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(output: str | Path, preset: str | None = None) -> str:
    """Write ``table.md`` and ``pitfall.png`` from ``<output>/results.csv`` and return the table."""
    output = Path(output)
    csv_path = output / "results.csv"
    rows = read_rows(csv_path)
    if preset is not None:
        rows = [r for r in rows if r["preset"] == preset]
    if not rows:
        raise ParameterNetError(f"{str(csv_path)!r} holds no results for preset {preset!r}; run the grid first")
    entries = summarize(rows)
    table = markdown_table(entries)
    seeds = sorted({r["seed"] for r in rows})
    title = (
        "Low-FLOPs pitfall at CPU scale: target Fashion-MNIST 1k/class, pretraining MNIST + Fashion-MNIST\n"
        f"(preset {rows[0]['preset']}: {len(rows)} runs, seeds {seeds[0]}-{seeds[-1]}; test top-1 on Fashion-MNIST)"
    )
    _plot(entries, output / "pitfall.png", title)
    text = (
        f"{table}\n\nTop-1 on the Fashion-MNIST test set (10,000 images): mean ± sd over seeds (number of seeds). "
        "Gain = pretrain → fine-tune minus target-only, paired by seed: mean ± standard error, then each seed's "
        f"value. MACs and params at {rows[0]['img_size']} px; RepConv MACs after merging (its training graph is "
        f"larger). {len(rows)} runs of preset {rows[0]['preset']!r}.\n"
    )
    (output / "table.md").write_text(text)
    return text
