"""``parameternet benchmark onnx``: the paper's latency protocol for our models and timm's peers (ParameterNet, arXiv
2306.14525, sec. 5.2 and Figure 5).

The paper times its models with ONNX on one CPU thread and plots top-1 against that latency. Here every model is
exported (:func:`~parameternet.export.onnx_export.export_onnx`: the ``deploy()`` graph, batch 1) and timed in ONNX
Runtime with one thread: warm-up, then median and 90th percentile. Each model runs as two graphs: the exported
one with ONNX Runtime's own optimisations (``onnx_generic_ms``; ONNX Runtime leaves a dynamic conv, whose kernel is
computed in the graph, in its slow generic kernels) and the one with every conv moved to ONNX Runtime's blocked
NCHWc kernels by :func:`~parameternet.export.ort_nchwc.optimize_for_onnxruntime`. ``onnx_ms`` is the faster of
the two (``onnx_graph`` says which; ``onnx_nchwc_ms`` is the rewritten graph's), so every model, static or
dynamic, is timed at its best. The same deployed models are timed in eager PyTorch (batch 1, one thread) as well.
All models run interleaved in one process, a round at a time, so a change of load on a shared machine touches every
model alike. Top-1 is not measured: it is the figure the paper (our
models) or timm's results table (the peers) reports, with its source on every row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.models import MODELS
from parameternet.toolkit import MIN_IMG_SIZE, image_input_shape

__all__ = ["PEERS", "REPORTED_TOP1", "BenchmarkRow", "run_benchmark", "write_outputs"]

log = logging.getLogger(__name__)

PAPER = "ParameterNet paper (arXiv 2306.14525)"
TIMM = "timm results/results-imagenet.csv"

# model -> (top-1, training data, source). Reported, not measured. Our models: the paper's ImageNet-22K
# pretrained, ImageNet-1K fine-tuned figures (what its Figure 5 plots); the 1K-only figures are in REPORTED_TOP1_1K.
# Peers: timm's default weights for the name, as timm's results table lists them.
REPORTED_TOP1: dict[str, tuple[float, str, str]] = {
    "ghostnet_300m": (75.7, "ImageNet-22K -> 1K", f"{PAPER}, Table 2"),
    "parameternet_300m": (79.1, "ImageNet-22K -> 1K", f"{PAPER}, Table 2"),
    "ghostnet_600m": (78.3, "ImageNet-22K -> 1K", f"{PAPER}, Table 2"),
    "parameternet_600m": (81.6, "ImageNet-22K -> 1K", f"{PAPER}, Table 2"),
    "swin_300m": (67.0, "ImageNet-22K -> 1K", f"{PAPER}, Table 5"),
    "parameternet_swin_300m": (74.5, "ImageNet-22K -> 1K", f"{PAPER}, Table 5"),
    "mobilenetv3_large_100": (75.766, "ImageNet-1K", f"{TIMM}, mobilenetv3_large_100.ra_in1k at 224"),
    "efficientnet_b0": (77.694, "ImageNet-1K", f"{TIMM}, efficientnet_b0.ra_in1k at 224"),
    "ghostnet_100": (73.982, "ImageNet-1K", f"{TIMM}, ghostnet_100.in1k at 224"),
    "resnet50": (81.214, "ImageNet-1K", f"{TIMM}, resnet50.a1_in1k at 288 (its test size)"),
    "swin_tiny_patch4_window7_224": (81.376, "ImageNet-1K", f"{TIMM}, swin_tiny_patch4_window7_224.ms_in1k at 224"),
}
REPORTED_TOP1_1K = {
    "ghostnet_300m": 76.3,
    "parameternet_300m": 77.2,
    "ghostnet_600m": 78.6,
    "parameternet_600m": 79.0,
    "swin_300m": 69.2,
    "parameternet_swin_300m": 72.3,
}
OURS = MODELS  # the paper's models, as registered in timm
PEERS = ("mobilenetv3_large_100", "efficientnet_b0", "ghostnet_100", "resnet50", "swin_tiny_patch4_window7_224")


@dataclass
class BenchmarkRow:
    """One model's measurements (milliseconds per image) and its reported top-1."""

    model: str
    params_m: float
    macs_m: float
    onnx_ms: float
    onnx_p90_ms: float
    onnx_graph: str
    onnx_generic_ms: float
    onnx_nchwc_ms: float | None
    eager_ms: float | None
    eager_p90_ms: float | None
    top1_reported: float | None
    top1_data: str
    top1_source: str


def _stats(times: list[float]) -> tuple[float, float]:
    ms = [t * 1e3 for t in times]
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return statistics.median(ms), p90


def _check_models(models: list[str]) -> None:
    from parameternet.models import check_model_name

    if not models:
        raise ParameterNetError("no models to benchmark; name at least one timm model.")
    for name in models:
        check_model_name(name)


def run_benchmark(
    models: list[str] | tuple[str, ...] = OURS + PEERS,
    *,
    img_size: int = 224,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    eager: bool = True,
    workdir: str | Path | None = None,
    progress: bool = False,
) -> tuple[list[BenchmarkRow], dict[str, Any]]:
    """Time every model in ONNX Runtime (and eager PyTorch), batch 1, ``threads`` threads, interleaved.

    Returns the rows and a dict describing the run (machine, versions, load average before and after). Raises
    ParameterNetError for an unknown model, ``threads`` or ``runs`` below 1, a negative ``warmup`` and an
    ``img_size`` below :data:`~parameternet.toolkit.MIN_IMG_SIZE`.
    """
    models = list(models)
    _check_arguments(models, img_size, threads, warmup, runs)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(tmp.name if tmp is not None else workdir)
    try:
        timed = []
        for name in models:
            if progress:
                log.info("export %s", name)
            timed.append(_prepare(name, img_size, threads, eager, root))
        if progress:
            log.info("time %d models: %d warm-up and %d timed rounds", len(models), warmup, runs)
        _time_interleaved(timed, warmup, runs)
    finally:
        torch.set_num_threads(prev_threads)
        if tmp is not None:
            tmp.cleanup()
    rows = [_row(t, eager) for t in timed]
    meta = _environment(img_size, threads, warmup, runs)
    meta["load_average_before"] = [round(v, 2) for v in load_before]
    meta["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return rows, meta


def _check_arguments(models: list[str], img_size: int, threads: int, warmup: int, runs: int) -> None:
    """Refuse (ParameterNetError) what :func:`run_benchmark` cannot time, before anything is exported."""
    _check_models(models)
    for name, value in (("threads", threads), ("runs", runs)):
        if not isinstance(value, int) or value < 1:
            raise ParameterNetError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
        raise ParameterNetError(f"img_size must be an integer >= {MIN_IMG_SIZE}, got {img_size!r}.")
    if warmup < 0:
        raise ParameterNetError(f"warmup must be >= 0, got {warmup!r}.")


@dataclass
class _Timed:
    """One model's ways of running (the portable ONNX session, the NCHWc one when the rewrite found convs, the
    eager ``deploy()`` graph), its one-image input and counts, and the seconds of each timed round."""

    name: str
    x: torch.Tensor
    params: int
    macs: int
    generic: Any
    nchwc: Any = None
    graph: nn.Module | None = None
    generic_s: list[float] = field(default_factory=list)
    nchwc_s: list[float] = field(default_factory=list)
    eager_s: list[float] = field(default_factory=list)


def _prepare(name: str, img_size: int, threads: int, eager: bool, root: Path) -> _Timed:
    """Build ``name``, count it, export it to ``root/NAME.onnx`` and open its sessions (and its eager graph)."""
    from parameternet.counting import count_macs, count_params
    from parameternet.export.folding import deploy
    from parameternet.export.onnx_export import export_onnx, onnx_session
    from parameternet.export.ort_nchwc import optimize_for_onnxruntime
    from parameternet.models import create_model_for_size

    model: nn.Module = create_model_for_size(name, img_size).eval()
    shape = image_input_shape(model, img_size)  # each model's own channels (1 for the mini models)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        params, macs = count_params(model).total, count_macs(model, x)
    path = root / f"{name}.onnx"
    export_onnx(model, path, dynamic_batch=False, batch_size=1, img_size=img_size)
    t = _Timed(name, x, params, macs, onnx_session(path, threads=threads, nchwc=False))
    rewritten, nchwc = optimize_for_onnxruntime(path, static_convs=True)
    if nchwc.convs:
        t.nchwc = onnx_session(rewritten, threads=threads, nchwc=False)
    if eager:
        t.graph = deploy(model, example_input=x)
    return t


def _time_interleaved(timed: list[_Timed], warmup: int, runs: int) -> None:
    """``warmup`` untimed then ``runs`` timed rounds; each round runs every model once in each of its ways, one
    after the other, so a change in the machine's load falls on all of them alike."""
    feeds = [{t.generic.get_inputs()[0].name: t.x.numpy()} for t in timed]
    with torch.inference_mode():
        for i in range(warmup + runs):
            for t, feed in zip(timed, feeds):
                ways = [(t.generic.run, (None, feed), t.generic_s)]
                if t.nchwc is not None:
                    ways.append((t.nchwc.run, (None, feed), t.nchwc_s))
                if t.graph is not None:
                    ways.append((t.graph, (t.x,), t.eager_s))
                for run, args, seconds in ways:
                    start = time.perf_counter()
                    run(*args)
                    if i >= warmup:
                        seconds.append(time.perf_counter() - start)


def _row(t: _Timed, eager: bool) -> BenchmarkRow:
    """The row of a timed model: the faster ONNX graph's median and p90, both graphs' medians, eager's."""
    graphs_timed = {"onnxruntime": _stats(t.generic_s)}
    if t.nchwc is not None:
        graphs_timed["nchwc"] = _stats(t.nchwc_s)
    graph = min(graphs_timed, key=lambda k: graphs_timed[k][0])
    (onnx_ms, onnx_p90), generic_ms = graphs_timed[graph], graphs_timed["onnxruntime"][0]
    nchwc_ms = graphs_timed["nchwc"][0] if "nchwc" in graphs_timed else None
    eager_ms, eager_p90 = _stats(t.eager_s) if eager else (None, None)
    top1, data, source = REPORTED_TOP1.get(t.name, (None, "", ""))
    return BenchmarkRow(t.name, t.params / 1e6, t.macs / 1e6, onnx_ms, onnx_p90, graph, generic_ms, nchwc_ms,
                        eager_ms, eager_p90, top1, data, source)  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(img_size: int, threads: int, warmup: int, runs: int) -> dict[str, Any]:
    import onnxruntime
    import timm

    return {
        "protocol": f"batch 1, {img_size}px, {threads} thread(s), {warmup} warm-up and {runs} timed rounds, "
        "models interleaved; ONNX Runtime CPU on the deploy() graph exported for batch 1, the faster of ONNX "
        "Runtime's own optimisations (onnx_generic_ms) and every conv in its NCHWc kernels (parameternet's rewrite); "
        "eager PyTorch on the same deploy() model under inference_mode",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def ratios(rows: list[BenchmarkRow]) -> list[tuple[str, str, float, float, float | None]]:
    """(dynamic, static, ONNX ratio, portable-graph ONNX ratio, eager ratio) for every ParameterNet whose static
    twin was measured too."""
    by_name = {r.model: r for r in rows}
    out = []
    for dynamic, static in (
        ("parameternet_300m", "ghostnet_300m"),
        ("parameternet_600m", "ghostnet_600m"),
        ("parameternet_swin_300m", "swin_300m"),
    ):
        if dynamic in by_name and static in by_name:
            d, s = by_name[dynamic], by_name[static]
            eager = d.eager_ms / s.eager_ms if d.eager_ms and s.eager_ms else None
            out.append((dynamic, static, d.onnx_ms / s.onnx_ms, d.onnx_generic_ms / s.onnx_generic_ms, eager))
    return out


def format_table(rows: list[BenchmarkRow], meta: dict[str, Any]) -> str:
    lines = [
        f"{'model':30s} {'params':>8s} {'MACs':>8s} {'ONNX ms':>9s} {'p90':>7s} {'graph':>11s} {'ORT-only':>8s} "
        f"{'eager ms':>9s} {'p90':>7s} {'top-1*':>7s}"
    ]
    for r in rows:
        eager = f"{r.eager_ms:9.2f} {r.eager_p90_ms:7.2f}" if r.eager_ms is not None else f"{'-':>9s} {'-':>7s}"
        top1 = f"{r.top1_reported:7.1f}" if r.top1_reported is not None else f"{'-':>7s}"
        lines.append(
            f"{r.model:30s} {r.params_m:7.2f}M {r.macs_m:7.1f}M {r.onnx_ms:9.2f} {r.onnx_p90_ms:7.2f} "
            f"{r.onnx_graph:>11s} {r.onnx_generic_ms:8.2f} {eager} {top1}"
        )
    for dynamic, static, onnx_ratio, generic_ratio, eager_ratio in ratios(rows):
        eager = f", eager {eager_ratio:.3f}x" if eager_ratio is not None else ""
        lines.append(
            f"{dynamic} / {static}: ONNX Runtime {onnx_ratio:.3f}x (both without the NCHWc rewrite "
            f"{generic_ratio:.3f}x){eager}"
        )
    lines.append(f"* top-1 reported, not measured (source per row in the CSV). {meta['protocol']}.")
    lines.append(machine_line(meta))
    return "\n".join(lines)


def machine_line(meta: dict[str, Any]) -> str:
    """The CPU, the versions and the load average before and after a run, in one line."""
    return (
        f"{meta['cpu']}, torch {meta['torch']}, onnxruntime {meta['onnxruntime']}; load average "
        f"{meta['load_average_before'][0]} before, {meta['load_average_after'][0]} after."
    )


def write_rows_csv(path: Path, rows: list) -> None:
    """One CSV row per dataclass row, floats rounded to 3 decimals."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(r).items()})


def write_outputs(rows: list[BenchmarkRow], meta: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write ``benchmark.csv``, ``benchmark.json`` (the run's description) and ``latency_top1.png``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "benchmark.csv", "json": out / "benchmark.json", "png": out / "latency_top1.png"}
    write_rows_csv(paths["csv"], rows)
    keys = ("dynamic", "static", "onnx", "onnx_generic", "eager")
    meta = dict(meta, ratios=[dict(zip(keys, r)) for r in ratios(rows)])
    paths["json"].write_text(json.dumps(meta, indent=1) + "\n")
    _plot(rows, meta, paths["png"])
    return paths


def _plot(rows: list[BenchmarkRow], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.model: r for r in rows if r.top1_reported is not None}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    families = [
        ("ParameterNet (ours)", ("parameternet_300m", "parameternet_600m"), "tab:red", "o"),
        ("GhostNet", ("ghostnet_300m", "ghostnet_600m"), "tab:blue", "s"),
        ("ParameterNet-Swin (ours)", ("parameternet_swin_300m",), "tab:orange", "^"),
        ("Swin-300M", ("swin_300m",), "tab:purple", "^"),
    ]
    placed = set()
    for label, names, color, marker in families:
        pts = [by_name[n] for n in names if n in by_name]
        if not pts:
            continue
        ax.plot([p.onnx_ms for p in pts], [p.top1_reported for p in pts], marker=marker, color=color, label=label, ms=7)
        for p in pts:
            if p.model in REPORTED_TOP1_1K:
                ax.plot(p.onnx_ms, REPORTED_TOP1_1K[p.model], marker=marker, mfc="none", color=color, ms=7, ls="")
            placed.add(p.model)
    others = [r for n, r in by_name.items() if n not in placed]
    if others:
        ax.plot([r.onnx_ms for r in others], [r.top1_reported for r in others], "D", color="gray", label="timm peers")
    for r in by_name.values():
        below = r.model.startswith("ghostnet_") or r.model.startswith("swin_3")  # keeps twins' labels apart
        offset = (5, -10) if below else (5, 4)
        ax.annotate(r.model, (r.onnx_ms, r.top1_reported), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel(f"ONNX Runtime latency, batch 1, {meta['protocol'].split(', ')[2]} (ms, measured)")
    ax.set_ylabel("ImageNet-1K top-1 (%, reported, not measured)")
    ax.set_title("Top-1 vs latency (after the paper's Figure 5)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "Filled: paper's ImageNet-22K pretrained figures (ours) / timm's weights (peers); hollow: paper's "
        f"ImageNet-1K-only figures.\n{meta['cpu']}, onnxruntime {meta['onnxruntime']}, {meta['date']}.",
        fontsize=6.5,
        va="bottom",
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
