"""ParameterNet against its static twin, in one process: training step and eager batch-1 inference.

Timings on a shared machine are noisy, so the two models run interleaved (A, B, A, B, ...) and we report the
median of each and the ratio of medians. Defaults are the foundation issue's protocol:
training step = forward + backward + AdamW step at batch 32, 224px, 2 threads; inference = eager, batch 1, 1 thread.

    python benchmarks/layer_speed.py                       # parameternet_600m vs ghostnet_600m
    python benchmarks/layer_speed.py --dynamic parameternet_300m --static ghostnet_300m --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import parameternet.models  # noqa: F401  (registers the models in timm)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_time(fn))
    return times


def train_step_fn(model: torch.nn.Module, batch: int, img: int, channels_last: bool):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    x = torch.randn(batch, 3, img, img).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def infer_fn(model: torch.nn.Module, img: int):
    model.eval()
    x = torch.randn(1, 3, img, img)

    @torch.inference_mode()
    def run():
        model(x)

    return run


def summarize(times: dict[str, list[float]], dynamic: str, static: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [d / s for d, s in zip(times[dynamic], times[static])]
    return {
        "median_s": med,
        "ratio_of_medians": med[dynamic] / med[static],
        "median_of_round_ratios": statistics.median(per_round),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dynamic", default="parameternet_600m")
    p.add_argument("--static", default="ghostnet_600m")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train-threads", type=int, default=2)
    p.add_argument("--infer-threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7, help="interleaved training rounds")
    p.add_argument("--infer-rounds", type=int, default=50)
    p.add_argument("--channels-last", action="store_true", help="train both models in channels_last")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    models = {name: timm.create_model(name) for name in (args.dynamic, args.static)}
    result = {"dynamic": args.dynamic, "static": args.static, "torch": torch.__version__}

    if not args.skip_train:
        torch.set_num_threads(args.train_threads)
        fns = {n: train_step_fn(m, args.batch_size, args.img_size, args.channels_last) for n, m in models.items()}
        result["train"] = summarize(interleaved(fns, args.rounds, warmup=2), args.dynamic, args.static)
        result["train"].update(batch_size=args.batch_size, threads=args.train_threads, channels_last=args.channels_last)

    torch.set_num_threads(args.infer_threads)
    fns = {n: infer_fn(m, args.img_size) for n, m in models.items()}
    result["infer"] = summarize(interleaved(fns, args.infer_rounds, warmup=5), args.dynamic, args.static)
    result["infer"].update(batch_size=1, threads=args.infer_threads)

    if args.json:
        print(json.dumps(result, indent=2))
        return
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"{args.dynamic} / {args.static}  (torch {torch.__version__}, medians of interleaved runs)")
    if "train" in result:
        t = result["train"]
        print(
            f"  training step, batch {args.batch_size}, {args.img_size}px, {args.train_threads} threads, {layout}: "
            f"{t['median_s'][args.dynamic] * 1e3:.0f} ms / {t['median_s'][args.static] * 1e3:.0f} ms "
            f"= {t['ratio_of_medians']:.3f}x"
        )
    i = result["infer"]
    print(
        f"  eager inference, batch 1, {args.infer_threads} thread(s): "
        f"{i['median_s'][args.dynamic] * 1e3:.2f} ms / {i['median_s'][args.static] * 1e3:.2f} ms "
        f"= {i['ratio_of_medians']:.3f}x"
    )


if __name__ == "__main__":
    main()
