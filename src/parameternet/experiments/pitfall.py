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
built around the width it settled on (:func:`design`). Every row records the git commit, a dirty flag and the
package version; resuming skips only rows made by the same code, and the report never pools rows of one cell
from different code unless asked to.

Every training is one ``parameternet train`` run in its own directory under ``runs_dir``, named by the model,
seed and a hash of its resolved recipe; runs resume from their last checkpoint. Each finished row is appended to
``<output>/results.csv`` at once, with routing diagnostics of every dynamic model in ``routing.csv``; ``report``
rebuilds ``table.md`` and ``pitfall.png`` from the CSVs alone. Runs go to worker processes with one torch thread
each (``jobs`` of them side by side).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.provenance import code_id, provenance, rows_of_this_code
from parameternet.experiments.rows import append_rows
from parameternet.experiments.workers import forward_stop, init_worker, interrupted, worker_task

__all__ = [
    "COLUMNS",
    "CRITERIA",
    "PRESETS",
    "REGIMES",
    "ROUTING_COLUMNS",
    "Cell",
    "Preset",
    "design",
    "gate_decision",
    "read_rows",
    "report",
    "run_pitfall",
    "summarize",
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

UNION_PER_CLASS = 6000  # the union's training split: 20 classes x 6,000 images
GATE_MAX_GAIN = 0.5  # a baseline whose gain exceeds this on every gate seed is not in the pitfall

# The verdict, stated before the runs (docs/experiments/pitfall.md); gains in top-1 points.
CRITERIA = {
    "pitfall_max_gain": 0.2,  # the pitfall exists when A's mean gain <= this
    "remedy_min": 0.5,  # reproduced: gain(B) - gain(A) >= this, Welch one-sided p < alpha, gain(B) > 0, ...
    "alpha": 0.05,  # ... and RepConv's gain(C) - gain(A) not significant at alpha
    "refute_upper90": 0.3,  # refuted: the pitfall exists and the 90% interval of the remedy ends below this
    "power": 0.8,  # "not resolved": seeds per model for this power to detect remedy_min at alpha
}


# ----- cells: a small grammar for the models of the grid -----

_TOKEN = re.compile(r"^(w|h|e|pre|pe|rlr|rwd)(\d+(?:\.\d+)?)$")
_KEYS = {
    "w": "width", "h": "head_chs", "e": "experts", "pre": "pretrain_fraction", "pe": "pretrain_epochs",
    "rlr": "router_lr_scale", "rwd": "router_weight_decay",
}  # fmt: skip


def scaled_head(width: float) -> int:
    """The head width that scales with the network: 256 x width, a multiple of 8 (about GhostNet-300M's share)."""
    return max(8, round(256 * width / 8) * 8)


@dataclass(frozen=True)
class Cell:
    """One model of the grid and its pretraining variant.

    ``family`` is ``ghostnet`` (static convs) or ``parameternet`` (``method`` dynamic or repconv with ``experts``);
    ``router`` is the dynamic convs' router; ``pretrain_fraction`` of the union's images per class and
    ``pretrain_epochs`` (None: the recipe's 3) change the pretraining only.
    """

    family: str
    width: float
    head_chs: int
    experts: int | None = None
    method: str = "static"
    router: str = "linear-sigmoid"
    pretrain_fraction: float = 1.0
    pretrain_epochs: int | None = None
    router_lr_scale: float = 1.0
    router_weight_decay: float | None = None

    @classmethod
    def parse(cls, name: str) -> Cell:
        """The cell a name describes, e.g. ``parameternet-w0.25-h64-e4-softmax-pre0.5``; raises on a bad name.

        The head width defaults to :func:`scaled_head` and the experts to 4; :attr:`name` is the canonical spelling.
        """
        family, *tokens = name.split("-")
        if family not in ("ghostnet", "parameternet"):
            raise ParameterNetError(f"model {name!r} must start with ghostnet- or parameternet-")
        fields: dict[str, Any] = {"family": family}
        for token in tokens:
            if token in ("repconv", "softmax"):
                fields["method" if token == "repconv" else "router"] = (
                    "repconv" if token == "repconv" else "mlp-softmax"
                )
                continue
            m = _TOKEN.match(token)
            if m is None:
                raise ParameterNetError(
                    f"model {name!r} has an unknown part {token!r}; write e.g. ghostnet-w0.25-h64 or "
                    "parameternet-w0.25-h64-e4 (options: -repconv, -softmax, -pre0.5, -pe9, -rlr10, -rwd0)"
                )
            key, value = _KEYS[m.group(1)], float(m.group(2))
            fields[key] = int(value) if key in ("head_chs", "experts", "pretrain_epochs") else value
        if "width" not in fields:
            raise ParameterNetError(f"model {name!r} names no width; add e.g. -w0.25")
        fields.setdefault("head_chs", scaled_head(fields["width"]))
        if family == "parameternet":
            fields.setdefault("experts", 4)
            fields.setdefault("method", "dynamic")
        elif any(k in fields for k in ("experts", "method", "router", "router_lr_scale", "router_weight_decay")):
            raise ParameterNetError(f"model {name!r}: a ghostnet cell has static convs; use parameternet- for experts")
        cell = cls(**fields)
        if not 0 < cell.pretrain_fraction <= 1 or cell.width <= 0 or (cell.pretrain_epochs or 1) < 1:
            raise ParameterNetError(f"model {name!r}: width > 0, 0 < pre <= 1 and pe >= 1 are required")
        return cell

    @property
    def name(self) -> str:
        parts = [self.family, f"w{self.width:g}", f"h{self.head_chs}"]
        if self.family == "parameternet":
            parts.append(f"e{self.experts}")
            if self.method == "repconv":
                parts.append("repconv")
            if self.router == "mlp-softmax":
                parts.append("softmax")
            if self.router_lr_scale != 1.0:
                parts.append(f"rlr{self.router_lr_scale:g}")
            if self.router_weight_decay is not None:
                parts.append(f"rwd{self.router_weight_decay:g}")
        if self.pretrain_fraction != 1.0:
            parts.append(f"pre{self.pretrain_fraction:g}")
        if self.pretrain_epochs is not None:
            parts.append(f"pe{self.pretrain_epochs}")
        return "-".join(parts)

    @property
    def base(self) -> Cell:
        """The same model with the default pretraining (whose target-only runs this cell shares)."""
        return dataclasses.replace(self, pretrain_fraction=1.0, pretrain_epochs=None)

    @property
    def timm_model(self) -> str:
        return f"{self.family}_mini"

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"width": self.width, "head_chs": self.head_chs}
        if self.family == "parameternet":
            kwargs["num_experts"] = self.experts
            if self.method == "repconv":
                kwargs["method"] = "repconv"
            if self.router != "linear-sigmoid":
                kwargs["router"] = self.router
        return kwargs

    def overrides(self) -> list[str]:
        out = [f"model={self.timm_model}", *(f"model_kwargs.{k}={v}" for k, v in self.model_kwargs().items())]
        if self.router_lr_scale != 1.0:
            out.append(f"optim.router_lr_scale={self.router_lr_scale}")
        if self.router_weight_decay is not None:
            out.append(f"optim.router_weight_decay={self.router_weight_decay}")
        return out


def static_cell(width: float, head_chs: int | None = None) -> Cell:
    return Cell("ghostnet", width, head_chs or scaled_head(width))


def dynamic_cell(width: float, experts: int = 4, head_chs: int | None = None, **kw: Any) -> Cell:
    return Cell("parameternet", width, head_chs or scaled_head(width), experts, kw.pop("method", "dynamic"), **kw)


# ----- presets: the gate, then the grid around the width it settled on -----

Grid = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Preset:
    """A grid (cell name, seeds) in run order, made by ``grid(width)`` for the smallest baseline's width.

    ``gate`` lists candidate widths for that baseline, largest first; with ``gate_seeds`` each candidate is run
    in both regimes and kept unless its gain exceeds :data:`GATE_MAX_GAIN` on every seed. Without a gate the
    width is ``width``. ``overrides`` apply to every stage, then ``pretrain_overrides`` or ``target_overrides``
    (target-only and fine-tune).
    """

    name: str
    grid: Callable[[float], Grid]
    width: float = 0.25
    gate: tuple[float, ...] = ()
    gate_seeds: tuple[int, ...] = (0, 1, 2)
    overrides: tuple[str, ...] = ()
    pretrain_overrides: tuple[str, ...] = ()
    target_overrides: tuple[str, ...] = ()
    description: str = ""
    # a grid that checks the command runs, not the science: its report says so first
    wiring_check: bool = False


def twin_width(cell: Cell, img_size: int = 28) -> float:
    """The static width (a multiple of 1/16, scaled head) whose parameter count is closest to ``cell``'s."""
    target = _profile_cell(cell, img_size)[0]
    widths = [k / 16 for k in range(max(1, round(cell.width * 16)), round(cell.width * 16) * 4 + 1)]
    return min(widths, key=lambda w: abs(_profile_cell(static_cell(w), img_size)[0] - target))


def design(width: float) -> Grid:
    """The full grid around the smallest in-pitfall baseline A (``ghostnet-w<width>``), in run order.

    A and its ParameterNet B (4 experts) at 8 seeds; RepConv x4 at A's size (C, the paper's Table 6 control); a
    static model D with about B's parameters at about twice the MACs; the pretraining-size sweep for A and B (a
    quarter and half of the union, and 3x the epochs); the paper text's router (``mlp-softmax``) as a variant of B;
    1, 2 and 8 experts. 4 seeds for all but A and B. The essential cells come first, seed by seed.
    """
    a, b = static_cell(width), dynamic_cell(width)
    c = dynamic_cell(width, method="repconv")
    d = static_cell(twin_width(b))
    grid: list[tuple[str, tuple[int, ...]]] = []
    grid += [(cell.name, (s,)) for s in range(4) for cell in (a, b)]
    grid += [(cell.name, (s,)) for s in range(4) for cell in (c, d)]
    grid += [(cell.name, (s,)) for s in range(4, 8) for cell in (a, b)]
    for variant in ({"pretrain_fraction": 0.25}, {"pretrain_fraction": 0.5}, {"pretrain_epochs": 9}):
        grid += [(dataclasses.replace(cell, **variant).name, (0, 1, 2, 3)) for cell in (a, b)]
    grid.append((dynamic_cell(width, router="mlp-softmax").name, (0, 1, 2, 3)))
    grid += [(dynamic_cell(width, e).name, (0, 1, 2, 3)) for e in (1, 2, 8)]
    return tuple(grid)


def _quick(width: float) -> Grid:
    return ((static_cell(width).name, (0,)), (dynamic_cell(width).name, (0,)))


def _smoke(width: float) -> Grid:
    return (
        (static_cell(width).name, (0,)),
        (dynamic_cell(width, 2).name, (0,)),
        (dataclasses.replace(static_cell(width), pretrain_fraction=0.5).name, (0,)),
    )


def _head256(width: float) -> Grid:
    """The first version's grid (head 256 at every width), rerun at the current code for comparison."""
    cells = [static_cell(w, 256) for w in (0.25, 0.5, 1.0)] + [dynamic_cell(0.25, 4, 256)]
    return tuple((c.name, (s,)) for s in (0, 1, 2) for c in cells)


PRESETS = {
    "full": Preset(
        "full",
        design,
        gate=(0.25, 0.1875, 0.125),
        description="gate for the smallest in-pitfall GhostNet-mini, then A/B at 8 seeds, RepConv, a static twin "
        "of B's size, the pretraining-size sweep, the softmax router and 1/2/8 experts at 4 seeds",
    ),
    "quick": Preset(
        "quick",
        _quick,
        width=0.1875,  # the width the full preset's gate settled on (results/pitfall/gate.json)
        description="A (GhostNet-mini 0.1875) vs B (its ParameterNet), one seed, the full recipes",
    ),
    "head256": Preset(
        "head256", _head256, description="the first version's family (a 256-channel head at every width), 3 seeds"
    ),
    # A wiring check for tests and CI: a gate and three cells, two steps each on a few tiny images.
    "smoke": Preset(
        "smoke",
        _smoke,
        gate=(0.25, 0.125),
        gate_seeds=(0,),
        overrides=("img_size=16", "batch_size=8", "eval_batch_size=50", "max_steps=2", "ckpt_every_epochs=0"),
        pretrain_overrides=("data.train=union:train:per_class=2", "data.val=union:test:per_class=1"),
        target_overrides=("data.train=fashion-mnist:train:per_class=4", "data.val=fashion-mnist:test:per_class=5"),
        description="a gate and three cells, two steps each, 16 px: checks the command, not the science",
        wiring_check=True,
    ),
}


def gate_decision(gains: dict[int, float]) -> bool:
    """True when a baseline is in the pitfall: its gain is not above :data:`GATE_MAX_GAIN` on every seed."""
    return not gains or not all(g > GATE_MAX_GAIN for g in gains.values())


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
    started: float = 0.0

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
    if stage == "pretrain" and cell.pretrain_epochs is not None:
        overrides.append(f"epochs={cell.pretrain_epochs}")
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


def _finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that completed earlier (its final weights and summary.json exist), else None."""
    summary = run_dir / "summary.json"
    if summary.is_file() and (run_dir / "checkpoints" / "final.safetensors").is_file():
        return json.loads(summary.read_text())
    return None


def _routing(cfg_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """Routing diagnostics of a finished run's final weights on its evaluation set; cached in ``routing.json``."""
    import torch

    from parameternet.data.images import build_dataset
    from parameternet.data.pipeline import LoaderDataset, collate
    from parameternet.profiling.routing import routing_stats
    from parameternet.train.checkpoint import load_into, load_weights, resolve_weights
    from parameternet.train.config import config_from_dict
    from parameternet.train.trainer import build_transforms, create_model

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


@worker_task
def _train_worker(cfg_dict: dict[str, Any], diagnose: bool) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """Run one recipe in a worker process (one torch thread); return its summary and routing diagnostics."""
    from parameternet.train.config import config_from_dict
    from parameternet.train.trainer import train

    summary = train(config_from_dict(cfg_dict).validate())
    return summary, (_routing(cfg_dict) if diagnose else None)


def _profile_cell(cell: Cell, img_size: int) -> tuple[int, int]:
    """(training parameters, inference MACs) at ``img_size``; RepConv merges into the static twin for inference."""
    import timm

    import parameternet.models  # noqa: F401
    from parameternet.profiling.measure import profile

    result = profile(timm.create_model(cell.timm_model, **cell.model_kwargs()), img_size=img_size)
    if cell.method == "repconv":
        static = static_cell(cell.width, cell.head_chs)
        return result.params, _profile_cell(static, img_size)[1]
    return result.params, result.macs


# ----- CSV files -----

_INTS = ("head_chs", "experts", "pretrain_epochs", "macs", "params", "img_size", "seed", "steps")
_FLOATS = (
    "width", "pretrain_fraction", "top1", "top5", "epochs", "wall_s", "pretrain_top1", "pretrain_wall_s",
    "route_coef_std", "route_kernel_dist", "coef_mean", "coef_std", "kernel_dist",
)  # fmt: skip


def read_rows(csv_path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results CSV with numbers parsed (missing file: no rows)."""
    path = Path(csv_path)
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k in _INTS:
                if k in row:
                    row[k] = int(float(row[k])) if row[k] not in (None, "") else None
            for k in _FLOATS:
                if k in row:
                    row[k] = float(row[k]) if row[k] not in (None, "") else None
            out.append(row)
    return out


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


def _progress(task: _Task) -> str:
    """``step k`` of a running task from its metrics.jsonl (written every ``log_every`` steps)."""
    path = task.run_dir / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines()[-5:]:
            try:
                step = max(step, json.loads(line).get("step", 0))
            except json.JSONDecodeError:
                continue
    return f"{task.cell.name} {task.stage} s{task.seed} step {step} ({time.perf_counter() - task.started:.0f} s)"


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
        self._last_heartbeat = time.perf_counter()

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
        """Run ``tasks`` in the worker pool, writing each row as it lands.

        On SIGINT / SIGTERM no new run starts, the running ones save a checkpoint (the stop is passed on to them
        with :func:`~parameternet.experiments.workers.forward_stop`, whether or not they got the signal too) and
        :class:`RunInterrupted` is raised once they have, naming any run that could not save; the same command
        resumes. A second signal exits at once.
        """
        from tqdm.auto import tqdm

        from parameternet.runs import RunInterrupted, StopSignal

        pending = list(tasks)
        for t in pending:  # runs that finished before the CSV row was written (a crash in between)
            t.summary = _finished_summary(t.run_dir)
        failures: list[str] = []
        unsaved: list[str] = []  # runs that ended without saving after a stop
        fresh: list[str] = []  # runs stopped before their first step
        start = time.perf_counter()
        for t in [t for t in pending if t.summary is not None]:
            if t.stage == "pretrain" or t.after is None or t.after.summary is not None:
                pending.remove(t)
                self._finish(t)

        ctx = get_context("spawn")
        running: dict[Future, _Task] = {}
        bar = tqdm(total=len(pending), desc=f"pitfall {self.preset.name}", unit="run", disable=None, leave=False)
        forwarded = False
        with (
            bar,
            StopSignal() as stop,
            ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=init_worker) as pool,
        ):
            while pending or running:
                if stop.requested:
                    pending.clear()
                    if not forwarded:
                        forward_stop(pool)
                        forwarded = True
                while len(running) < self.jobs and not stop.requested:
                    ready = next((t for t in pending if t.after is None or t.after.summary is not None), None)
                    if ready is None:
                        break
                    pending.remove(ready)
                    if ready.summary is not None:  # finished earlier; its pretraining is now known too
                        self._finish(ready)
                        continue
                    ready.started = time.perf_counter()
                    log.info("  start %s -> %s", ready.name, ready.run_dir)
                    diagnose = ready.cell.method == "dynamic" and ready.stage != "pretrain"
                    running[pool.submit(_train_worker, ready.cfg, diagnose)] = ready
                if not running:
                    break
                finished, _ = wait(running, timeout=min(self.heartbeat_s, 1.0), return_when=FIRST_COMPLETED)
                now = time.perf_counter()
                if not finished and now - self._last_heartbeat >= self.heartbeat_s:
                    self._last_heartbeat = now
                    log.info("  running: %s", "; ".join(_progress(t) for t in running.values()))
                for fut in finished:
                    task = running.pop(fut)
                    bar.update(1)
                    try:
                        task.summary, task.routing = fut.result()
                    except RunInterrupted as e:
                        log.warning("  %s: %s", task.name, e)
                        if e.checkpoint is None:
                            fresh.append(task.name)
                        continue
                    except Exception as e:  # one broken run must not stop the grid; it is reported at the end
                        if stop.requested:  # a worker stopped before its trainer could take the signal
                            log.warning("  %s stopped without saving: %s", task.name, e)
                            unsaved.append(task.name)
                            continue
                        failures.append(f"{task.name}: {e}")
                        log.error("  FAILED %s: %s", task.name, e)
                        pending = [t for t in pending if t.after is not task]
                        continue
                    self._finish(task)
        log.info("pitfall %s: %.1f min", self.preset.name, (time.perf_counter() - start) / 60)
        if stop.requested:
            raise interrupted(stop.signum, unsaved, fresh)
        if failures:
            raise ParameterNetError(
                f"{len(failures)} run(s) failed, first: {failures[0]}; fix the cause and run the command again"
            )


def read_rows_from_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A row as :func:`read_rows` would return it after a CSV round trip (strings for the text columns)."""
    out = {k: row.get(k, "") for k in COLUMNS}
    for k in _INTS:
        out[k] = int(out[k]) if out[k] not in (None, "") else None
    for k in _FLOATS:
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
        gains = runner.gains(cell)
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
    record.update(tried=tried, **runner.prov)
    runner.output.mkdir(parents=True, exist_ok=True)
    (runner.output / "gate.json").write_text(json.dumps(record, indent=2) + "\n")
    return width


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
    report. ``models`` replaces the grid by these cells (no gate), with ``seeds`` 0..N-1 (default 3).

    Raises :class:`ParameterNetError` for an unknown preset, a bad cell name or count, or failed runs.
    """
    if preset not in PRESETS:
        raise ParameterNetError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    if jobs < 1:
        raise ParameterNetError(f"jobs={jobs} is invalid; use 1 or more parallel runs")
    if seeds is not None and seeds < 1:
        raise ParameterNetError(f"seeds={seeds} is invalid; use 1 or more")
    cells = [Cell.parse(m) for m in models or ()]
    p = PRESETS[preset]
    output = Path(output) if output is not None else default_output(preset)
    from parameternet.runs import RunLock

    with RunLock(output, "pitfall results"):  # one writer of results.csv; each run also locks its own directory
        runner = _Runner(p, output, Path(runs_dir), jobs, heartbeat_s)
        if cells:
            grid = tuple((c.name, tuple(range(seeds or 3))) for c in cells)
        else:
            width = _run_gate(runner) if p.gate else p.width
            grid = p.grid(width)
            if seeds is not None:
                grid = tuple((n, tuple(range(seeds))) for n in dict.fromkeys(n for n, _ in grid))
        runner.run(grid)
        return report(output, preset=p.name)


def default_output(preset: str) -> Path:
    """``results/pitfall`` for the full preset (committed), ``runs/pitfall-<preset>`` for the others."""
    return Path("results/pitfall") if preset == "full" else Path(f"runs/pitfall-{preset}")


# ----- report: statistics, verdict, table and figure from the CSV alone -----


def _gains(rows: list[dict[str, Any]], name: str) -> dict[int, float]:
    """Pretrain -> fine-tune minus target-only top-1 of cell ``name``, paired by seed (target-only from its base)."""
    base = Cell.parse(name).base.name
    target = {r["seed"]: r["top1"] for r in rows if r["model"] == base and r["regime"] == "target-only"}
    fine = {r["seed"]: r["top1"] for r in rows if r["model"] == name and r["regime"] == "pretrain-finetune"}
    return {s: round(fine[s] - target[s], 2) for s in sorted(set(target) & set(fine))}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: its size, the top-1 of each regime by seed, the gains paired by seed and their statistics."""
    from parameternet.experiments.stats import summary

    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        cell = Cell.parse(name)
        first = next(r for r in rows if r["model"] == name)
        entry: dict[str, Any] = {"cell": cell, "name": name, "macs": first["macs"], "params": first["params"]}
        base = cell.base.name
        entry["target-only"] = {
            r["seed"]: r["top1"] for r in rows if r["model"] == base and r["regime"] == "target-only"
        }
        entry["pretrain-finetune"] = {
            r["seed"]: r["top1"] for r in rows if r["model"] == name and r["regime"] == "pretrain-finetune"
        }
        entry["gains"] = _gains(rows, name)
        entry["gain"] = summary(list(entry["gains"].values()))
        route = [r["route_kernel_dist"] for r in rows if r["model"] == name and r.get("route_kernel_dist") is not None]
        entry["kernel_dist"] = sum(route) / len(route) if route else None
        out.append(entry)
    out.sort(
        key=lambda e: (
            e["cell"].family != "ghostnet", e["cell"].width, e["cell"].method, e["cell"].router,
            e["cell"].experts or 0, e["cell"].pretrain_fraction, e["cell"].pretrain_epochs or 0,
        )
    )  # fmt: skip
    return out


def verdict(entries: list[dict[str, Any]], width: float) -> dict[str, Any]:
    """The pre-stated reading (:data:`CRITERIA`) for A = ``ghostnet-w<width>``, B its 4-expert ParameterNet and C
    its RepConv x4: ``{"pitfall", "remedy", "repconv", "verdict", "seeds_needed", ...}``."""
    from parameternet.experiments.stats import seeds_for_power, welch

    by = {e["name"]: e for e in entries}
    a, b = by.get(static_cell(width).name), by.get(dynamic_cell(width).name)
    c = by.get(dynamic_cell(width, method="repconv").name)
    out: dict[str, Any] = {"A": static_cell(width).name, "B": dynamic_cell(width).name}
    if a is None or b is None or a["gain"].n < 2 or b["gain"].n < 2:
        out.update(verdict="not resolved", reason="A or B has fewer than two seeds with both regimes")
        return out
    ga, gb = list(a["gains"].values()), list(b["gains"].values())
    remedy = welch(gb, ga)
    rep = welch(list(c["gains"].values()), ga) if c is not None else None
    k = CRITERIA
    pitfall = a["gain"].mean <= k["pitfall_max_gain"]
    rep_significant = rep is not None and rep.p_greater < k["alpha"]
    reproduced = (
        remedy.diff >= k["remedy_min"] and remedy.p_greater < k["alpha"] and b["gain"].mean > 0 and not rep_significant
    )
    refuted = pitfall and remedy.ci90[1] < k["refute_upper90"]
    out.update(
        pitfall=pitfall,
        gain_a=a["gain"],
        gain_b=b["gain"],
        remedy=remedy,
        repconv=rep,
        repconv_significant=rep_significant,
        verdict="reproduced" if reproduced else "refuted" if refuted else "not resolved",
    )
    if not (reproduced or refuted):
        out["seeds_needed"] = seeds_for_power([a["gain"].sd, b["gain"].sd], k["remedy_min"], k["alpha"], k["power"])
    return out


def _label(cell: Cell) -> str:
    if cell.family == "ghostnet":
        text = f"GhostNet-mini {cell.width:g} (head {cell.head_chs})"
    else:
        kind = f"RepConv x{cell.experts}" if cell.method == "repconv" else f"{cell.experts} experts"
        if cell.router == "mlp-softmax":
            kind += ", softmax router"
        if cell.router_lr_scale != 1.0:
            kind += f", router lr x{cell.router_lr_scale:g}"
        if cell.router_weight_decay is not None:
            kind += f", router wd {cell.router_weight_decay:g}"
        text = f"ParameterNet-mini {cell.width:g} (head {cell.head_chs}), {kind}"
    if cell.pretrain_fraction != 1.0:
        text += f"; pretrain on {cell.pretrain_fraction:g} of the union"
    if cell.pretrain_epochs is not None:
        text += f"; pretrain {cell.pretrain_epochs} epochs"
    return text


def _fmt_top1(values: dict[int, float]) -> str:
    from parameternet.experiments.stats import summary

    if not values:
        return "-"
    s = summary(list(values.values()))
    return f"{s.mean:.2f} ± {s.sd:.2f} ({s.n})" if s.n > 1 else f"{s.mean:.2f} (1)"


def markdown_table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| model | MACs | params | target-only top-1 | pretrain → fine-tune top-1 | gain: mean ± s.e. [95% CI] "
        "| gain per seed | kernel dist. |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for e in entries:
        g = e["gain"]
        if g.n > 1:
            gain = f"{g.mean:+.2f} ± {g.se:.2f} [{g.low:+.2f}, {g.high:+.2f}]"
        else:
            gain = f"{g.mean:+.2f}" if g.n else "-"
        per_seed = ", ".join(f"{v:+.2f}" for v in e["gains"].values()) or "-"
        dist = f"{e['kernel_dist']:.3f}" if e["kernel_dist"] is not None else "-"
        lines.append(
            f"| {_label(e['cell'])} | {e['macs'] / 1e6:.3f}M | {e['params'] / 1e3:.1f}k "
            f"| {_fmt_top1(e['target-only'])} | {_fmt_top1(e['pretrain-finetune'])} | {gain} | {per_seed} | {dist} |"
        )
    return "\n".join(lines)


def _verdict_text(v: dict[str, Any]) -> str:
    k = CRITERIA
    lines = [f"**Verdict (criteria stated before the runs): {v['verdict']}.**", ""]
    if "remedy" not in v:
        return "\n".join([*lines, f"- {v['reason']}."])
    ga, gb, r = v["gain_a"], v["gain_b"], v["remedy"]
    lines += [
        f"- Pitfall (A = {v['A']}): gain {ga.mean:+.2f} ± {ga.se:.2f} over {ga.n} seeds, 95% CI [{ga.low:+.2f}, "
        f"{ga.high:+.2f}]; it {'exists' if v['pitfall'] else 'does not exist'} by the criterion "
        f"(mean gain <= +{k['pitfall_max_gain']}).",
        f"- B = {v['B']}: gain {gb.mean:+.2f} ± {gb.se:.2f} over {gb.n} seeds.",
        f"- Remedy = gain(B) - gain(A) = {r.diff:+.2f} ± {r.se:.2f}; 90% CI [{r.ci90[0]:+.2f}, {r.ci90[1]:+.2f}], "
        f"95% CI [{r.ci95[0]:+.2f}, {r.ci95[1]:+.2f}]; one-sided Welch p = {r.p_greater:.3f}.",
    ]
    rep = v["repconv"]
    if rep is None:
        lines.append("- RepConv control: fewer than two seeds, so not significant by construction.")
    else:
        lines.append(
            f"- RepConv control: gain(C) - gain(A) = {rep.diff:+.2f} ± {rep.se:.2f}, one-sided Welch p = "
            f"{rep.p_greater:.3f} ({'significant' if v['repconv_significant'] else 'not significant'} at "
            f"{k['alpha']})."
        )
    if v.get("seeds_needed"):
        lines.append(
            f"- Not resolved: about {v['seeds_needed']} seeds per model would give a one-sided Welch test at "
            f"alpha {k['alpha']} {k['power']:.0%} power to detect a remedy of +{k['remedy_min']} with the spreads seen."
        )
    return "\n".join(lines)


def _sweep_text(entries: list[dict[str, Any]], width: float) -> str:
    rows = []
    for base in (static_cell(width), dynamic_cell(width)):
        variants = [e for e in entries if e["cell"].base == base]
        for e in sorted(variants, key=lambda e: (e["cell"].pretrain_fraction, e["cell"].pretrain_epochs or 3)):
            c, g = e["cell"], e["gain"]
            images = round(UNION_PER_CLASS * 20 * c.pretrain_fraction)
            gain = f"{g.mean:+.2f} ± {g.se:.2f} ({g.n})" if g.n > 1 else (f"{g.mean:+.2f} (1)" if g.n else "-")
            rows.append(f"| {_label(base)} | {images:,} | {c.pretrain_epochs or 3} | {gain} |")
    if len(rows) <= 2:
        return ""
    head = "| model | pretraining images | pretraining epochs | gain (mean ± s.e., seeds) |\n|---|---:|---:|---:|"
    return "Pretraining-size sweep:\n\n" + head + "\n" + "\n".join(rows)


def _routing_text(output: Path, code: str | None) -> str:
    rows = [r for r in read_rows(output / "routing.csv") if code is None or code_id(r) == code]
    if not rows:
        return ""
    by_model: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_model.setdefault((r["model"], r["regime"]), []).append(r)
    lines = [
        "Routing of the trained dynamic models on the Fashion-MNIST test set (medians over layers, then means over "
        "seeds): the spread of each coefficient across images, and the per-image kernel's relative distance from "
        "the mean kernel (0 = one fixed kernel).",
        "",
        "| model | regime | seeds | coefficient sd | kernel distance | layers with kernel distance < 0.05 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (model, regime), rs in sorted(by_model.items()):
        seeds = sorted({r["seed"] for r in rs})
        per_seed = [[r for r in rs if r["seed"] == s] for s in seeds]

        def med(group: list[dict], key: str) -> float:
            vals = sorted(r[key] for r in group)
            return vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2

        sd = sum(med(g, "coef_std") for g in per_seed) / len(per_seed)
        dist = sum(med(g, "kernel_dist") for g in per_seed) / len(per_seed)
        static = sum(sum(r["kernel_dist"] < 0.05 for r in g) / len(g) for g in per_seed) / len(per_seed)
        lines.append(f"| {model} | {regime} | {len(seeds)} | {sd:.4f} | {dist:.4f} | {static:.0%} |")
    return "\n".join(lines)


def _plot(entries: list[dict[str, Any]], path: Path, title: str, width: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=[1.2, 1]))
    main = [e for e in entries if e["gain"].n and e["cell"].base == e["cell"]]

    def errorbars(axis, points, **kw):
        if points:
            x, m, se = zip(*sorted(points))
            axis.errorbar(x, m, yerr=[0 if math.isnan(s) else s for s in se], capsize=3, **kw)

    static = [(e["macs"] / 1e6, e["gain"].mean, e["gain"].se) for e in main if e["cell"].family == "ghostnet"]
    dyn = [e for e in main if e["cell"].family == "parameternet"]
    four = [
        e for e in dyn if e["cell"].method == "dynamic" and e["cell"].experts == 4 and e["cell"].router != "mlp-softmax"
    ]
    errorbars(ax, static, marker="o", color="tab:blue", label="GhostNet-mini (static)")
    errorbars(
        ax, [(e["macs"] / 1e6, e["gain"].mean, e["gain"].se) for e in four], marker="*", markersize=12,
        color="tab:red", label="ParameterNet-mini, 4 experts",
    )  # fmt: skip
    for e in dyn:
        if e in four:
            continue
        c = e["cell"]
        label = "RepConv x4" if c.method == "repconv" else ("softmax router" if c.router == "mlp-softmax" else None)
        label = label or f"{c.experts} experts"
        ax.errorbar(e["macs"] / 1e6, e["gain"].mean, yerr=0 if math.isnan(e["gain"].se) else e["gain"].se,
                    marker="D", linestyle="none", capsize=3, label=f"{label} (w {c.width:g})")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(CRITERIA["pitfall_max_gain"], color="gray", linewidth=0.8, linestyle="--", label="pitfall threshold")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(sorted({e["macs"] / 1e6 for e in main})))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("gain from pretraining (top-1 points)")
    ax.set_title("pretrain → fine-tune minus target-only\n(paired by seed: mean ± s.e.)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    if width is not None:
        for base, color in ((static_cell(width), "tab:blue"), (dynamic_cell(width), "tab:red")):
            pts = [
                (20 * UNION_PER_CLASS * e["cell"].pretrain_fraction, e["gain"].mean, e["gain"].se)
                for e in entries
                if e["cell"].base == base and e["cell"].pretrain_epochs is None and e["gain"].n
            ]
            errorbars(bx, pts, marker="o", color=color, label=f"{_label(base)}")
            longer = [e for e in entries if e["cell"].base == base and e["cell"].pretrain_epochs and e["gain"].n]
            for e in longer:
                x = 20 * UNION_PER_CLASS * e["cell"].pretrain_fraction * 1.08
                se = 0 if math.isnan(e["gain"].se) else e["gain"].se
                label = f"{_label(base)}, {e['cell'].pretrain_epochs} epochs"
                bx.errorbar(x, e["gain"].mean, yerr=se, color=color, marker="^", capsize=3, label=label)
        bx.set_xscale("log")
        bx.axhline(0, color="black", linewidth=0.8)
        bx.set_xlabel("pretraining images (log scale)")
        bx.set_ylabel("gain from pretraining (top-1 points)")
        bx.set_title("gain against the size of the pretraining set", fontsize=10)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
    else:
        bx.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(output: str | Path, preset: str | None = None, pool_commits: bool = False) -> str:
    """Write ``table.md`` and ``pitfall.png`` from ``<output>/results.csv`` (and ``routing.csv``) and return the text.

    Rows of one preset made by different code are not pooled: the report uses the code version with the most
    rows and says how many rows it left out, unless ``pool_commits``. Raises :class:`ParameterNetError` when the
    CSV holds no rows of ``preset``.
    """
    output = Path(output)
    csv_path = output / "results.csv"
    rows = read_rows(csv_path)
    presets = sorted({r.get("preset") for r in rows} - {None})
    if preset is not None:
        rows = [r for r in rows if r.get("preset") == preset]
    if not rows:
        if presets:
            raise ParameterNetError(
                f"{str(csv_path)!r} holds no results for preset {preset!r}, only for {', '.join(presets)}; "
                "pass --preset accordingly"
            )
        raise ParameterNetError(f"{str(csv_path)!r} holds no results; run the grid first (or check --output)")
    codes: dict[str, int] = {}
    for r in rows:
        codes[code_id(r)] = codes.get(code_id(r), 0) + 1
    code = None if pool_commits else max(codes, key=codes.get)
    note = ""
    if code is not None:
        left_out = len(rows) - codes[code]
        rows = [r for r in rows if code_id(r) == code]
        note = f"All {len(rows)} rows from code {code} (version {rows[0]['version']})."
        if left_out:
            note += f" {left_out} rows from other code were left out (`--pool-commits` pools them)."
    else:
        note = f"Rows pooled across code versions {', '.join(codes)} (--pool-commits)."
    entries = summarize(rows)
    gate_path = output / "gate.json"
    gate = json.loads(gate_path.read_text()) if gate_path.is_file() else None
    width = gate["settled_width"] if gate and gate.get("preset") == rows[0]["preset"] else None
    if width is None and preset in PRESETS and not PRESETS[preset].gate:
        width = PRESETS[preset].width
    parts = [markdown_table(entries), ""]
    for shown in (PRESETS[n] for n in sorted({r.get("preset") for r in rows} & set(PRESETS))):
        if not shown.wiring_check:
            continue
        parts[:0] = [
            f"**A wiring check, not results.** Preset {shown.name}: {shown.description}. Its top-1 and gains show "
            "that every stage ran and was scored; they say nothing about the low-FLOPs pitfall. For results run "
            "`parameternet pitfall --preset quick` (one seed) or `--preset full`.",
            "",
        ]
    parts.append(
        "Top-1 on the Fashion-MNIST test set (10,000 images): mean ± sd over seeds (number of seeds). Gain = "
        "pretrain → fine-tune minus target-only, paired by seed: mean ± standard error and 95% t interval, then each "
        "seed's value. Kernel dist. = the per-image kernel's distance from the mean kernel (median over layers, mean "
        f"over runs). MACs and params at {rows[0]['img_size']} px; RepConv MACs after merging. {note}"
    )
    if gate and width is not None:
        tried = "; ".join(f"{t['model']}: {', '.join(f'{g:+.2f}' for g in t['gains'].values())}" for t in gate["tried"])
        parts += ["", f"Gate (rule: {gate['rule']}): {tried}; settled on width {width:g}."]
    names = {e["name"] for e in entries}
    if width is not None and {static_cell(width).name, dynamic_cell(width).name} <= names:
        parts += ["", _verdict_text(verdict(entries, width))]
        sweep = _sweep_text(entries, width)
        if sweep:
            parts += ["", sweep]
    if max(e["gain"].n for e in entries) <= 1:
        parts += [
            "",
            "One seed per model: this shows that the pipeline runs and gives one paired gain per model; it cannot "
            "tell a remedy from seed-to-seed noise, which the full preset measures with 8 seeds of A and B "
            "(`parameternet pitfall --preset full`).",
        ]
    routing = _routing_text(output, code)
    if routing:
        parts += ["", routing]
    text = "\n".join(parts) + "\n"
    seeds = sorted({r["seed"] for r in rows})
    title = (
        "Low-FLOPs pitfall at CPU scale: target Fashion-MNIST 1k/class, pretraining MNIST + Fashion-MNIST\n"
        f"(preset {rows[0]['preset']}: {len(rows)} runs, seeds {seeds[0]}-{seeds[-1]}, code {code or 'pooled'})"
    )
    _plot(entries, output / "pitfall.png", title, width)
    (output / "table.md").write_text(text)
    return text
