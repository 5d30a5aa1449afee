"""Every dynamic-conv implementation on every distinct layer geometry of a ParameterNet, forward + backward, timed
on one device against a static ``nn.Conv2d`` of the same geometry: the measurements behind the functional core's
table (``parameternet.layers.functional.select``).

For each geometry of the model (found by one forward pass with hooks), each implementation that computes it, each
memory format (NCHW, channels_last) and each precision (fp32, bf16 autocast), it times ``--steps`` forward + backward
passes at ``--batch`` after a warm-up, in interleaved rounds, and reports the median milliseconds. The ``static`` row is
the same geometry as a plain ``nn.Conv2d``: the floor. Rows go to ``--csv``; ``--profile`` adds the top kernels of
a whole-model training step (torch.profiler) to a text file.

    python benchmarks/gpu_layers.py --csv results/benchmark/gpu_layers.csv      # on a GPU
    python benchmarks/gpu_layers.py --device cpu --batch 2 --img 64 --steps 1    # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import parameternet.models  # noqa: F401  (registers the models in timm)
from parameternet.layers import DynamicConv2d, functional
from parameternet.layers import triton_depthwise as triton_dw


def geometries(model_name: str, img: int) -> list[tuple[DynamicConv2d, tuple[int, int, int]]]:
    """One layer per distinct (geometry, input size), with its input ``(C, H, W)``, in model order."""
    model = timm.create_model(model_name).eval()
    seen: dict = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, DynamicConv2d):

            def note(mod, args):
                seen.setdefault((mod.geometry, tuple(args[0].shape[1:])), mod)

            hooks.append(m.register_forward_pre_hook(note))
    with torch.no_grad():
        model(torch.randn(1, 3, img, img))
    for h in hooks:
        h.remove()
    return [(layer, shape) for (_, shape), layer in seen.items()]


def candidates(geo: functional.ConvGeometry, x: torch.Tensor) -> list[str]:
    names = ["grouped"]
    if geo.kind == "pointwise":
        names += ["per_sample_matmul", "bmm"]
    if geo.kind != "pointwise" and geo.in_channels // geo.groups * geo.kernel_size[0] * geo.kernel_size[1] <= 32:
        names.append("shifted")
    if geo.kind == "other":
        names.append("unfold")
    if functional.triton_eligible(geo) and triton_dw.available(x):
        names.append("triton")
    return names


def static_step(conv, x, autocast: bool):
    def run():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            y = conv(x)
        y.float().sum().backward()

    return run


def dynamic_step(layer: DynamicConv2d, x, autocast: bool, impl: str):
    """Forward + backward of the layer by one implementation, with the release's router (linear, sigmoid)."""

    def run():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            alpha = torch.sigmoid(layer.router.fc(x.mean((2, 3))))
            bias = None if layer.bias is None else alpha @ layer.bias
            y = functional.dynamic_conv2d(x, alpha, layer.weight, bias, layer.geometry, impl)
        y.float().sum().backward()

    return run


def train_step(model, x, y):
    def step():
        with torch.autocast(x.device.type, torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    return step


def timed(fn, steps: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="parameternet_600m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--csv", default="gpu_layers.csv")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer timings (with --profile)")
    p.add_argument("--profile", help="write the top kernels of a whole-model bf16 training step here")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    from parameternet.experiments.provenance import provenance

    prov = provenance()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    facts = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda or "", commit=prov["commit"],
                 dirty=prov["dirty"], batch=args.batch)  # fmt: skip
    rows = []
    for layer, (C, H, W) in [] if args.no_layers else geometries(args.model, args.img):
        layer = layer.to(device)
        geo = layer.geometry
        static = torch.nn.Conv2d(C, geo.out_channels, geo.kernel_size, geo.stride, geo.padding, geo.dilation,
                                 geo.groups, bias=True).to(device)  # fmt: skip
        for fmt in ("nchw", "nhwc"):
            for prec in ("fp32", "bf16"):
                x = torch.randn(args.batch, C, H, W, device=device)
                if fmt == "nhwc":
                    x = x.contiguous(memory_format=torch.channels_last)
                    static = static.to(memory_format=torch.channels_last)
                x.requires_grad_(True)
                ac = prec == "bf16"

                fns = {"static": static_step(static, x, ac)}
                for impl in candidates(geo, x):
                    fns[impl] = dynamic_step(layer, x, ac, impl)
                times = {n: [] for n in fns}
                for fn in fns.values():
                    fn()
                for _ in range(args.rounds):
                    for n, fn in fns.items():
                        times[n].append(timed(fn, args.steps, device))
                base = statistics.median(times["static"])
                for n, t in times.items():
                    med = statistics.median(t)
                    row = dict(kind=geo.kind, C=C, O=geo.out_channels, k=geo.kernel_size[0], stride=geo.stride[0],
                               groups=geo.groups, H=H, W=W, layout=fmt, precision=prec, impl=n, ms=round(med, 4),
                               vs_static=round(med / base, 3), **facts)  # fmt: skip
                    rows.append(row)
                    print(",".join(str(v) for v in row.values()), flush=True)
    with open(args.csv, "w", newline="") if rows else open("/dev/null", "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        out = []
        for name in ("ghostnet_600m", args.model):
            for cl in (False, True):
                model = timm.create_model(name).to(device).train()
                x = torch.randn(args.batch, 3, args.img, args.img, device=device)
                if cl:
                    model = model.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, 1000, (args.batch,), device=device)

                step = train_step(model, x, y)
                for _ in range(3):
                    step()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
                out.append(f"== {name} channels_last={cl} bf16 train step, batch {args.batch}\n")
                out.append(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
                del model
        Path(args.profile).write_text("\n".join(out))


if __name__ == "__main__":
    main()
