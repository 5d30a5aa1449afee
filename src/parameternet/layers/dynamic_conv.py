"""Dynamic convolution: M expert kernels mixed per sample by a router (ParameterNet, arXiv 2306.14525, sec. 3.2).

``y_b = conv(x_b, sum_i alpha_bi W_i) + sum_i alpha_bi b_i`` with ``alpha_b = router(mean_hw(x_b))``.

The kernels are mixed first (cheaper than mixing M outputs) and the per-sample convolution runs on the path that
suits the layer's shape, chosen once at construction:

- ``pointwise`` (1x1, ungrouped, unpadded): a batched matmul ``(B, O, I) @ (B, I, HW)``, in NCHW or channels_last;
- ``grouped``: everything else, by folding the batch into the channels, ``conv(x.view(1, B*C, H, W), groups=B*g)``.
  For a depthwise layer that is an ordinary depthwise conv over ``B*C`` channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts, init_experts_, mix_experts
from parameternet.layers.router import create_router

__all__ = ["DynamicConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class DynamicConv2d(nn.Module):
    """A drop-in ``nn.Conv2d`` with ``num_experts`` kernels mixed per sample.

    Takes ``nn.Conv2d``'s arguments plus ``num_experts``, ``router`` (``"linear-sigmoid"``, the release's, or
    ``"mlp-softmax"``, the paper text's), ``router_temperature`` and ``router_hidden`` (the MLP router's width).
    ``weight`` is ``(M, out, in / groups, kh, kw)`` and ``bias`` ``(M, out)``: experts carry the bias too.
    ``static_bias`` ``(out,)``, added after mixing, is ``None`` unless ``parameternet.deploy`` folded a BatchNorm in.
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
        router: str = "linear-sigmoid",
        router_temperature: float = 1.0,
        router_hidden: int | None = None,
    ):
        super().__init__()
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ParameterNetError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})."
            )
        if padding_mode not in _PADDING_MODES:
            raise ParameterNetError(
                f"unknown padding_mode {padding_mode!r}; choose one of {', '.join(_PADDING_MODES)}."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.num_experts = check_num_experts(num_experts)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ParameterNetError(f"padding {padding!r} is not 'same', 'valid' or an int / pair of ints.")
            if padding == "same" and self.stride != (1, 1):
                raise ParameterNetError("padding='same' needs stride 1; give explicit padding for strided convs.")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self._pad = self._explicit_padding()

        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size, **kw)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **kw)) if bias else None
        # (out,) added once after mixing, or None: where parameternet.deploy() puts a folded BatchNorm's shift,
        # which must not be scaled by coefficients that need not sum to one.
        self.register_parameter("static_bias", None)
        self.router = create_router(
            router, in_channels, num_experts, temperature=router_temperature, hidden_features=router_hidden, **kw
        )
        self.path = (
            "pointwise"
            if self.kernel_size == (1, 1) and groups == 1 and self._pad == (0, 0, 0, 0) and self.dilation == (1, 1)
            else "grouped"
        )
        self.reset_parameters()

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """Padding as (left, right, top, bottom), the order ``F.pad`` takes."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def reset_parameters(self) -> None:
        init_experts_(self.weight, self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_experts={self.num_experts}, path={self.path}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ParameterNetError(
                f"{type(self).__name__} expects a 4-d input (B, C, H, W), got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ParameterNetError(
                f"{type(self).__name__} expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        alpha = self.router(x.mean((2, 3)))  # (B, M)
        weight = mix_experts(alpha, self.weight)  # (B, O, I/g, kh, kw)
        bias = None if self.bias is None else alpha @ self.bias  # (B, O)
        if self.static_bias is not None:
            bias = self.static_bias.expand(alpha.shape[0], -1) if bias is None else bias + self.static_bias
        if self.path == "pointwise":
            return self._pointwise(x, weight.flatten(2), bias)
        return self._grouped(x, weight, bias)

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # weight: (B, O, I)
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        B, _, H, W = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            xs = x.permute(0, 2, 3, 1).reshape(B, H * W, self.in_channels)  # (B, HW, I), a view
            wt = weight.transpose(1, 2)  # (B, I, O)
            y = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1).expand(B, H * W, -1), xs, wt)
            return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last (B, O, H, W)
        xs = x.reshape(B, self.in_channels, H * W)  # (B, I, HW)
        y = (
            torch.bmm(weight, xs)
            if bias is None
            else torch.baddbmm(bias.unsqueeze(2).expand(-1, -1, H * W), weight, xs)
        )
        return y.view(B, self.out_channels, H, W)

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # weight: (B, O, I/g, kh, kw) -> (B*O, I/g, kh, kw); the batch becomes B groups of g groups.
        B = x.shape[0]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        x = x.reshape(1, B * self.in_channels, *x.shape[2:])
        y = F.conv2d(x, weight.flatten(0, 1), None, self.stride, padding, self.dilation, B * self.groups)
        y = y.view(B, self.out_channels, *y.shape[2:])
        return y if bias is None else y + bias[:, :, None, None]
