"""What computing the routers in float32 under autocast costs: training steps under bf16 autocast with the
routers in float32 (the layers' behaviour) against the same steps with the routers left to autocast (bf16), side by
side in one process, interleaved rounds, medians of the per-round ratios.

The bf16 variant is made by replacing ``parameternet.layers.router.router_precision`` with a no-op for the
duration of its steps; everything else is the same code. Two models: a LLaMA with 8 experts on ``down_proj`` and
ParameterNet-300M at 64 px.

    python benchmarks/router_precision_cost.py --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

import parameternet.models  # noqa: F401  (registers the models in timm)
from parameternet.layers import kernels, moe, router


class _NoPrecision:
    """``router_precision`` that leaves autocast on (the routers then run in its dtype)."""

    active = False

    def __init__(self, x):
        pass

    def cast(self, t):
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@contextlib.contextmanager
def bf16_routers():
    saved = router.router_precision
    for module in (router, kernels, moe):
        module.router_precision = _NoPrecision
    try:
        yield
    finally:
        for module in (router, kernels, moe):
            module.router_precision = saved


def llama_step(args):
    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM

    torch.manual_seed(0)
    config = ParameterNetLlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                                     num_hidden_layers=2, num_attention_heads=4, num_experts=8,
                                     moe_projections=["down_proj"], max_position_embeddings=256)  # fmt: skip
    model = ParameterNetLlamaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


def conv_step(args):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("parameternet_300m", num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name, build in (("llama_moe8_down_proj", llama_step), ("parameternet_300m_64px", conv_step)):
        step = build(args)
        step()
        with bf16_routers():
            step()
        ratios, fp32_t, bf16_t = [], [], []
        for _ in range(args.rounds):
            t0 = time.process_time()
            for _ in range(args.steps):
                step()
            t_fp32 = time.process_time() - t0
            with bf16_routers():
                t0 = time.process_time()
                for _ in range(args.steps):
                    step()
                t_bf16 = time.process_time() - t0
            fp32_t.append(t_fp32)
            bf16_t.append(t_bf16)
            ratios.append(t_fp32 / t_bf16)
        fp32_ms = statistics.median(fp32_t) / args.steps * 1e3
        bf16_ms = statistics.median(bf16_t) / args.steps * 1e3
        ratio = statistics.median(ratios)
        print(
            f"{name}: float32 routers {fp32_ms:.1f} ms/step, bf16 routers {bf16_ms:.1f} ms/step, "
            f"ratio (median of {args.rounds} rounds) {ratio:.3f}x  "
            f"[CPU time, {args.threads} thread(s), torch {torch.__version__}]"
        )


if __name__ == "__main__":
    main()
