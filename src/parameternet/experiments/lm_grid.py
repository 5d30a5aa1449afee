"""The machinery every ``lm experiment`` grid shares: run tasks, worker processes, writing their result rows.

A grid is a list of :class:`Task`: one ``lm train`` run of the base recipe with a variant's, a seed's and the
grid's overrides (its run directory and recipe hash derived from them), or an ``lm finetune-cls`` classifier.
:class:`Runner` runs them as subprocesses of those commands through :func:`~parameternet.experiments.grid.run_jobs`
(one torch thread each, ``jobs`` side by side, a task after the tasks it needs), skips
the ones whose row this code already wrote (the key is the kind, variant, seed and recipe hash, among the rows of
the same commit), and appends each finished run to ``runs.csv`` at once, its validation curve to ``curves.csv`` and
its router diagnostics to ``router.csv``, each row with the git commit, a dirty flag and the package version
(the rows' columns and reading them back: :mod:`parameternet.experiments.lm_rows`). Used by
:mod:`parameternet.experiments.lm` (Table 7) and :mod:`parameternet.experiments.lm_upcycle` (upcycling, round 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError
from parameternet.experiments.grid import Job, run_jobs
from parameternet.experiments.lm_rows import COLUMNS, CURVE_COLUMNS, ROUTER_COLUMNS, check_header, parse_row, read_rows
from parameternet.experiments.provenance import code_id, provenance, rows_of_this_code
from parameternet.experiments.rows import append_rows
from parameternet.runs import atomic_write

__all__ = [
    "DENSE",
    "GRID_KEYS",
    "MOE8",
    "Runner",
    "Task",
    "Variant",
    "base_overrides",
    "check_grid",
    "check_hardware",
    "check_inputs",
    "check_jobs",
    "hardware",
    "hardware_line",
    "recipe_hash",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A model of the grid: dense (``projection`` None) or ``num_experts`` experts on one FFN projection."""

    projection: str | None
    num_experts: int = 0

    @property
    def name(self) -> str:
        return "dense" if self.projection is None else f"{self.projection}-{self.num_experts}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        if name == "dense":
            return cls(None)
        proj, _, m = name.rpartition("-")
        if proj not in ("gate_proj", "up_proj", "down_proj") or not m.isdigit() or int(m) < 2:
            raise ParameterNetError(f"variant {name!r} is unknown; write dense or <gate|up|down>_proj-<experts>")
        return cls(proj, int(m))

    def overrides(self) -> list[str]:
        if self.projection is None:
            return ["model.moe_projections=[]"]
        return [f"model.moe_projections=[{self.projection}]", f"model.num_experts={self.num_experts}"]

    @property
    def label(self) -> str:
        return "LLaMA (dense)" if self.projection is None else f"MoE on {self.projection.replace('_proj', '')}"


DENSE, MOE8 = "dense", "down_proj-8"

# The smoke presets' model and data: a 2-layer LLaMA of width 32 on a 300-token vocabulary, a wiring check in seconds.
SMOKE_OVERRIDES = (
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2", "data.vocab_size=300",
    "data.val_fraction=0.2", "data.eval_fraction=0.2", "data.seq_len=32", "batch_size=4", "log_every=1",
    "eval_batch_size=8",
)  # fmt: skip


# Recipe keys the grid sets for each run (variant, seed, learning rate, token budget, schedule, evaluation, run
# directory, one thread), after the user's overrides: an override of one would be ignored or, for max_steps and
# threads, change what every run does.
GRID_KEYS = (
    "max_steps", "max_tokens", "seed", "optim.lr", "model.moe_projections", "model.num_experts",
    "schedule.warmup_steps", "eval_every_steps", "eval_tokens", "output_dir", "resume", "threads",
    *(f"branch.{k}" for k in ("snapshot_step", "stop_step", "start_step", "from_snapshot", "fork_from",
                              "rewarmup_steps")),
)  # fmt: skip


def base_overrides(preset, extra: Sequence[str] = ()) -> list[str]:
    """The overrides every language-model run of ``preset`` starts from: the preset's, then the user's ``extra``."""
    p = preset
    return [
        *p.overrides, f"zero_shot_items={p.zero_shot_items}", "threads=1", "progress=false", "router_windows=64",
        "heldout_loss=true", *extra,
    ]  # fmt: skip


def check_inputs(preset, recipe: str | Path, overrides: Sequence[str] = ()):
    """The base recipe with the preset's and the user's ``overrides``, validated once before anything starts;
    returns it. Raises ParameterNetError naming the key of a bad override, or of one the grid sets for each run."""
    from parameternet.train.lm_config import load_lm_config

    cfg = load_lm_config(recipe, base_overrides(preset, overrides))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in GRID_KEYS:
            raise ParameterNetError(
                f"override {item!r} sets {key}, which lm experiment sets for each run of the grid (variants, seeds, "
                f"learning rates, token budgets, evaluation); drop it"
            )
    return cfg


@dataclass
class Task:
    """One run of a grid: ``kind`` (the grid's word for it: ``lr``, ``main``, ``trunk``, a branch, ``cls``...),
    ``variant`` (:class:`Variant` name), ``seed``, peak learning rate, the ``lm train`` overrides, its run directory,
    its recipe hash, its ``options`` (an ``lm train`` run's ``branch.*`` recipe keys; a classifier's ``lm
    finetune-cls`` settings under ``kwargs``), and the tasks it needs finished first (``after``)."""

    kind: str
    variant: str
    seed: int
    lr: float | None
    overrides: list[str]
    run_dir: Path
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    after: list[Task] = field(default_factory=list)
    result: dict[str, Any] | None = None
    started: float = 0.0
    rerun_of: dict[str, Any] | None = None  # the row of a finished run made again (its run directory was gone)

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.kind, self.variant, self.seed, self.recipe)

    @property
    def name(self) -> str:
        """The run in the log: kind, variant, seed, and the learning rate of a learning-rate check run."""
        return f"{self.kind} {self.variant} seed {self.seed}" + (f" lr {self.lr:g}" if self.kind == "lr" else "")


def recipe_hash(obj: Any) -> str:
    """Eight hex digits of the SHA-1 of ``obj`` as sorted JSON: the recipe key of a row and its run directory."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _read_metrics(run: Path) -> dict[str, Any]:
    """``{"val_curve": [(step, val loss)], "router": [router rows], "train_tail": mean of the last tenth}``."""
    curve, router, train = [], [], []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("split") == "val":
            curve.append((row["step"], row["loss"]))
        elif row.get("split") == "router":
            router.append(row)
        elif row.get("split") == "train":
            train.append(row["lm_loss"])
    tail = train[-max(1, len(train) // 10) :] if train else []
    return {"val_curve": curve, "router": router, "train_tail": sum(tail) / len(tail) if tail else None}


# ----- the runner -----


class Runner:
    """Runs a grid's :class:`Task` list for ``preset`` (an object with ``name``, ``overrides``,
    ``zero_shot_items``, ``eval_tokens`` and ``warmup_fraction``) and writes its rows to ``output``; run
    directories under ``runs_dir/<code id>/``. Only rows of the same preset and code count as done."""

    def __init__(self, preset, recipe: str, extra: Sequence[str], output: Path, runs_dir: Path, jobs: int):
        self.preset, self.recipe, self.extra, self.output, self.jobs = preset, recipe, list(extra), output, jobs
        self.prov = provenance()
        self.code = code_id(self.prov)
        self.runs_dir = runs_dir / self.code
        self.csv = output / "runs.csv"
        for name, columns in (("runs.csv", COLUMNS), ("curves.csv", CURVE_COLUMNS), ("router.csv", ROUTER_COLUMNS)):
            check_header(output / name, columns)
        rows = [r for r in read_rows(self.csv) if r.get("preset") == preset.name]
        self.rows, _ = rows_of_this_code(rows, f"lm experiment {preset.name}", self.csv)

    # --- configs
    def base_overrides(self) -> list[str]:
        return base_overrides(self.preset, self.extra)

    def cfg(self, overrides: list[str]):
        from parameternet.train.lm import load_lm_config

        return load_lm_config(self.recipe, [*self.base_overrides(), *overrides])

    def task(self, kind: str, variant: str, seed: int, lr: float | None, overrides: list[str], **branch) -> Task:
        """An ``lm train`` run of ``variant`` and ``seed`` with ``overrides`` and ``branch.KEY=VALUE`` for each of
        ``branch``; its recipe hash covers the whole resolved recipe but where it writes."""
        v = Variant.parse(variant)
        ov = [*v.overrides(), f"seed={seed}", *overrides, *(f"branch.{k}={x}" for k, x in branch.items())]
        if lr is not None:
            ov.append(f"optim.lr={lr}")
        cfg = self.cfg(ov).to_dict()
        cfg.pop("output_dir"), cfg.pop("resume"), cfg.pop("progress")
        cfg["branch"] = {k: self._relative(x) for k, x in cfg["branch"].items()}
        recipe = recipe_hash(cfg)
        run_dir = self.runs_dir / kind / f"{variant}-s{seed}" / recipe
        ov = [*self.base_overrides(), *ov, f"output_dir={run_dir}", "resume=auto"]
        return Task(kind, variant, seed, lr, ov, run_dir, recipe, branch)

    def _relative(self, option: Any) -> Any:
        """A recipe value as its hash sees it: a path under this code's run directories relative to them (the
        source run's kind, variant, seed and recipe hash), so the hash does not depend on where ``--runs`` is."""
        if not isinstance(option, str):
            return option
        try:
            return str(Path(option).relative_to(self.runs_dir))
        except ValueError:
            return option

    @property
    def eval_tokens(self) -> str:
        """The override that sets every language-model run's validation tokens per evaluation."""
        return f"eval_tokens={self.preset.eval_tokens or 'null'}"

    def warmup(self, steps: int) -> int:
        """Warmup steps of a run of ``steps`` steps: the preset's ``warmup_fraction`` of them, at least one."""
        return max(1, round(self.preset.warmup_fraction * steps))

    def done(self, t: Task) -> dict[str, Any] | None:
        return next((r for r in self.rows if (r["kind"], r["variant"], r["seed"], r["recipe"]) == t.key), None)

    def train_windows(self) -> tuple[int, int]:
        """(training tokens in the split, tokens per step) of the recipe."""
        from parameternet.data.text import prepare_text_data

        c = self.cfg([])
        d = c.data
        data = prepare_text_data(
            d.dir, corpora=d.corpora, vocab_size=d.vocab_size, val_fraction=d.val_fraction,
            eval_fraction=d.eval_fraction,
        )  # fmt: skip
        return int(data.manifest["tokens"]["train"]), c.batch_size * d.seq_len

    # --- executing
    def execute(self, tasks: list[Task]) -> None:
        """Run the tasks without a row of this code, ``jobs`` at a time, each after the tasks it needs; a failed
        run drops the tasks that need it and raises ParameterNetError at the end; a stop (SIGINT / SIGTERM) saves
        the running runs and raises RunInterrupted."""
        pending = []
        for t in tasks:
            row = self.done(t)
            if row is not None:
                t.result = {"row": row}
            else:
                pending.append(t)
        log.info(
            "lm experiment %s: %d of %d runs done by this code (%s); %d to run, %d at a time, 1 thread each",
            self.preset.name, len(tasks) - len(pending), len(tasks), self.code, len(pending), self.jobs,
        )  # fmt: skip
        if not pending:
            return
        rerun = self._gone(tasks, pending)
        jobs: dict[int, Job] = {}
        for t in rerun + pending:
            jobs[id(t)] = job = self._job(t)
            job.after = [jobs[id(a)] for a in t.after if id(a) in jobs]
        run_jobs(list(jobs.values()), self.jobs, self._done)

    def _job(self, t: Task) -> Job:
        """The command of task ``t``: ``lm train`` of the recipe, or ``lm finetune-cls`` of its source's model."""
        if t.kind != "cls":
            return Job(t.name, ["lm", "train", self.recipe, *t.overrides], t.run_dir, payload=t)
        flags = [x for k, v in t.options["kwargs"].items() for x in (f"--{k.replace('_', '-')}", str(v))]
        model = str(t.after[0].run_dir / "model")
        argv = ["lm", "finetune-cls", model, "--output", str(t.run_dir), "--threads", "1", *flags]
        return Job(t.name, argv, t.run_dir, payload=t)

    def _gone(self, tasks: list[Task], pending: list[Task]) -> list[Task]:
        """The finished tasks that a pending task starts from but whose run directory no longer holds the finished
        run (deleted, or made on another machine): they run again, in the order of ``tasks``, and their rows stay."""
        needed = {id(a) for t in pending for a in t.after}
        gone = [t for t in tasks if id(t) in needed and t.result and not (t.run_dir / "summary.json").is_file()]
        for t in gone:
            t.rerun_of, t.result = t.result["row"], None
            log.info("  %s: its row is here but not its run directory %s; it runs again", t.name, t.run_dir)
        return gone

    def _done(self, job: Job) -> None:
        t: Task = job.payload
        t.result = {**(job.summary or {}), **(_read_metrics(t.run_dir) if t.kind != "cls" else {})}
        if t.rerun_of is not None:
            self._check_rerun(t)
        else:
            self.finish(t)

    def _check_rerun(self, t: Task) -> None:
        """A run made again for the tasks that start from it must end where its row says (the runs are deterministic
        at one thread): else the runs made from it now would not continue the run the earlier rows continued."""
        row = t.rerun_of
        again = {"steps": t.result["steps"], "val_loss": _round((t.result.get("val") or {}).get("loss"))}
        then = {k: row[k] for k in again}
        if again != then:
            raise ParameterNetError(
                f"{t.name} ran again (its run directory {str(t.run_dir)!r} was gone) and ended at {again}, but its "
                f"row says {then}; the runs that start from it would not continue the run the other rows did: "
                f"remove that seed's rows from {str(self.csv)!r} to run them all again"
            )
        t.result = {**t.result, "row": row}
        log.info("  %s ran again and ends where its row says (val loss %s)", t.name, row["val_loss"])

    def finish(self, t: Task) -> None:
        """Append the row of the finished task ``t`` (and its curve and router rows) to the CSVs."""
        res = t.result or {}
        v = Variant.parse(t.variant)
        row: dict[str, Any] = {
            "kind": t.kind, "preset": self.preset.name, "variant": t.variant, "projection": v.projection or "-",
            "experts": v.num_experts, "seed": t.seed, "lr": t.lr, "recipe": t.recipe, "run_dir": str(t.run_dir),
            "threads": res.get("threads"), "wall_s": res.get("wall_s"), **self.prov,
        }  # fmt: skip
        if t.kind == "cls":
            src = t.after[0].result.get("row") or {}
            row.update(
                params=src.get("params"), cls_task=res["task"], cls_acc=res["acc"], cls_items=res["test_items"],
                steps=res["steps"], train_loss=res["train_loss"],
            )  # fmt: skip
        else:
            val = res.get("val") or {}
            zs = res.get("zero_shot") or {}
            start = int(t.options.get("start_step", 0))
            per_step = res["tokens"] // max(1, res["steps"])
            curve = res.get("val_curve", [])
            mid = t.options.get("snapshot_step") or start
            row.update(
                params=res["params"], steps=res["steps"], start_step=start,
                tokens=(res["steps"] - start) * per_step, train_loss=_round(res.get("train_tail")),
                val_loss=_round(val.get("loss")), val_ppl=_round(val.get("ppl"), 2),
                heldout_loss=_round((res.get("heldout") or {}).get("loss")),
                mid_val_loss=_round(dict(curve).get(mid)) if mid else "",
                next_sentence_acc=_round(zs.get("next_sentence", {}).get("acc_norm")),
                last_word_acc=_round(zs.get("last_word", {}).get("acc")), tokens_per_s=res.get("tokens_per_s"),
            )  # fmt: skip
            common = {k: row[k] for k in ("kind", "preset", "variant", "seed", "commit", "dirty")}
            append_rows(
                self.output / "curves.csv",
                [{**common, "step": s, "tokens": s * per_step, "val_loss": round(x, 6)} for s, x in curve],
                CURVE_COLUMNS,
            )
            router = []
            for r in res.get("router", []):
                for s in r["routers"]:
                    router.append({
                        **common, "step": r["step"], "tokens": r["tokens"], "layer": s["layer"],
                        "projection": s["projection"], "top1_prob": s["top1_prob"], "max_share": max(s["share"]),
                        "min_share": min(s["share"]), "shares": " ".join(f"{x:.4f}" for x in s["share"]),
                    })  # fmt: skip
            append_rows(self.output / "router.csv", router, ROUTER_COLUMNS)
        append_rows(self.csv, [row], COLUMNS)
        self.rows.append(parse_row({k: row.get(k, "") for k in COLUMNS}))
        t.result = {**res, "row": self.rows[-1]}
        log.info(
            "[%d rows] %s: %s (%.0f s)", len(self.rows), t.name,
            f"accuracy {row['cls_acc']}" if t.kind == "cls" else f"val loss {row['val_loss']}", row["wall_s"] or 0,
        )  # fmt: skip


def _round(x: float | None, digits: int = 4) -> float | str:
    return round(x, digits) if x is not None and math.isfinite(x) else ""


# ----- the command and the report's rows -----


def check_grid(output: Path, preset: str, base) -> None:
    """Record in ``output/grid.json`` the base recipe (an LMTrainConfig: the recipe file with the preset's and the
    user's overrides) of ``preset``'s grid the first time, and refuse a later run whose base recipe differs: its rows
    would land in the same tables as rows of another model or setting. Raises ParameterNetError naming the keys
    that differ."""
    from parameternet.train.recipe import recipe_values

    path = output / "grid.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise ParameterNetError(f"{str(path)!r} is not valid JSON; delete it to record this grid afresh") from None
    now = {k: v for k, v in recipe_values(base).items() if k not in ("output_dir", "resume", "progress")}
    then = record.get(preset)
    if then is None:
        atomic_write(path, json.dumps({**record, preset: now}, indent=1, sort_keys=True, default=str) + "\n")
        return
    now = json.loads(json.dumps(now, default=str))  # as it would read back
    keys = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
    diffs = [f"{k}={then.get(k)!r} there, {now.get(k)!r} now" for k in keys]
    if diffs:
        raise ParameterNetError(
            f"{str(output)!r} holds the {preset} grid of another base recipe ({'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''}); pass another --output, or the recipe and overrides it was run with"
        )


def hardware(device: str) -> dict[str, str]:
    """What a grid's runs train on, for a recipe's ``device`` (resolved as ``lm train`` resolves it,
    :func:`~parameternet.train.distributed.pick_device`): ``{"device": "cpu"}`` or the CUDA device's name with
    torch's and CUDA's versions. Raises ParameterNetError when the recipe names CUDA and torch sees no CUDA device."""
    import torch

    from parameternet.train.distributed import pick_device

    dev = pick_device(device)
    if dev.type == "cpu":
        return {"device": "cpu"}
    return {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cuda": str(torch.version.cuda)}


def _recorded_hardware(output: Path) -> dict[str, str] | None:
    """``output/hardware.json`` as :func:`check_hardware` wrote it, or None when there is none. Raises
    ParameterNetError for a file that is not such a record."""
    path = output / "hardware.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("device"), str):
        raise ParameterNetError(
            f'{str(path)!r} is not a device record (a JSON object with a "device" name); delete it to record the '
            "device afresh"
        )
    return record


def check_hardware(output: Path, now: dict[str, str], write: bool = True) -> None:
    """Refuse a run of a grid in ``output`` on another device than the one ``output/hardware.json`` records (its
    rows and wall times would land beside rows made elsewhere); with ``write``, record ``now`` (:func:`hardware`)
    when there is no record yet. Raises ParameterNetError naming both devices, or a file that is not a record."""
    then = _recorded_hardware(output)
    if then is None:
        if write:
            atomic_write(output / "hardware.json", json.dumps(now, indent=1, sort_keys=True) + "\n")
    elif then["device"] != now["device"]:
        raise ParameterNetError(
            f"{str(output)!r} holds a grid trained on {then['device']!r}; this run would train on {now['device']!r}; "
            "pass another --output"
        )


def hardware_line(output: Path) -> list[str]:
    """The report's line naming the GPU a grid trained on (nothing for a CPU grid or one without a record)."""
    hw = _recorded_hardware(output) or {"device": "cpu"}
    if hw["device"] == "cpu":
        return []
    versions = ", ".join(f"{name} {hw[key]}" for name, key in (("torch", "torch"), ("CUDA", "cuda")) if hw.get(key))
    return [f"Trained on one {hw['device']}{f' ({versions})' if versions else ''}.", ""]


def check_jobs(jobs: int) -> None:
    """ParameterNetError unless ``jobs`` (runs side by side) is at least 1."""
    if jobs < 1:
        raise ParameterNetError(f"jobs={jobs} is invalid; use 1 or more parallel runs")
