"""Table 7 of ParameterNet (arXiv 2306.14525, sec. 5.4) at CPU scale: dense LLaMA against a top-1 mixture of 4 or 8
experts on each FFN projection (gate, up, down), same tokens for every model.

Every run is one ``lm-train`` run of the base recipe (``configs/lm-small.yaml``: 4 layers, hidden 256) with the
variant's ``model.moe_projections`` / ``model.num_experts`` / ``seed``; all runs read the same token windows in
the same order (``data.order_seed``), so they differ only in the FFN projection and the initialisation. The
dense baseline and the 8-expert down-projection variant run with two seeds. Runs live in
``<runs>/<variant>-s<seed>/`` and resume from their last checkpoint, so the command can be stopped and run
again; finished runs are skipped. The outputs, in ``results/lm/``, are ``runs.csv`` (one row per run),
``loss_curves.png`` (training and validation loss against tokens) and ``table7.md`` (the paper's table with
seeds averaged).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parameternet.errors import ParameterNetError

__all__ = ["VARIANTS", "Variant", "collect", "run_lm_experiment", "write_results"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str
    projection: str | None  # None = dense
    num_experts: int
    seeds: tuple[int, ...]

    def overrides(self, seed: int) -> list[str]:
        moe = f"[{self.projection}]" if self.projection else "[]"
        return [f"model.moe_projections={moe}", f"model.num_experts={self.num_experts}", f"seed={seed}"]


# Two seeds for the dense baseline and for the variant the release ships (8 experts on down_proj).
VARIANTS = (
    Variant("dense", None, 1, (0, 1)),
    *(
        Variant(f"{p}-{m}", p, m, (0, 1) if (p, m) == ("down_proj", 8) else (0,))
        for p in ("gate_proj", "up_proj", "down_proj")
        for m in (4, 8)
    ),
)


def run_lm_experiment(
    recipe: str | Path = "configs/lm-small.yaml",
    overrides: list[str] = (),
    runs_dir: str | Path = "runs/lm-experiment",
    results_dir: str | Path = "results/lm",
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant and seed that is not finished yet, then write the results; returns the rows."""
    from parameternet.train.lm import load_lm_config, train_lm

    variants = [v for v in VARIANTS if only is None or v.name in only]
    if only is not None and len(variants) != len(only):
        unknown = sorted(set(only) - {v.name for v in VARIANTS})
        raise ParameterNetError(f"unknown variant(s) {unknown}; choose from {', '.join(v.name for v in VARIANTS)}")
    from parameternet.runs import RunLock

    # one experiment per results directory; each run also locks its own directory (train_lm)
    with RunLock(results_dir, "experiment results"):
        runs_dir = Path(runs_dir)
        for variant in variants:
            for seed in variant.seeds:
                out = runs_dir / f"{variant.name}-s{seed}"
                if (out / "summary.json").is_file():
                    log.info("%s: done, skipped", out)
                    continue
                run_overrides = [*overrides, *variant.overrides(seed), f"output_dir={out}", "resume=auto"]
                cfg = load_lm_config(recipe, run_overrides)
                log.info("=== %s seed %d -> %s", variant.name, seed, out)
                train_lm(cfg)
        rows = collect(runs_dir)
        write_results(rows, runs_dir, results_dir)
        return rows


def _curve(run: Path, split: str, key: str) -> list[tuple[int, float]]:
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == split and key in row:
            points.append((row["tokens"] if "tokens" in row and split == "train" else row["step"], row[key]))
    return points


def collect(runs_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished run under ``runs_dir``."""
    rows = []
    for variant in VARIANTS:
        for seed in variant.seeds:
            run = Path(runs_dir) / f"{variant.name}-s{seed}"
            if not (run / "summary.json").is_file():
                continue
            s = json.loads((run / "summary.json").read_text())
            train = [v for _, v in _curve(run, "train", "lm_loss")]
            tail = train[-max(1, len(train) // 10) :]  # the last tenth of the logged training loss
            zs = s.get("zero_shot", {})
            rows.append(
                dict(
                    variant=variant.name,
                    projection=variant.projection or "-",
                    experts=variant.num_experts if variant.projection else 0,
                    seed=seed,
                    params=s["params"],
                    tokens=s["tokens"],
                    train_loss=round(statistics.fmean(tail), 4),
                    val_loss=round(s["val"]["loss"], 4),
                    val_ppl=round(s["val"]["ppl"], 2),
                    next_sentence_acc=round(zs.get("next_sentence", {}).get("acc_norm", float("nan")), 4),
                    last_word_acc=round(zs.get("last_word", {}).get("acc", float("nan")), 4),
                    wall_s=s["wall_s"],
                    run=str(run),
                )
            )
    return rows


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) / len(values) ** 0.5:.4f}"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| Model | #Expert | Parameters | Seeds | Train loss | Val loss | Val ppl | Next sentence (acc_norm) "
        "| Last word (acc) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        rs = [r for r in rows if r["variant"] == variant.name]
        if not rs:
            continue
        name = "LLaMA (dense)" if not variant.projection else f"MoE on {variant.projection.replace('_proj', '')}"
        cells = [
            name,
            str(variant.num_experts) if variant.projection else "-",
            f"{rs[0]['params'] / 1e6:.2f}M",
            str(len(rs)),
            _mean([r["train_loss"] for r in rs]),
            _mean([r["val_loss"] for r in rs]),
            f"{statistics.fmean(r['val_ppl'] for r in rs):.1f}",
            _mean([r["next_sentence_acc"] for r in rs]),
            _mean([r["last_word_acc"] for r in rs]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict[str, Any]], runs_dir: str | Path, results_dir: str | Path) -> None:
    """``runs.csv``, ``table7.md`` and ``loss_curves.png`` in ``results_dir``."""
    if not rows:
        raise ParameterNetError(f"{runs_dir} holds no finished run; run `parameternet lm-experiment` first")
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tokens = rows[0]["tokens"]
    header = (
        f"Dense LLaMA vs top-1 MoE on one FFN projection, 4 layers, hidden 256, {tokens:,} training tokens "
        f"(the same for every run). Mean ± standard error over seeds where there are two.\n\n"
    )
    (out / "table7.md").write_text(header + _table(rows))
    _plot(rows, out / "loss_curves.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"dense": "black", "gate_proj": "tab:blue", "up_proj": "tab:orange", "down_proj": "tab:green"}
    for r in rows:
        run = Path(r["run"])
        style = dict(
            color=colors[r["projection"] if r["projection"] != "-" else "dense"],
            linestyle="-" if r["experts"] in (0, 8) else "--",
            alpha=1.0 if r["seed"] == 0 else 0.5,
            label=f"{r['variant']} s{r['seed']}",
        )
        train = _curve(run, "train", "lm_loss")
        ax_train.plot([t for t, _ in train], [v for _, v in train], **style)
        val = _curve(run, "val", "loss")
        ax_val.plot([s for s, _ in val], [v for _, v in val], marker="o", **style)
    ax_train.set(xlabel="training tokens", ylabel="training loss (cross-entropy)", title="training")
    ax_val.set(xlabel="step", ylabel="validation loss", title="validation")
    ax_val.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
