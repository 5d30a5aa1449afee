"""Dynamic convolution: M expert kernels mixed per sample by a router (ParameterNet, arXiv 2306.14525, sec. 3.2).

``y_b = conv(x_b, sum_i alpha_bi W_i) + sum_i alpha_bi b_i`` with ``alpha_b = router(mean_hw(x_b))``.

One layer, several implementations of that formula, chosen by the input and the context (all are tested against a
per-sample reference in ``tests/test_layers.py``):

- eager PyTorch: kernels are mixed first (cheaper than mixing M outputs). A batch of one is one ``F.conv2d`` with
  the mixed kernel and bias. Otherwise ``path`` (fixed at construction) decides: ``pointwise`` (1x1, ungrouped,
  unpadded) is a per-sample matmul (:func:`~parameternet.layers.kernels.per_sample_matmul`, NCHW or
  channels_last; large kernels are built in chunks and rebuilt in backward); ``grouped`` folds the batch into the
  channels, ``conv(x.view(1, B*C, H, W), groups=B*g)``, for a depthwise layer an ordinary depthwise conv.
- the MAC counter's ``torch.jit.trace`` (inside :class:`~parameternet.layers.kernels.counting_trace`): the same
  formulas with plain ops, so the count is the paper's.
- ``torch.compile``, ONNX export, any other ``torch.jit.trace`` and ``torch.fx`` symbolic tracing
  (``graph_path``): a group count of ``B*g`` fixes the batch size in the graph, so these formulations
  never put the batch in an attribute. ``pointwise``: the batched matmul of mixed kernels.
  ``stacked`` (one input channel per group, e.g. depthwise): one static conv with the M experts stacked as output
  channels, then the M outputs mixed (M times the conv's multiply-adds, which are few for depthwise; the conv keeps
  constant weights, which is what runtimes optimise). ``unfold`` (the rest, e.g. a dense stem): image patches by
  a conv with constant one-hot kernels, then a batched matmul with the mixed kernels (the conv's own
  multiply-adds). An ONNX export for one batch size (``export_batch_size``) uses the grouped conv, for a single
  image a plain conv whose kernel is computed in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts, init_experts_, mix_experts
from parameternet.layers.kernels import is_counting_trace, per_sample_matmul, route_mean
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
        pointwise = self.kernel_size == (1, 1) and groups == 1 and self._pad == (0, 0, 0, 0) and self.dilation == (1, 1)
        self.path = "pointwise" if pointwise else "grouped"
        self.graph_path = "pointwise" if pointwise else "stacked" if in_channels == groups else "unfold"
        # Set by parameternet.export_onnx(dynamic_batch=False): an ONNX graph for this batch size only, which may
        # hold it in a group count (a batch of one is then a plain conv with its kernel as an input).
        self.export_batch_size: int | None = None
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
        if type(x) is not torch.Tensor:  # torch.fx symbolic tracing (a Proxy), or a tensor subclass
            if isinstance(x, torch.fx.Proxy):
                return self._forward_graph(x)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            self._check_input(x)
        compiling = torch.compiler.is_compiling()
        if compiling or torch.jit.is_tracing():  # two flag reads on the eager path; either exporter sets one
            if compiling or not is_counting_trace():
                return self._forward_graph(x)
            return self._forward_plain(x)
        return self._forward_eager(x)

    def _mixed_bias(self, alpha: torch.Tensor, per_sample: bool = True) -> torch.Tensor | None:
        """``sum_i alpha_bi b_i`` plus the folded ``static_bias``: ``(B, O)``, or None without either. Without
        ``per_sample`` a lone ``static_bias`` stays ``(O,)``, which broadcasts."""
        if self.bias is None:
            if self.static_bias is None or not per_sample:
                return self.static_bias
            return self.static_bias.expand(alpha.shape[0], -1)
        bias = alpha @ self.bias
        return bias if self.static_bias is None else bias + self.static_bias

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.router(x.mean((2, 3)))  # (B, M)
        weight = mix_experts(alpha, self.weight)  # (B, O, I/g, kh, kw)
        bias = self._mixed_bias(alpha)
        if self.path == "pointwise":
            return self._pointwise(x, weight.flatten(2), bias)
        return self._grouped(x, weight, bias)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        alpha = route_mean(self.router, x, (2, 3))  # (B, M)
        B = x.shape[0]
        if B == 1:
            bank = self.weight
            weight = (alpha @ bank.view(self.num_experts, -1)).view(bank.shape[1:])
            bias = self.static_bias
            if self.bias is not None:
                mixed = alpha[0] @ self.bias
                bias = mixed if bias is None else mixed + bias
            if self.padding_mode == "zeros":
                return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
            return self._conv(x, weight, bias, self.groups)
        bias = self._mixed_bias(alpha)
        if self.path == "pointwise":
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            _, _, H, W = x.shape
            bank = self.weight.view(self.num_experts, self.out_channels, self.in_channels)
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
                xs = x.permute(0, 2, 3, 1).reshape(B, H * W, self.in_channels)  # (B, HW, I), a view
                y = per_sample_matmul(xs, alpha, bank, bias, channels_first=False)  # (B, HW, O)
                return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last (B, O, H, W)
            y = per_sample_matmul(x.reshape(B, self.in_channels, H * W), alpha, bank, bias, channels_first=True)
            return y.view(B, self.out_channels, H, W)
        return self._grouped(x, mix_experts(alpha, self.weight), bias)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, groups)

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
        if B == 0:  # an empty batch gives an empty output, as nn.Conv2d's does (no group count of 0)
            return self._conv(x, self.weight[0], None, self.groups)
        x = x.reshape(1, B * self.in_channels, *x.shape[2:])
        y = self._conv(x, weight.flatten(0, 1), None, B * self.groups)
        y = y.view(B, self.out_channels, *y.shape[2:])
        return y if bias is None else y + bias[:, :, None, None]

    # -------------------------------------------------------------------------------------------------------------
    # torch.compile and ONNX export: no batch size in any attribute of the graph

    def _forward_graph(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes say -1 for the batch: an exported graph then needs no Shape / Gather / Concat to rebuild it.
        alpha = self.router(x.mean((2, 3)))  # (B, M)
        bias = self._mixed_bias(alpha, per_sample=False)  # (B, O), (O,) or None
        M, c_in, c_out, g = self.num_experts, self.in_channels, self.out_channels, self.groups
        if self.export_batch_size is not None and torch.onnx.is_in_onnx_export():
            # The kernel's shape from the layer, never from shape inference (which a reflect pad or timm's
            # Conv2dSame upstream loses): (B*O, I/g, kh, kw) with the batch size this graph is for.
            shape = (self.export_batch_size * c_out, c_in // g, *self.kernel_size)
            weight = (alpha @ self.weight.view(M, -1)).view(shape)
            if self.export_batch_size == 1:  # a plain conv whose kernel is an input: the bias rides along
                return self._conv(x, weight, None if bias is None else bias.view(-1), g)
            y = self._conv(x.reshape(1, -1, x.shape[2], x.shape[3]), weight, None, self.export_batch_size * g)
            y = y.view(-1, c_out, y.shape[2], y.shape[3])
        elif self.graph_path == "pointwise":
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            weight = (alpha @ self.weight.view(M, -1)).view(-1, c_out, c_in)  # (B, O, I)
            y = weight @ x.reshape(-1, c_in, x.shape[2] * x.shape[3])  # (B, O, HW)
            y = y.view(-1, c_out, x.shape[2], x.shape[3])
        elif self.graph_path == "stacked":
            # One input channel per group: the experts stacked behind each output channel, (O * M, 1, kh, kw), so
            # that group j's outputs are its O/g channels times M experts.
            stacked = self.weight.transpose(0, 1).reshape(c_out * M, 1, *self.kernel_size)
            y = self._conv(x, stacked, None, g)  # (B, O * M, H', W')
            H, W = y.shape[2], y.shape[3]
            y = alpha.view(-1, 1, 1, M) @ y.view(-1, c_out, M, H * W)  # (B, O, 1, H'W')
            y = y.view(-1, c_out, H, W)
        else:
            # Patches (B, C * kh * kw, H', W') by a depthwise conv with one-hot kernels, then per-sample kernels.
            kh, kw = self.kernel_size
            taps = torch.eye(kh * kw, dtype=x.dtype, device=x.device).view(kh * kw, 1, kh, kw).repeat(c_in, 1, 1, 1)
            patches = self._conv(x, taps, None, c_in)
            H, W = patches.shape[2], patches.shape[3]
            k = (c_in // g) * kh * kw
            weight = (alpha @ self.weight.view(M, -1)).view(-1, g, c_out // g, k)
            y = weight @ patches.view(-1, g, k, H * W)  # (B, g, O/g, H'W')
            y = y.view(-1, c_out, H, W)
        return y if bias is None else y + bias.unsqueeze(-1).unsqueeze(-1)
