"""The Triton per-sample depthwise conv against cuDNN, forward + backward, on ParameterNet-600M's depthwise layers.

For each depthwise geometry of ``results/benchmark/gpu_layers.csv`` (rows ``kind=depthwise``: channels, kernel,
stride, map size) and each memory format (NCHW, channels_last), at ``--batch`` in bf16, it times forward + backward
(input, kernel and bias gradients) of three ways to compute the same per-sample depthwise conv:

- ``triton``: :func:`parameternet.layers.triton_depthwise.per_sample_depthwise`, ``(B, C, k, k)`` kernels;
- ``grouped``: ``F.conv2d`` with ``groups = B * C`` on the batch folded into the channels (NCHW: a channels_last
  input is copied), the portable formulation;
- ``static``: a plain depthwise ``nn.Conv2d`` (one kernel shared by the batch) in the same memory format: the floor
  cuDNN sets for this geometry.

Each time is the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). One CSV line per case
goes to stdout and to ``--csv``. Triton's compiles run first in ``--jobs`` processes that fill its on-disk cache, and
the run stops at ``--budget`` seconds (the cases left are named), so it fits in a minute on an H100 / H200.

    python benchmarks/triton_depthwise_speed.py --csv results/benchmark/triton_depthwise_speed.csv   # on a GPU
    python benchmarks/triton_depthwise_speed.py --device cpu --smoke     # one tiny case in Triton's interpreter
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEOMETRIES_CSV = ROOT / "results" / "benchmark" / "gpu_layers.csv"
FIELDS = ["C", "k", "stride", "H", "W", "layout", "dtype", "batch", "triton_ms", "grouped_ms", "static_ms",
          "triton_vs_grouped", "triton_vs_static", "device", "torch", "triton"]  # fmt: skip


def geometries(path: Path) -> list[tuple[int, int, int, int, int]]:
    """The distinct depthwise ``(C, k, stride, H, W)`` of a gpu_layers.csv, in file order."""
    seen: dict = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["kind"] == "depthwise" and row["C"] == row["O"] == row["groups"]:
                seen.setdefault(tuple(int(row[k]) for k in ("C", "k", "stride", "H", "W")), None)
    return list(seen)


def make_case(geo, layout: str, batch: int, device: str, dtype):
    """The operands and the three forward + backward closures of one case."""
    import torch
    import torch.nn.functional as F

    from parameternet.layers import triton_depthwise as tdw

    C, k, s, H, W = geo
    p = k // 2
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(0)

    def param(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_(True)

    x = torch.randn(batch, C, H, W, generator=gen).to(device, dtype).contiguous(memory_format=fmt).requires_grad_(True)
    w, b = param(batch, C, k, k), param(batch, C)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    g = torch.randn(batch, C, OH, OW, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    static = torch.nn.Conv2d(C, C, k, s, p, groups=C, bias=True).to(device, dtype, memory_format=fmt)

    def triton_step():
        y = tdw.per_sample_depthwise(x, w, b, (s, s), (p, p, p, p), (1, 1))
        return torch.autograd.grad(y, (x, w, b), g)

    def grouped_step():
        xf = x.reshape(1, batch * C, H, W)  # a copy when x is channels_last
        y = F.conv2d(xf, w.reshape(batch * C, 1, k, k), b.reshape(-1), s, p, 1, batch * C)
        return torch.autograd.grad(y.view(batch, C, OH, OW), (x, w, b), g)

    def static_step():
        return torch.autograd.grad(static(x), (x, static.weight, static.bias), g)

    return {"triton": triton_step, "grouped": grouped_step, "static": static_step}


def _warm(geo, batch: int) -> None:
    """One Triton forward + backward of a geometry in both layouts (a worker process: fills the compile cache)."""
    import torch

    for layout in ("nchw", "nhwc"):
        make_case(geo, layout, batch, "cuda", torch.bfloat16)["triton"]()
    torch.cuda.synchronize()


def precompile(cases, batch: int, jobs: int) -> None:
    """Compile every case's kernels in ``jobs`` processes at once: they share Triton's on-disk cache, so the timed
    process then loads them instead of compiling one after another."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for f in [pool.submit(_warm, geo, batch) for geo in cases]:
            f.result()


def bench_ms(fn, device: str, rep_ms: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median")
    t0 = time.perf_counter()  # the interpreter (a smoke run): once is enough to show it runs
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--geometries", type=Path, default=GEOMETRIES_CSV, help="a gpu_layers.csv to read them from")
    p.add_argument("--csv", type=Path, help="write the rows here")
    p.add_argument("--rep", type=int, default=30, help="milliseconds of timed runs a measurement (do_bench)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes (0: none)")
    p.add_argument("--budget", type=float, default=50.0, help="seconds: stop starting cases past this")
    p.add_argument("--smoke", action="store_true", help="one tiny case (with --device cpu: in Triton's interpreter)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    start = time.perf_counter()

    import torch
    import triton

    from parameternet.layers import triton_depthwise as tdw

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --smoke")
    if not tdw.available(torch.empty(0, device=args.device)):
        sys.exit("the Triton kernels cannot run here (a CPU needs TRITON_INTERPRET=1 set before Triton is imported)")
    torch.backends.cudnn.benchmark = True
    cases = [(6, 3, 1, 5, 6)] if args.smoke else geometries(args.geometries)
    batch = 2 if args.smoke else args.batch
    dtype = torch.bfloat16
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    if args.device == "cuda" and args.jobs > 0 and not args.smoke:
        try:
            precompile(cases, batch, args.jobs)
            print(f"# compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        except Exception as e:  # the timed process compiles what is missing, one kernel after another
            print(f"# parallel compile failed ({e!r}); compiling as the cases run", file=sys.stderr, flush=True)

    print(",".join(FIELDS), flush=True)
    rows, left = [], []
    for geo in cases:
        for layout in ("nchw", "nhwc"):
            if time.perf_counter() - start > args.budget:
                left.append(f"{geo}/{layout}")
                continue
            steps = make_case(geo, layout, batch, args.device, dtype)
            ms = {name: bench_ms(fn, args.device, args.rep) for name, fn in steps.items()}
            C, k, s, H, W = geo
            row = dict(C=C, k=k, stride=s, H=H, W=W, layout=layout, dtype="bf16", batch=batch,
                       triton_ms=round(ms["triton"], 4), grouped_ms=round(ms["grouped"], 4),
                       static_ms=round(ms["static"], 4),
                       triton_vs_grouped=round(ms["triton"] / ms["grouped"], 3),
                       triton_vs_static=round(ms["triton"] / ms["static"], 3),
                       device=device_name, torch=torch.__version__, triton=triton.__version__)  # fmt: skip
            rows.append(row)
            print(",".join(str(row[f]) for f in FIELDS), flush=True)
            del steps
    if left:
        print(f"# budget of {args.budget:.0f} s reached; not run: {' '.join(left)}", file=sys.stderr)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    print(f"# {len(rows)} cases in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
