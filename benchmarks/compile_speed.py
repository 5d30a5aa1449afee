"""ParameterNet against GhostNet in every execution mode, and the measurements behind the graph formulations.

1. The execution-mode table of docs/deployment.md (``parameternet benchmark modes``): eager, ``torch.compile`` static,
   ``dynamic=True`` and PyTorch's default (compile time apart), the portable dynamic-batch ONNX graphs (batch-agnostic
   and per image) and the ONNX Runtime graph, batch 1 and 8, one thread, every figure in one interleaved run.
2. ``--choices``: how a symbolic-batch graph should compute a depthwise dynamic conv. The functional core
   (``parameternet.layers.functional``) has two batch-agnostic candidates, ``shifted`` (the sum over kernel taps of
   the shifted input times the per-sample kernel; one depthwise conv's work) and ``stacked`` (one constant conv
   with the experts stacked as outputs, then mixing; M times the work, a constant kernel). For each runtime that
   sees such a graph, ONNX Runtime (the portable graph) and inductor (``torch.compile(dynamic=True)`` at a batch
   above 1), ParameterNet-600M is built with each candidate and timed against GhostNet-600M, interleaved.
   ``IMPLEMENTATIONS`` in the functional core holds the winner.

    python benchmarks/compile_speed.py                         # the table (600M pair; about 10 minutes)
    python benchmarks/compile_speed.py --models ghostnet_300m parameternet_300m ghostnet_600m parameternet_600m
    python benchmarks/compile_speed.py --choices --skip-modes  # the depthwise formulation per runtime
    python benchmarks/compile_speed.py --profile 8 --skip-modes  # where ParameterNet's compiled graphs spend time

3. ``--profile BATCH``: ``torch.profiler`` of ParameterNet-600M compiled static, ``dynamic=True`` and by default (a
   symbolic batch after a first call at batch 1) at that batch size, with inductor's kernels named
   (``torch._inductor.config.cpp.enable_kernel_profile``): the time in the generated kernels and the top entries.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import parameternet
from parameternet.benchmark.modes import MODES, format_modes, run_modes, write_modes
from parameternet.export.onnx_export import export_onnx, onnx_session
from parameternet.layers import functional

CANDIDATES = ("shifted", "stacked")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def choices(batch_sizes: list[int], rounds: int, img: int) -> list[str]:
    """Time GhostNet-600M and ParameterNet-600M with each depthwise candidate, per runtime and batch size."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, img, img, generator=gen) for b in batch_sizes}
    models = {}
    for name in ("ghostnet_600m", "parameternet_600m"):
        torch.manual_seed(0)
        models[name] = parameternet.deploy(parameternet.create_model(name).eval(), example_input=xs[batch_sizes[0]][:1])
    calls = {}
    table = functional.IMPLEMENTATIONS
    keep = dict(table[functional.Context.ONNX]), dict(table[functional.Context.INDUCTOR])
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        try:
            for candidate in ("static",) + CANDIDATES:
                name = "ghostnet_600m" if candidate == "static" else "parameternet_600m"
                if candidate != "static":
                    table[functional.Context.ONNX]["depthwise"] = candidate
                    table[functional.Context.INDUCTOR]["depthwise"] = candidate
                path = Path(tmp) / f"{candidate}.onnx"
                export_onnx(models[name], path, dynamic_batch=True, img_size=img, deploy=False)
                session = onnx_session(path, threads=1, nchwc=False)
                torch._dynamo.reset()
                compiled = torch.compile(models[name], dynamic=True)
                for b in batch_sizes:
                    feed = {session.get_inputs()[0].name: xs[b].numpy()}
                    calls["onnx", candidate, b] = lambda s=session, f=feed: s.run(None, f)
                    if b > 1:  # a batch of one is specialised by PyTorch and never takes the symbolic path
                        x = xs[b]
                        compiled(x)  # compiles with the candidate now in the table
                        calls["inductor", candidate, b] = lambda c=compiled, x=x: c(x)
        finally:
            table[functional.Context.ONNX].update(keep[0])
            table[functional.Context.INDUCTOR].update(keep[1])
        times = {k: [] for k in calls}
        for i in range(rounds + 2):
            for key, call in calls.items():
                t = _time(call)
                if i >= 2:
                    times[key].append(t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    head = " | ".join(f"PN-600M {c} ms (ratio)" for c in CANDIDATES)
    lines = [f"| runtime | batch | GhostNet-600M ms | {head} |"]
    lines.append("|---|---:|---:|" + "---:|" * len(CANDIDATES))
    for runtime in ("onnx", "inductor"):
        for b in batch_sizes:
            if (runtime, "static", b) not in med:
                continue
            s = med[runtime, "static", b]
            cells = " | ".join(f"{med[runtime, c, b]:.1f} ({med[runtime, c, b] / s:.2f}x)" for c in CANDIDATES)
            lines.append(f"| {runtime} | {b} | {s:.1f} | {cells} |")
    lines.append(f"\nmedians of {rounds} interleaved rounds, 1 thread, {img}px; load average {os.getloadavg()[0]:.2f}")
    return lines


def profile_compiled(batch: int, img: int, top: int = 8) -> list[str]:
    """Profile ParameterNet-600M's compiled graphs at ``batch`` (3 calls after 2 warm-up calls each)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(0))
    model = parameternet.deploy(parameternet.create_model("parameternet_600m").eval(), example_input=x[:1])
    lines = []
    with torch.no_grad():
        for label, dynamic in (("static", False), ("dynamic=True", True), ("default", None)):
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=dynamic)
            if dynamic is None:
                compiled(x[:1])  # the first batch size is static; the second makes the batch symbolic
            for _ in range(2):
                compiled(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    compiled(x)
            events = prof.key_averages()
            kernels = sum(e.self_cpu_time_total for e in events if e.key.startswith("graph_")) / 3e3
            total = sum(e.self_cpu_time_total for e in events) / 3e3
            lines.append(f"ParameterNet-600M, {label}, batch {batch}: {total:.1f} ms per call, {kernels:.1f} ms in "
                         "inductor's generated kernels; top entries (ms per call):")  # fmt: skip
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
                lines.append(f"  {e.self_cpu_time_total / 3e3:8.1f}  {e.key[:90]}")
    lines.append(f"load average {os.getloadavg()[0]:.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ghostnet_600m", "parameternet_600m"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--output", help="also write modes.csv / modes.json here")
    ap.add_argument("--choices", action="store_true", help="time the depthwise candidates per runtime")
    ap.add_argument("--skip-modes", action="store_true")
    ap.add_argument("--profile", type=int, metavar="BATCH", help="profile ParameterNet-600M's compiled graphs")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if not args.skip_modes:
        rows, meta = run_modes(
            args.models, modes=args.modes, batch_sizes=args.batch_sizes, rounds=args.rounds, img_size=args.img_size
        )
        print(format_modes(rows, meta), flush=True)
        if args.output:
            write_modes(rows, meta, args.output)
    if args.choices:
        print("\n".join(choices(args.batch_sizes, args.rounds, args.img_size)))
    if args.profile:
        print("\n".join(profile_compiled(args.profile, args.img_size)))


if __name__ == "__main__":
    main()
