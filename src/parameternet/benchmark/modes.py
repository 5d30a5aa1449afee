"""``parameternet benchmark modes``: a ParameterNet against its static twin in every way it can be run.

For each model (default GhostNet-600M and ParameterNet-600M) and batch size (default 1 and 8), one process times
the ``deploy()`` model:

- ``eager``: eager PyTorch;
- ``compile-static``: ``torch.compile(model, dynamic=False)`` (inductor; one graph per batch size);
- ``compile-dynamic``: ``torch.compile(model, dynamic=True)`` (one graph for every batch size above 1; PyTorch
  specialises a batch of one into its own graph); every dimension is symbolic, the image size too;
- ``compile-auto``: ``torch.compile(model)``, PyTorch's default: a static graph for the first batch size, then, once
  the batch size changes, one graph with a symbolic batch (and a static image size) for every other;
- ``onnx-portable``: the portable dynamic-batch graph of :func:`~parameternet.export.onnx_export.export_onnx`, in ONNX
  Runtime with its own optimisations only;
- ``onnx-per-image``: ``export_onnx(..., per_image=True)``, the portable graph for one image in a ``Scan`` over the
  images, in ONNX Runtime with its own optimisations only;
- ``onnx-ort``: ``export_onnx(..., runtime="onnxruntime-cpu")``, the graph for ONNX Runtime's CPU provider (NCHWc
  kernels, a ``Scan`` over the images).

Every (model, mode, batch) is timed in interleaved rounds (all of them once per round, so a change of load touches
every figure alike), ``threads`` torch / ONNX Runtime threads, after warm-up; medians and 90th percentiles in
milliseconds per batch. A compiled model's first call at each batch size is its compile time, reported apart
(``compile_s``), with the number of graphs dynamo made for it over all batch sizes (``graphs``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parameternet.errors import ParameterNetError
from parameternet.toolkit import MIN_IMG_SIZE, image_input_shape

__all__ = ["MODES", "ModeRow", "format_modes", "run_modes", "write_modes"]

log = logging.getLogger(__name__)

MODES = ("eager", "compile-static", "compile-dynamic", "compile-auto", "onnx-portable", "onnx-per-image", "onnx-ort")


@dataclass
class ModeRow:
    """One (model, mode, batch size): milliseconds per batch; ``compile_s`` and ``graphs`` for compiled modes."""

    model: str
    mode: str
    batch: int
    median_ms: float
    p90_ms: float
    compile_s: float | None
    graphs: int | None


def _runner(mode: str, model: torch.nn.Module, root: Path, name: str, img_size, threads: int):
    """A function ``batch -> callable timing one forward`` for ``mode``; exports happen here, compiles on first use."""
    if mode == "eager":
        return lambda x: lambda: model(x)
    if mode.startswith("compile"):
        compiled = torch.compile(model, dynamic={"compile-static": False, "compile-dynamic": True}.get(mode))
        return lambda x: lambda: compiled(x)
    from parameternet.export.onnx_export import export_onnx, onnx_session

    path = root / f"{name}-{mode}.onnx"
    runtime = "onnxruntime-cpu" if mode == "onnx-ort" else "any"
    per_image = True if mode == "onnx-per-image" else None
    export_onnx(
        model, path, dynamic_batch=True, img_size=tuple(img_size), runtime=runtime, per_image=per_image, deploy=False
    )
    session = onnx_session(path, threads=threads, nchwc=False)
    input_name = session.get_inputs()[0].name

    def make(x: torch.Tensor):
        feed = {input_name: x.numpy()}
        return lambda: session.run(None, feed)

    return make


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _check(models, modes, batch_sizes, threads, rounds, warmup, img_size) -> None:
    from parameternet.models import check_model_name

    if not models:
        raise ParameterNetError("no models to benchmark; name at least one timm model.")
    for name in models:
        check_model_name(name)
    for mode in modes:
        if mode not in MODES:
            raise ParameterNetError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}.")
    for what, values in (("batch size", batch_sizes), ("threads", [threads]), ("rounds", [rounds])):
        for v in values:
            if not isinstance(v, int) or v < 1:
                raise ParameterNetError(f"{what} must be a positive integer, got {v!r}.")
    if img_size is not None and (not isinstance(img_size, int) or img_size < MIN_IMG_SIZE):
        raise ParameterNetError(
            f"img_size must be an integer >= {MIN_IMG_SIZE} (or None: the model's own), got {img_size!r}."
        )
    if warmup < 0:
        raise ParameterNetError(f"warmup must be >= 0, got {warmup!r}.")


def run_modes(
    models: list[str] | tuple[str, ...] = ("ghostnet_600m", "parameternet_600m"),
    *,
    modes: list[str] | tuple[str, ...] = MODES,
    batch_sizes: list[int] | tuple[int, ...] = (1, 8),
    threads: int = 1,
    rounds: int = 30,
    warmup: int = 3,
    img_size: int | None = None,
) -> tuple[list[ModeRow], dict[str, Any]]:
    """Time every model in every mode at every batch size, interleaved; returns the rows and the run's description.

    Raises :class:`~parameternet.errors.ParameterNetError` for an unknown model or mode, or a non-positive size.
    """
    from parameternet.export.folding import deploy
    from parameternet.models import create_model_for_size

    models, modes, batch_sizes = list(models), list(modes), list(batch_sizes)
    _check(models, modes, batch_sizes, threads, rounds, warmup, img_size)
    load_before = os.getloadavg()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls: dict[tuple[str, str, int], Callable[[], Any]] = {}
    compile_s: dict[tuple[str, str, int], float] = {}
    graphs: dict[tuple[str, str], int] = {}
    times: dict[tuple[str, str, int], list[float]] = {}
    tmp = tempfile.TemporaryDirectory()
    # Every model of one class compiles into the same frame, once per compile mode and batch size: past dynamo's
    # recompile limit (8) it would run the rest eagerly, unannounced.
    compiles = sum(mode.startswith("compile") for mode in modes) * len(models) * len(batch_sizes)
    limit = max(torch._dynamo.config.recompile_limit, compiles + 4)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
            for name in models:
                torch.manual_seed(0)
                model = create_model_for_size(name, img_size).eval()
                shape = image_input_shape(model, img_size)
                generator = torch.Generator().manual_seed(0)
                inputs = {b: torch.randn(b, *shape, generator=generator) for b in batch_sizes}
                model = deploy(model, example_input=inputs[batch_sizes[0]][:1])
                for mode in modes:
                    log.info("prepare %s %s", name, mode)
                    make = _runner(mode, model, Path(tmp.name), name, shape[1:], threads)
                    before = _graph_count()
                    for b in batch_sizes:
                        call = calls[name, mode, b] = make(inputs[b])
                        start = time.perf_counter()
                        call()  # a compiled model compiles here
                        first = time.perf_counter() - start
                        if mode.startswith("compile"):
                            compile_s[name, mode, b] = first
                    if mode.startswith("compile"):
                        graphs[name, mode] = _graph_count() - before
                        if not graphs[name, mode]:
                            raise ParameterNetError(
                                f"torch.compile made no graph for {name} ({mode}), so it would be timed eagerly; "
                                "see PyTorch's log (TORCH_LOGS=recompiles) and benchmark fewer models at a time."
                            )
            log.info("time %d calls: %d warm-up and %d timed rounds", len(calls), warmup, rounds)
            for i in range(warmup + rounds):
                for key, call in calls.items():
                    start = time.perf_counter()
                    call()
                    if i >= warmup:
                        times.setdefault(key, []).append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(prev_threads)
        tmp.cleanup()
    import onnxruntime

    from parameternet.benchmark.cpu import _cpu_name

    meta = {
        "protocol": f"deploy() models, {img_size or 'default'} px, {threads} thread(s), {warmup} warm-up and "
        f"{rounds} timed rounds, every (model, mode, batch) once per round; medians in ms per batch",
        "cpu": _cpu_name(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip
    return _rows(times, compile_s, graphs), meta


def _rows(times: dict, compile_s: dict, graphs: dict) -> list[ModeRow]:
    """A row per (model, mode, batch): the median and 90th percentile of its timed calls in ms, the compile time
    (the first call's time less a call's) and the graphs compiled."""
    rows = []
    for (name, mode, b), ts in times.items():
        ms = [t * 1e3 for t in ts]
        p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
        c = compile_s.get((name, mode, b))
        if c is not None:  # the first call's time less one call's: what compiling cost
            c = max(0.0, c - statistics.median(ts))
        rows.append(ModeRow(name, mode, b, statistics.median(ms), p90, c, graphs.get((name, mode))))
    return rows


def static_twin(name: str) -> str:
    """The static model a registered ParameterNet adds parameters to: ``parameternet_600m`` -> ``ghostnet_600m``,
    ``parameternet_mini`` -> ``ghostnet_mini``, ``parameternet_swin_300m`` -> ``swin_300m``."""
    rest = name.removeprefix("parameternet_")
    return rest if rest.startswith("swin") else f"ghostnet_{rest}"


def mode_ratios(rows: list[ModeRow]) -> list[tuple[str, str, str, int, float]]:
    """(dynamic, static, mode, batch, dynamic / static median) for every ParameterNet whose twin was timed too."""
    by = {(r.model, r.mode, r.batch): r for r in rows}
    out = []
    for (name, mode, b), r in by.items():
        static = static_twin(name)
        if name.startswith("parameternet_") and (static, mode, b) in by:
            out.append((name, static, mode, b, r.median_ms / by[static, mode, b].median_ms))
    return out


def format_modes(rows: list[ModeRow], meta: dict[str, Any]) -> str:
    """A markdown table: per pair, mode and batch, both medians, their ratio and the compile times."""
    by = {(r.model, r.mode, r.batch): r for r in rows}
    lines = [
        "| models | mode | batch | static ms | ParameterNet ms | ratio | compile s (static / PN) | graphs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dynamic, static, mode, b, ratio in mode_ratios(rows):
        d, s = by[dynamic, mode, b], by[static, mode, b]
        comp = f"{s.compile_s:.0f} / {d.compile_s:.0f}" if d.compile_s is not None else "-"
        n = f"{s.graphs} / {d.graphs}" if d.graphs is not None else "-"
        lines.append(
            f"| {dynamic} / {static} | {mode} | {b} | {s.median_ms:.1f} | {d.median_ms:.1f} | {ratio:.2f}x | {comp} "
            f"| {n} |"
        )
    from parameternet.benchmark.cpu import machine_line

    if len(lines) == 2:
        lines = ["No ParameterNet was timed with its static twin (e.g. parameternet_600m with ghostnet_600m), so there "
                 "are no ratios; every timing is in modes.csv."]  # fmt: skip
    lines += ["", f"{meta['protocol']}. {machine_line(meta)}"]
    return "\n".join(lines)


def write_modes(rows: list[ModeRow], meta: dict[str, Any], output: str | Path) -> dict[str, Path]:
    """Write ``modes.csv`` (one row per model, mode and batch) and ``modes.json`` (the run and the ratios)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "modes.csv", "json": out / "modes.json"}
    from parameternet.benchmark.cpu import write_rows_csv

    write_rows_csv(paths["csv"], rows)
    keys = ("dynamic", "static", "mode", "batch", "ratio")
    paths["json"].write_text(json.dumps(dict(meta, ratios=[dict(zip(keys, r)) for r in mode_ratios(rows)]), indent=1))
    return paths
