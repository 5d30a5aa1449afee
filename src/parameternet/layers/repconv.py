"""Re-parameterised convolution: one conv plus parallel conv + BatchNorm branches that merge into a single conv
for inference (RepVGG-style; ParameterNet, arXiv 2306.14525, sec. 3.2 and Table 6).

The paper compares it with dynamic convolution at equal *training* parameters: ``num_experts - 1`` extra
branches of the main conv's shape, each with its own BatchNorm, so training computes

``y = conv(x) + sum_k bn_k(conv_k(x))``.

In eval mode every BatchNorm is a per-channel affine map ``s_k * z + (beta_k - s_k * mu_k)`` with
``s_k = gamma_k / sqrt(var_k + eps)``, so the sum is one conv with ``W = W_0 + sum_k s_k W_k`` and
``b = b_0 + sum_k (beta_k - s_k mu_k)``: the inference graph has the dense parameters and FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts

__all__ = ["RepConv2d"]


class RepConv2d(nn.Module):
    """A drop-in ``nn.Conv2d`` that trains ``num_experts`` parallel kernels and merges them with :meth:`merge`.

    Takes ``nn.Conv2d``'s arguments plus ``num_experts`` (>= 2): the main conv ``conv`` keeps the layer's own
    bias, and each of the ``num_experts - 1`` modules in ``branches`` is a bias-free conv of the same shape
    followed by its own ``BatchNorm2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        num_experts: int = 4,
    ):
        super().__init__()
        if check_num_experts(num_experts) < 2:
            raise ParameterNetError(
                f"RepConv2d needs num_experts >= 2 (the main conv plus at least one branch), got {num_experts}."
            )
        self.num_experts = num_experts
        conv_args = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        kw = dict(padding_mode=padding_mode, device=device, dtype=dtype)
        self.conv = nn.Conv2d(*conv_args, bias=bias, **kw)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(*conv_args, bias=False, **kw),
                nn.BatchNorm2d(out_channels, device=device, dtype=dtype),
            )
            for _ in range(num_experts - 1)
        )

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for branch in self.branches:
            y = y + branch(x)
        return y

    @torch.no_grad()
    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode sum as one ``(weight, shift)``: the conv is ``conv(x, weight) + conv.bias + shift``.

        ``shift`` is the branches' BatchNorm offsets alone, so a caller can put it into a following BatchNorm's
        running mean instead of a new conv bias. Computed in float64 and cast back.
        """
        weight = self.conv.weight.double()
        shift = torch.zeros(self.out_channels, dtype=torch.float64, device=weight.device)
        for branch in self.branches:
            conv, bn = branch
            if bn.running_var is None:
                raise ParameterNetError(
                    "cannot merge a RepConv2d branch whose BatchNorm has track_running_stats=False."
                )
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            weight = weight + scale.view(-1, 1, 1, 1) * conv.weight.double()
            shift = shift - scale * bn.running_mean.double()
            if bn.bias is not None:
                shift = shift + bn.bias.double()
        dtype = self.conv.weight.dtype
        return weight.to(dtype), shift.to(dtype)

    @torch.no_grad()
    def merge(self) -> nn.Conv2d:
        """One ``nn.Conv2d`` (with bias) computing what this layer computes in eval mode."""
        main = self.conv
        weight, shift = self.merged_kernel()
        merged = nn.Conv2d(
            main.in_channels,
            main.out_channels,
            main.kernel_size,
            main.stride,
            main.padding,
            main.dilation,
            main.groups,
            bias=True,
            padding_mode=main.padding_mode,
            device=main.weight.device,
            dtype=main.weight.dtype,
        )
        merged.weight.copy_(weight)
        merged.bias.copy_(shift if main.bias is None else shift + main.bias)
        return merged
