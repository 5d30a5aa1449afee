"""Dynamic convolution: M expert kernels mixed per sample by a router (ParameterNet, arXiv 2306.14525, sec. 3.2).

``y_b = conv(x_b, sum_i alpha_bi W_i) + sum_i alpha_bi b_i`` with ``alpha_b = router(mean_hw(x_b))``.

The module holds the experts, the router and the conv's geometry; the formula itself is computed by the functional
core, :mod:`parameternet.layers.functional`, whose table picks an implementation by where the layer runs:

- eager PyTorch: the router's pooling folded into its linear layer (:func:`~parameternet.layers.kernels.route_mean`),
  then kernels mixed first (cheaper than mixing M outputs): a batch of one is one ``F.conv2d``, a 1x1 layer a
  per-sample matmul, any other a conv over the batch folded into the channels.
- ``torch.compile`` and ``torch.export``: a batch size the compiler holds as a number (``dynamic=False``, or a batch
  of one, which PyTorch specialises anyway) gets the same formulas as eager; a symbolic batch gets formulations
  without the batch size in any attribute (a group count of ``B*g`` would fix it): for a depthwise layer the sum
  over kernel taps of the shifted input times the per-sample kernel, which inductor fuses into one loop.
- ``torch.jit.trace`` (ONNX's TorchScript exporter) and ``torch.fx``: symbolic-batch formulations, unless the trace
  is for one batch size (:class:`~parameternet.layers.kernels.fixed_batch_trace`, which ``export_onnx`` enters for a
  fixed-batch graph, and the MAC counter's :class:`~parameternet.layers.kernels.counting_trace`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts, init_experts_
from parameternet.layers.functional import Context, ConvGeometry, dynamic_conv2d, select
from parameternet.layers.kernels import route_mean
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
        # The formula's geometry, for the functional core (layers/functional.py), which picks the implementation.
        self.geometry = self._geometry()
        # "auto" (the functional core's table, by runtime and geometry) or a name from functional.NAMES;
        # parameternet.layers.set_implementation sets it for a whole model.
        self.implementation = "auto"
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

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``to``, ``cuda``, ``half``, ...) with the 5-d expert bank kept contiguous.

        ``model.to(memory_format=torch.channels_last)`` converts every 4-d and 5-d tensor and refuses a 5-d one
        (``channels_last`` is a 4-d format): the bank ``(M, O, C/g, kh, kw)`` goes through ``fn`` as its 4-d view
        ``(M * O, C/g, kh, kw)`` and comes back contiguous, since the layer's activations, not its experts, carry
        the memory format (the per-sample kernels are formed from the flat bank)."""

        def apply(t: torch.Tensor) -> torch.Tensor:
            if t.dim() != 5:
                return fn(t)
            out = fn(t.flatten(0, 1))
            return out.contiguous().view(t.shape)

        return super()._apply(apply, recurse)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_experts={self.num_experts}"
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
        if isinstance(x, torch.Tensor) and (x.dim() != 4 or x.shape[1] != self.in_channels):
            self._check_input(x)
        context, name, batch = select(self.geometry, x, self.implementation)
        if context is Context.EAGER:
            alpha = route_mean(self.router, x, (2, 3))  # (B, M): the pooling folded into the router's linear
        else:
            alpha = self.router(x.mean((2, 3)))  # (B, M): plain ops every graph format holds
        # per_sample_matmul takes a per-sample bias (B, O); the others let a lone folded bias (O,) broadcast.
        bias = self._mixed_bias(alpha, per_sample=name == "per_sample_matmul")
        return dynamic_conv2d(x, alpha, self.weight, bias, self.geometry, name, batch)

    def _geometry(self) -> ConvGeometry:
        return ConvGeometry(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self._pad,
            self.dilation, self.groups, self.padding_mode, self.num_experts,
        )  # fmt: skip

    def _mixed_bias(self, alpha: torch.Tensor, per_sample: bool = True) -> torch.Tensor | None:
        """``sum_i alpha_bi b_i`` plus the folded ``static_bias``: ``(B, O)``, or None without either. Without
        ``per_sample`` a lone ``static_bias`` stays ``(O,)``, which broadcasts."""
        if self.bias is None:
            if self.static_bias is None or not per_sample:
                return self.static_bias
            return self.static_bias.expand(alpha.shape[0], -1)
        bias = alpha @ self.bias
        return bias if self.static_bias is None else bias + self.static_bias
