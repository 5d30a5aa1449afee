"""Every registered model counted by four counters: ``parameternet.counting.count_macs`` (the paper's convention),
``torchprofile.profile_macs`` and fvcore's ``FlopCountAnalysis`` called plainly, and
``torch.utils.flop_counter.FlopCounterMode`` (FLOPs, two per multiply-add). Prints a markdown table.

    python benchmarks/flop_counters.py --img-size 224 --batch 1
"""

from __future__ import annotations

import argparse
import logging
import warnings

import timm
import torch
from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode
from torchprofile import profile_macs

from parameternet.counting import count_macs
from parameternet.models import MODELS


def counts(name: str, img_size: int, batch: int) -> tuple[int, int, int, int]:
    kwargs = {"img_size": img_size} if "swin" in name else {}
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings, and torchprofile's for operators it has no handler for
        paper = count_macs(model, x)
        tp = profile_macs(model, x)
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fv = analysis.total()
        with FlopCounterMode(display=False) as mode:
            model(x)
    return paper, tp, fv, mode.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    print(f"Batch {args.batch}, {args.img_size} px, torch {torch.__version__}; MACs, FlopCounterMode in FLOPs.\n")
    print("| model | `count_macs` (the paper's) | torchprofile `profile_macs` | fvcore `FlopCountAnalysis` | "
          "`FlopCounterMode` |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for name in MODELS:
        cells = " | ".join(f"{c / 1e6:,.2f}M" for c in counts(name, args.img_size, args.batch))
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
