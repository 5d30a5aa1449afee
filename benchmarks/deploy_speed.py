"""All of the deployment issue's ratios, ParameterNet against its static twin, measured in one process.

- ONNX Runtime, batch 1, 1 thread (the paper's latency protocol): the deploy() graphs exported for batch 1, as
  ONNX Runtime optimises them and with every conv in its NCHWc kernels (``optimize_for_onnxruntime``; the
  ParameterNet against the faster of the static model's two, as ``parameternet benchmark`` compares them), and the
  dynamic-batch graphs, portable and for ONNX Runtime's CPU provider (a Scan over the images);
- eager PyTorch, batch 1, 1 thread: undeployed against undeployed and deploy() against deploy() (which folds the
  BatchNorms of the static twin too);
- training step (forward + backward + AdamW, batch 32, 224px, 2 threads, NCHW), as ``layer_speed.py`` times it;
- peak training memory: each model trains in a fresh subprocess; peak RSS and its growth over the state before
  the first step (weights, optimizer, batch) are compared;
- with ``--gpu``: training images/s and peak CUDA memory at batch 128 (a CUDA machine);
- with ``--breakdown``: where the time of the deployed ParameterNet goes at batch 1, one thread: in eager PyTorch
  the routing (pooling and router), the kernel mixing and the convs of all dynamic layers against the static twin's
  convs of the same shapes; in ONNX Runtime its own per-operator profile, grouped the same way.

Timings are medians of interleaved rounds (A, B, A, B, ...); the load average is printed before and after.

    python benchmarks/deploy_speed.py                     # everything on the CPU (about 10 minutes)
    python benchmarks/deploy_speed.py --skip-train        # ONNX Runtime and eager only
    python benchmarks/deploy_speed.py --gpu --skip-cpu    # the GPU section alone
    python benchmarks/deploy_speed.py --breakdown --skip-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

import parameternet
import parameternet.models  # noqa: F401  (registers the models in timm)
from parameternet.export.onnx_export import export_onnx, onnx_session
from parameternet.export.ort_nchwc import optimize_for_onnxruntime
from parameternet.layers import DynamicConv2d
from parameternet.layers.kernels import route

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import interleaved, summarize, train_step_fn  # noqa: E402


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def ratio_line(label: str, times: dict[str, list[float]], dynamic: str, static: str) -> str:
    s = summarize(times, dynamic, static)
    med = s["median_s"]
    return (
        f"  {label}: {med[dynamic] * 1e3:.2f} ms / {med[static] * 1e3:.2f} ms = {s['ratio_of_medians']:.3f}x "
        f"(median of round ratios {s['median_of_round_ratios']:.3f}x)"
    )


def onnx_section(models: dict[str, torch.nn.Module], names: tuple[str, str], rounds: int, img: int) -> list[str]:
    """Each model's batch-1 graph with ONNX Runtime's own optimisations ("ORT") and with every conv moved to its
    NCHWc kernels by parameternet ("NCHWc"; a static model runs faster one way or the other), the portable
    dynamic-batch graph and the dynamic-batch graph for ONNX Runtime's CPU provider (``runtime="onnxruntime-cpu"``),
    all at batch 1."""
    x = np.random.default_rng(0).standard_normal((1, 3, img, img)).astype(np.float32)
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for dynamic_batch, runtime in ((False, "any"), (True, "any"), (True, "onnxruntime-cpu")):
                path = Path(tmp) / f"{name}-{dynamic_batch}-{runtime}.onnx"
                export_onnx(models[name], path, dynamic_batch=dynamic_batch, img_size=img, runtime=runtime)
                graphs = {"dynamic-batch": str(path)} if dynamic_batch else {"ORT": str(path)}
                if runtime != "any":
                    graphs = {"dynamic-batch, onnxruntime-cpu": str(path)}
                elif not dynamic_batch:
                    graphs["NCHWc"] = optimize_for_onnxruntime(path, static_convs=True)[0]
                for graph, source in graphs.items():
                    session = onnx_session(source, threads=1, nchwc=False)
                    fns[(graph, name)] = lambda s=session: s.run(None, {"images": x})
    times = interleaved(fns, rounds, warmup=10)
    med = {k: statistics.median(v) for k, v in times.items()}
    dynamic, static = names
    best = min(("ORT", "NCHWc"), key=lambda g: med[(g, static)])
    lines = []
    for label, graph_d, graph_s in (
        (f"NCHWc vs the static model's faster graph ({best})", "NCHWc", best),
        ("NCHWc vs ORT (the static model as ONNX Runtime runs it)", "NCHWc", "ORT"),
        ("ORT vs ORT (the exported graphs, no rewrite)", "ORT", "ORT"),
        ("dynamic-batch graph vs dynamic-batch graph", "dynamic-batch", "dynamic-batch"),
        ("runtime='onnxruntime-cpu' dynamic-batch graphs (Scan over images)", *["dynamic-batch, onnxruntime-cpu"] * 2),
        (
            "runtime='onnxruntime-cpu' vs the portable dynamic-batch graph",
            "dynamic-batch, onnxruntime-cpu",
            "dynamic-batch",
        ),
    ):
        sub = {dynamic: times[(graph_d, dynamic)], static: times[(graph_s, static)]}
        lines.append(ratio_line(f"ONNX Runtime, batch 1, 1 thread, deploy(), {label}", sub, *names))
    return lines


def eager_section(models: dict[str, torch.nn.Module], names: tuple[str, str], rounds: int, img: int) -> list[str]:
    torch.set_num_threads(1)
    x = torch.randn(1, 3, img, img)
    example = x.clone()
    graphs = {}
    for name in names:
        graphs[("as built", name)] = models[name].eval()
        graphs[("deploy()", name)] = parameternet.deploy(models[name], example_input=example)

    def run(model):
        with torch.inference_mode():
            model(x)

    times = interleaved({k: (lambda m=m: run(m)) for k, m in graphs.items()}, rounds, warmup=5)
    lines = []
    for kind in ("as built", "deploy()"):
        sub = {name: times[(kind, name)] for name in names}
        lines.append(ratio_line(f"eager PyTorch, batch 1, 1 thread, {kind} vs {kind}", sub, *names))
    return lines


def train_section(models, names, rounds, batch, img, threads) -> list[str]:
    torch.set_num_threads(threads)
    fns = {name: train_step_fn(models[name], batch, img, channels_last=False) for name in names}
    times = interleaved(fns, rounds, warmup=2)
    return [ratio_line(f"training step, batch {batch}, {img}px, {threads} threads, NCHW", times, *names)]


def memory_child(name: str, batch: int, img: int, threads: int) -> None:
    """Run in a fresh process: print the peak RSS of two training steps and the RSS before them (bytes)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name)
    step = train_step_fn(model, batch, img, channels_last=False)
    rss = _status_kb("VmRSS") * 1024
    for _ in range(2):
        step()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    print(json.dumps({"model": name, "rss_before": rss, "peak": _status_kb("VmHWM") * 1024}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_section(names, batch, img, threads) -> list[str]:
    found = {}
    for name in names:
        cmd = [sys.executable, __file__, "--memory-child", name, "--batch-size", str(batch), "--img-size", str(img)]
        cmd += ["--train-threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        found[name] = json.loads(out)
    d, s = (found[n] for n in names)
    mb = 2**20
    return [
        f"  peak training memory (RSS, batch {batch}, {img}px, fresh process each): {d['peak'] / mb:.0f} MB / "
        f"{s['peak'] / mb:.0f} MB = {d['peak'] / s['peak']:.3f}x; growth over weights + optimizer + batch: "
        f"{(d['peak'] - d['rss_before']) / mb:.0f} MB / {(s['peak'] - s['rss_before']) / mb:.0f} MB = "
        f"{(d['peak'] - d['rss_before']) / (s['peak'] - s['rss_before']):.3f}x"
    ]


def gpu_section(names, rounds, batch, img) -> list[str]:
    if not torch.cuda.is_available():
        return ["  GPU: no CUDA device here"]
    device = torch.device("cuda")
    results = {}
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, img, img, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[name] = (batch / statistics.median(times), torch.cuda.max_memory_allocated())
        del model, opt, x, y
        torch.cuda.empty_cache()
    d, s = (results[n] for n in names)
    return [
        f"  GPU {torch.cuda.get_device_name()}: training batch {batch}, {img}px, fp32: {names[0]} {d[0]:.0f} img/s, "
        f"{names[1]} {s[0]:.0f} img/s = {s[0] / d[0]:.3f}x time; peak memory {d[1] / 2**30:.2f} GiB / "
        f"{s[1] / 2**30:.2f} GiB = {d[1] / s[1]:.3f}x"
    ]


def eager_breakdown(name: str, rounds: int, img: int) -> list[str]:
    """Time the three parts of every dynamic layer of the deployed model on its real input, and a static conv of
    the same shape (with bias: the static twin's BatchNorm is folded too)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = parameternet.deploy(timm.create_model(name), example_input=(1, 3, img, img))
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
        for m in model.modules()
        if isinstance(m, DynamicConv2d)
    ]
    with torch.inference_mode():
        model(torch.randn(1, 3, img, img))
    for h in hooks:
        h.remove()
    parts = []
    for layer, x in inputs.items():
        static = torch.nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        ).eval()
        with torch.inference_mode():
            alpha = route(layer.router, x.mean((2, 3)))
            weight = (alpha @ layer.weight.view(layer.num_experts, -1)).view(layer.weight.shape[1:])
        parts.append((layer, x, alpha, weight, static))

    def run(what: str) -> None:
        with torch.inference_mode():
            for layer, x, alpha, weight, static in parts:
                if what == "routing":
                    route(layer.router, x.mean((2, 3)))
                elif what == "mixing":
                    alpha @ layer.weight.view(layer.num_experts, -1)
                elif what == "conv":
                    layer.geometry.conv(x, weight, layer.static_bias, layer.groups)
                elif what == "whole layer":
                    layer(x)
                else:
                    static(x)

    kinds = ("routing", "mixing", "conv", "whole layer", "static twin conv")
    times = interleaved({k: (lambda k=k: run(k)) for k in kinds}, rounds, warmup=3)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return [
        f"  eager, batch 1, 1 thread, {len(parts)} dynamic layers of deploy({name}): "
        + ", ".join(f"{k} {med[k]:.2f} ms" for k in kinds)
        + f"; whole - static = {med['whole layer'] - med['static twin conv']:.2f} ms"
    ]


def onnx_breakdown(names: tuple[str, str], rounds: int, img: int) -> list[str]:
    """ONNX Runtime's own per-node profile at batch 1 of the batch-1 graphs (the dynamic one as exported and with
    its convs in NCHWc kernels, and the static one) and of both portable dynamic-batch graphs, summed by kind of node
    (ms per image)."""
    import onnxruntime as ort

    lines = []
    x = np.random.default_rng(0).standard_normal((1, 3, img, img)).astype(np.float32)
    graphs = [(names[0], False, False), (names[0], True, False), (names[1], False, False), (names[1], True, False)]
    graphs += [(names[0], False, True), (names[1], False, True)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, nchwc, dynamic in graphs:
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(timm.create_model(name), path, dynamic_batch=dynamic, img_size=img)
            source = optimize_for_onnxruntime(path, static_convs=True)[0].SerializeToString() if nchwc else str(path)
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / name)
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            for _ in range(rounds):
                session.run(None, {"images": x})
            events = json.loads(Path(session.end_profiling()).read_text())
            kinds: dict[str, float] = {}
            for e in events:
                if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                    continue
                op = e["args"]["op_name"]
                shapes = [next(iter(t.values())) for t in e["args"].get("input_type_shape", [])]
                if op == "MatMul" and len(shapes[0]) == 2 and shapes[0][0] == 1:
                    op = "MatMul (kernel mixing)"
                elif op == "Conv" and len(shapes) > 1 and shapes[1][1] == 1:
                    generic = name == names[0] and not nchwc
                    if generic and dynamic:  # the batch-agnostic graph: one constant conv, experts stacked
                        op = "Conv (depthwise, experts stacked)"
                    else:
                        op = "Conv (depthwise, kernel an input)" if generic else "Conv (depthwise)"
                kinds[op] = kinds.get(op, 0.0) + e["dur"] / 1e3 / rounds
            total = sum(kinds.values())
            top = sorted(kinds.items(), key=lambda kv: -kv[1])[:8]
            lines.append(
                f"  ONNX Runtime profile of {name} ({'dynamic-batch graph at batch 1' if dynamic else 'batch-1 graph'}"
                f"{', NCHWc kernels' if nchwc else ''}, "
                f"{total:.1f} ms of node time): " + ", ".join(f"{k} {v:.2f}" for k, v in top)
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dynamic", default="parameternet_600m")
    p.add_argument("--static", default="ghostnet_600m")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32, help="training batch (CPU)")
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7, help="interleaved training rounds")
    p.add_argument("--infer-rounds", type=int, default=60, help="interleaved ONNX Runtime / eager rounds")
    p.add_argument("--skip-train", action="store_true", help="no training step and no memory")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    p.add_argument("--gpu", action="store_true", help="also train at batch 128 on a CUDA device")
    p.add_argument("--breakdown", action="store_true", help="also show where the batch-1 time goes")
    p.add_argument("--memory-child", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch_size, args.img_size, args.train_threads)
        return

    names = (args.dynamic, args.static)
    print(f"{args.dynamic} / {args.static}  (torch {torch.__version__}, medians of interleaved runs)")
    print(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"  before: {load()}", flush=True)
    if not args.skip_cpu:
        torch.manual_seed(0)
        models = {name: timm.create_model(name).eval() for name in names}
        for line in onnx_section(models, names, args.infer_rounds, args.img_size):
            print(line, flush=True)
        for line in eager_section(models, names, args.infer_rounds, args.img_size):
            print(line, flush=True)
        if not args.skip_train:
            for line in train_section(models, names, args.rounds, args.batch_size, args.img_size, args.train_threads):
                print(line, flush=True)
            for line in memory_section(names, args.batch_size, args.img_size, args.train_threads):
                print(line, flush=True)
    if args.breakdown:
        for line in eager_breakdown(args.dynamic, 30, args.img_size) + onnx_breakdown(names, 30, args.img_size):
            print(line, flush=True)
    if args.gpu:
        for line in gpu_section(names, 20, 128, args.img_size):
            print(line, flush=True)
    print(f"  after: {load()}")


if __name__ == "__main__":
    main()
