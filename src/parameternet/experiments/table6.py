"""Table 6 of ParameterNet (arXiv 2306.14525, sec. 4.4): dynamic convolution against re-parameterised
convolution at GhostNet-300M size, training against inference parameters.

Both rows start from ``ghostnet_300m`` and convert the layers the release makes dynamic: :func:`parameterize`'s
defaults (the one-position SE convs, ``conv_head`` and the classifier stay static) minus the strided depthwise
``conv_dw`` of each bottleneck. That conversion with ``method="dynamic"`` is exactly ``parameternet_300m``;
with ``method="repconv"`` every such conv trains with three extra conv + BatchNorm branches. "Inference" is
:func:`~parameternet.export.folding.deploy` with ``fold_bn=False``, the paper's way of counting (BatchNorms counted,
not folded): the RepConv model merges back to GhostNet-300M, the dynamic one keeps every expert.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from parameternet.conversion import parameterize
from parameternet.counting import count_macs
from parameternet.export.folding import deploy

__all__ = ["PAPER", "TABLE6_EXCLUDE", "format_table6", "run_table6", "table6"]

# method: (train params M, inference params M, FLOPs M), ImageNet rows of Table 6
PAPER = {"repconv": (15.7, 8.6, 289.0), "dynamic": (15.7, 15.7, 298.0)}
TABLE6_EXCLUDE = ("*.conv_dw",)


def table6(num_experts: int = 4, img_size: int = 224, seed: int = 0) -> list[dict[str, Any]]:
    """One row per method: training / inference parameters and inference MACs at ``img_size``."""
    from parameternet.models import create_model

    x = (1, 3, img_size, img_size)
    rows = []
    for method in ("repconv", "dynamic"):
        torch.manual_seed(seed)
        model = parameterize(
            create_model("ghostnet_300m"),
            num_experts,
            method=method,
            exclude=TABLE6_EXCLUDE,
            example_input=x,
            count_macs=False,
        )
        train_params = sum(p.numel() for p in model.parameters())
        deployed = deploy(model, fold_bn=False, example_input=x)
        example = torch.randn(x, generator=torch.Generator().manual_seed(seed))
        paper = PAPER[method]
        rows.append(
            dict(
                method=method,
                experts=num_experts,
                layers=len(model.parameterize_report.converted),
                train_params=train_params,
                inference_params=sum(p.numel() for p in deployed.parameters()),
                inference_macs=count_macs(deployed, example),
                img_size=img_size,
                paper_train_params=round(paper[0] * 1e6),
                paper_inference_params=round(paper[1] * 1e6),
                paper_macs=round(paper[2] * 1e6),
            )
        )
    return rows


def format_table6(rows: list[dict[str, Any]]) -> str:
    header = ["method", "layers", "train params", "paper", "inference params", "paper", "MACs", "paper"]
    cells = [
        [
            "RepConv" if r["method"] == "repconv" else "DynamicConv",
            str(r["layers"]),
            f"{r['train_params'] / 1e6:.2f}M",
            f"{r['paper_train_params'] / 1e6:.1f}M",
            f"{r['inference_params'] / 1e6:.2f}M",
            f"{r['paper_inference_params'] / 1e6:.1f}M",
            f"{r['inference_macs'] / 1e6:.1f}M",
            f"{r['paper_macs'] / 1e6:.0f}M",
        ]
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths), *(fmt.format(*c) for c in cells)]
    size = rows[0]["img_size"] if rows else 224
    lines.append(
        f"GhostNet-300M, {rows[0]['experts'] if rows else 4} experts / kernels per converted conv; inference = "
        f"deploy(fold_bn=False); MACs at 1x3x{size}x{size} counted as torchprofile counts them"
    )
    return "\n".join(lines)


def run_table6(as_json: bool = False, num_experts: int = 4, img_size: int = 224) -> int:
    """Print Table 6 (``parameternet profile table6``)."""
    rows = table6(num_experts, img_size)
    print(json.dumps(rows, indent=2) if as_json else format_table6(rows))
    return 0
