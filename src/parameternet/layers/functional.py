"""The functional core of :class:`~parameternet.layers.DynamicConv2d`: one formula, several implementations.

``y_b = conv(x_b, sum_i alpha_bi W_i) + bias_b`` for every sample ``b`` (ParameterNet, arXiv 2306.14525, sec. 3.2).
Every function here computes exactly that from ``x (B, C, H, W)``, the coefficients ``alpha (B, M)``, the expert
bank ``experts (M, O, C/g, kh, kw)`` and a bias (``(B, O)``, ``(O,)`` or None). They differ in cost and in what a
graph holds, and :func:`select` picks one from a single table, :data:`IMPLEMENTATIONS`, by where the layer runs
(:class:`Context`) and its geometry (:class:`ConvGeometry`):

| context  | pointwise (1x1, ungrouped) | depthwise (C/g == 1) | other (dense, grouped) |
|----------|----------------------------|----------------------|------------------------|
| eager    | ``per_sample_matmul``      | ``grouped``          | ``grouped``            |
| plain    | ``bmm``                    | ``grouped``          | ``grouped``            |
| inductor | ``bmm``                    | ``grouped_op``       | ``grouped_op``         |
| onnx     | ``bmm``                    | ``stacked``          | ``unfold``             |
| trace    | ``bmm``                    | ``im2col``           | ``im2col``             |

- ``single``: a batch of one is one ``F.conv2d`` with the mixed kernel; every context with a batch size known to
  be 1 uses it.
- ``per_sample_matmul``: :func:`~parameternet.layers.kernels.per_sample_matmul` (chunked on a CPU; NCHW or
  channels_last), eager only.
- ``bmm``: the batched matmul of mixed kernels ``(B, O, C) @ (B, C, HW)``: no batch size in the graph.
- ``grouped``: the batch folded into the channels, ``conv(x.view(1, B*C, H, W), groups=B*g)``; for a depthwise
  layer an ordinary depthwise conv. Its group count fixes the batch size, so a graph uses it only for a batch size
  known when tracing (``plain``: the MAC counter's trace, ``torch.compile`` or ``torch.export`` with a static
  batch, an ONNX graph exported for one batch size).
- ``grouped_op``: ``grouped`` inside an opaque custom op, :func:`per_sample_conv2d` (with its backward), which
  computes the group count when it runs: what inductor gets for a symbolic batch, so it calls the eager kernel.
  Custom ops do not enter ``torch.func`` transforms: under one (eager) it is ``grouped`` itself.
- ``shifted``: for few input channels per group (depthwise): the sum over the ``kh * kw`` kernel taps of the
  shifted input times that tap of the per-sample kernel, broadcast as ``(B, O, 1, 1)``. The work of one depthwise
  conv, plain elementwise ops that inductor fuses into one loop, and no batch size anywhere.
- ``stacked``: one input channel per group: one constant conv with the M experts stacked as output channels, then
  the M outputs mixed; M times the conv's work, but a constant kernel, which runtimes optimise.
- ``unfold``: image patches by a depthwise conv with constant one-hot kernels, then a batched matmul with the mixed
  kernels (the conv's own multiply-adds; ``kh * kw`` times the input's memory).
- ``im2col``: patches by ``F.unfold``, then a matmul with the mixed kernels: the conv's own multiply-adds in ops
  that FLOP counters which trace (torchprofile, fvcore) count as they count a conv, so a plain ``torch.jit.trace``
  (``trace``) costs what the paper counts and keeps a symbolic batch.
- ``triton``: a depthwise layer (one output channel per group, zero padding) by the Triton kernels of
  :mod:`~parameternet.layers.triton_depthwise`, which read and write through strides (channels_last stays
  channels_last, no copy). Not in the table: cuDNN's grouped conv over the batch was faster on a GPU
  (``benchmarks/gpu_layers.py``; the figures are in the documentation, docs/deployment.md); a layer runs it when
  its ``implementation`` names it.

:func:`select` is the only code that looks at the runtime (:func:`runtime`): it returns the table's choice, or
the layer's own ``implementation`` setting when that names one (``parameternet.layers.set_implementation``).

The graph contexts' depthwise choice is measured by ``python benchmarks/compile_speed.py --choices`` (ParameterNet-600M
against GhostNet-600M): in ONNX Runtime ``stacked`` beats ``shifted``, since ONNX Runtime runs the constant conv in
its blocked kernels and each of ``shifted``'s taps as a separate pass; under inductor with a symbolic batch the two
tie and ``grouped_op`` does better. The figures are in the documentation (docs/deployment.md), from
``results/benchmark/depthwise_choices.md`` and ``results/benchmark/modes.csv``. ``tests/test_layers.py`` checks
every implementation against a per-sample reference, forward and backward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from parameternet.errors import ParameterNetError
from parameternet.layers import triton_depthwise as _triton
from parameternet.layers.kernels import (
    _autocast_dtype,
    _differentiable_backward,
    per_sample_matmul,
    static_batch_size,
    traced_batch_size,
    transforms_active,
)
from parameternet.layers.triton_depthwise import per_sample_depthwise

__all__ = [
    "IMPLEMENTATIONS", "NAMES", "Context", "ConvGeometry", "applies", "dynamic_conv2d", "runtime", "select",
    "table_choice",
]  # fmt: skip

# ``shifted`` unrolls C/g * kh * kw taps into the graph; above this many, ``unfold`` (one conv and one matmul).
SHIFTED_MAX_TAPS = 32


class Context(enum.Enum):
    """Where a dynamic conv runs: eager PyTorch, the plain formulas of the MAC counter's trace (or any graph whose
    batch size is fixed), ``torch.compile`` with a symbolic batch (inductor), a symbolic-batch graph for other
    runtimes (ONNX export, ``torch.export``, ``torch.fx``), and a plain ``torch.jit.trace`` outside ONNX export
    (TorchScript; what torchprofile and fvcore trace to count)."""

    EAGER = "eager"
    PLAIN = "plain"
    INDUCTOR = "inductor"
    ONNX = "onnx"
    TRACE = "trace"


@dataclass(frozen=True)
class ConvGeometry:
    """What ``nn.Conv2d`` stores besides its weight: channels, kernel ``(kh, kw)``, stride, ``padding`` (a pair or
    ``"same"`` / ``"valid"``), its explicit form ``pad`` ``(left, right, top, bottom)``, dilation, groups and
    padding mode."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    pad: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    num_experts: int

    @property
    def expert_shape(self) -> tuple[int, ...]:
        """One expert's kernel, ``(O, C/g, kh, kw)``; Python ints, so graphs (``torch.fx`` too) hold no shape
        arithmetic."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    # ``pointwise`` (1x1, ungrouped, unpadded, undilated), ``depthwise`` (one input channel per group) or ``other``;
    # set once at construction, since every forward asks (a property recomputed it per call).
    kind: str = field(init=False)

    def __post_init__(self):
        kh, kw = self.kernel_size
        if (kh, kw) == (1, 1) and self.groups == 1 and self.pad == (0, 0, 0, 0) and self.dilation == (1, 1):
            kind = "pointwise"
        else:
            kind = "depthwise" if self.in_channels == self.groups else "other"
        object.__setattr__(self, "kind", kind)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        """``F.conv2d`` with this geometry's stride, padding (any padding mode) and dilation, and ``groups``."""
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, weight, bias, self.stride, padding, self.dilation, groups)


def _mix(alpha: torch.Tensor, experts: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    """``(B, M) x (M, O, C/g, kh, kw) -> (B, O, C/g, kh, kw)``; the batch stays symbolic (``-1``)."""
    return (alpha @ experts.view(geo.num_experts, -1)).view(-1, *geo.expert_shape)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.unsqueeze(-1).unsqueeze(-1)


def single(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """A batch of one: one conv with the mixed kernel; the bias ``(1, O)`` or ``(O,)`` rides in the conv."""
    flat = experts.view(geo.num_experts, -1)
    # Eager, torch.mm dispatches two ops fewer than matmul; a trace keeps matmul, which the FLOP counters that read
    # traces count (torchprofile has no handler for aten::mm).
    weight = (alpha @ flat if torch.jit.is_tracing() else torch.mm(alpha, flat)).view(geo.expert_shape)
    if bias is not None and bias.dim() != 1:
        bias = bias.reshape(-1)
    return geo.conv(x, weight, bias, geo.groups)


def per_sample_matmul_conv(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """A pointwise layer in eager PyTorch: :func:`~parameternet.layers.kernels.per_sample_matmul`, keeping
    channels_last inputs channels_last. ``bias`` must be per sample ``(B, O)`` or None."""
    if geo.stride != (1, 1):
        x = x[:, :, :: geo.stride[0], :: geo.stride[1]]
    B, _, H, W = x.shape
    bank = experts.view(geo.num_experts, geo.out_channels, geo.in_channels)
    # vmap cannot query a memory format: under a function transform the layout is not kept.
    if not transforms_active() and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xs = x.permute(0, 2, 3, 1).reshape(B, H * W, geo.in_channels)  # (B, HW, C), a view
        y = per_sample_matmul(xs, alpha, bank, bias, channels_first=False)  # (B, HW, O)
        return y.view(B, H, W, geo.out_channels).permute(0, 3, 1, 2)  # channels_last (B, O, H, W)
    y = per_sample_matmul(x.reshape(B, geo.in_channels, H * W), alpha, bank, bias, channels_first=True)
    return y.view(B, geo.out_channels, H, W)


def bmm(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """A pointwise layer as the batched matmul of mixed kernels (``baddbmm`` with a per-sample bias); keeps
    channels_last inputs channels_last."""
    if geo.stride != (1, 1):
        x = x[:, :, :: geo.stride[0], :: geo.stride[1]]
    H, W = x.shape[2], x.shape[3]
    c_in, c_out = geo.in_channels, geo.out_channels
    weight = _mix(alpha, experts, geo).view(-1, c_out, c_in)  # (B, O, C)
    channels_last = type(x) is torch.Tensor and not transforms_active()  # vmap cannot query a memory format
    if channels_last and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xs = x.permute(0, 2, 3, 1).reshape(-1, H * W, c_in)  # (B, HW, C), a view
        y = xs @ weight.transpose(1, 2)  # (B, HW, O)
        if bias is not None:
            y = y + bias.unsqueeze(-2)
        return y.view(-1, H, W, c_out).permute(0, 3, 1, 2)  # channels_last (B, O, H, W)
    y = weight @ x.reshape(-1, c_in, H * W)  # (B, O, HW)
    if bias is not None:
        y = y + bias.unsqueeze(-1)
    return y.view(-1, c_out, H, W)


def grouped(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """The batch folded into the channels: ``(1, B*C, H, W)`` through a conv with ``B * g`` groups. ``batch_size``,
    when given, shapes the kernel from the layer rather than from the input (an ONNX graph for that batch size,
    whose shape inference a reflect pad or timm's ``Conv2dSame`` upstream loses)."""
    B = x.shape[0] if batch_size is None else batch_size
    if B == 0:  # an empty batch gives an empty output, as nn.Conv2d's does (no group count of 0)
        return geo.conv(x, experts[0], None, geo.groups)
    weight = (alpha @ experts.view(geo.num_experts, -1)).view(B * geo.out_channels, *geo.expert_shape[1:])
    y = geo.conv(x.reshape(1, -1, x.shape[2], x.shape[3]), weight, None, B * geo.groups)
    return _add_bias(y.view(-1, geo.out_channels, y.shape[2], y.shape[3]), bias)


def _padded(x: torch.Tensor, geo: ConvGeometry) -> torch.Tensor:
    if geo.pad == (0, 0, 0, 0):
        return x
    return F.pad(x, geo.pad, mode="constant" if geo.padding_mode == "zeros" else geo.padding_mode)


@torch.library.custom_op("parameternet::per_sample_conv2d", mutates_args=())
def per_sample_conv2d(
    x: torch.Tensor, weight: torch.Tensor, stride: list[int], dilation: list[int], groups: int
) -> torch.Tensor:
    """``y_b = conv2d(x_b, weight_b)`` for every sample, unpadded: ``x (B, C, H, W)``, ``weight (B, O, C/g, kh, kw)``
    -> ``(B, O, H', W')``. One grouped conv over the batch folded into the channels; as a custom op its group count
    ``B * groups`` is computed when it runs, so a compiled graph with a symbolic batch calls the eager kernel."""
    B, c_out = x.shape[0], weight.shape[1]
    if B == 0:  # an empty batch gives an empty output (no group count of 0)
        return F.conv2d(x, weight.new_zeros(weight.shape[1:]), None, stride, 0, dilation, groups)
    y = F.conv2d(x.reshape(1, -1, x.shape[2], x.shape[3]), weight.flatten(0, 1), None, stride, 0, dilation, B * groups)
    return y.view(B, c_out, y.shape[2], y.shape[3])


def _conv_out(size, k: int, s: int, d: int):
    return (size - d * (k - 1) - 1) // s + 1


@per_sample_conv2d.register_fake
def _(x, weight, stride, dilation, groups):
    kh, kw = weight.shape[3], weight.shape[4]
    H, W = _conv_out(x.shape[2], kh, stride[0], dilation[0]), _conv_out(x.shape[3], kw, stride[1], dilation[1])
    return x.new_empty(x.shape[0], weight.shape[1], H, W)


def _grouped_conv_backward(grad, x, weight, stride, dilation, groups):
    """``per_sample_conv2d``'s input and weight gradients: ``convolution_backward`` of the grouped conv over the batch.
    Plain ATen ops, so differentiable (double backward) and batched under ``vmap``; the custom op below wraps it."""
    B = x.shape[0]
    if B == 0:
        return torch.zeros_like(x), torch.zeros_like(weight)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, -1, grad.shape[2], grad.shape[3]),
        x.reshape(1, -1, x.shape[2], x.shape[3]),
        weight.flatten(0, 1),
        None, stride, [0, 0], dilation, False, [0, 0], B * groups, [True, True, False],
    )  # fmt: skip
    return gx.view(x.shape), gw.view(weight.shape)


@torch.library.custom_op("parameternet::per_sample_conv2d_backward", mutates_args=())
def _per_sample_conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int], dilation: list[int], groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _grouped_conv_backward(grad, x, weight, stride, dilation, groups)


@_per_sample_conv2d_backward.register_fake
def _(grad, x, weight, stride, dilation, groups):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, stride, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, dilation, groups)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    if _differentiable_backward(grad):  # create_graph=True or is_grads_batched: the op's formula as plain ATen ops
        gx, gw = _grouped_conv_backward(grad, x, weight, *ctx.conv)
    else:
        gx, gw = _per_sample_conv2d_backward(grad.contiguous(), x, weight, *ctx.conv)
    return gx, gw, None, None, None


per_sample_conv2d.register_autograd(_backward, setup_context=_setup_context)


def grouped_op(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """``grouped``'s conv as :func:`per_sample_conv2d`, an opaque custom op: what inductor runs for a symbolic batch
    (its group count is computed at run time). Padding is applied first (any padding mode); under autocast both
    operands take the autocast dtype, as the conv would. Under a function transform (``torch.func``, forward-mode
    AD), which custom ops do not enter, it is ``grouped``: the same conv as plain ops."""
    if transforms_active():
        return grouped(x, alpha, experts, bias, geo, batch_size)
    xp = _padded(x, geo)
    weight = _mix(alpha, experts, geo)
    dtype = _autocast_dtype(xp)
    if dtype is not None or xp.dtype != weight.dtype:
        dtype = dtype or torch.promote_types(xp.dtype, weight.dtype)
        xp, weight = xp.to(dtype), weight.to(dtype)
    y = per_sample_conv2d(xp.contiguous(), weight.contiguous(), list(geo.stride), list(geo.dilation), geo.groups)
    return _add_bias(y, bias)


def shifted(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """Per-sample conv as the sum over kernel taps of the shifted input times the tap's per-sample weights: for
    every input channel ``c`` of a group and tap ``(i, j)``, ``x_pad[:, group(o) * C/g + c, i*d + s*h, j*d + s*w]
    * W_b[o, c, i, j]``. ``C/g * kh * kw`` broadcast multiply-adds over the output, the conv's own work."""
    xp = _padded(x, geo)
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    c_out, g = geo.out_channels, geo.groups
    per_group_in, per_group_out = geo.in_channels // g, c_out // g
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    weight = _mix(alpha, experts, geo).view(-1, c_out, per_group_in * kh * kw, 1, 1)  # (B, O, C/g * kh * kw, 1, 1)
    y = None
    for c in range(per_group_in):
        xc = xp if per_group_in == 1 else xp.view(-1, g, per_group_in, xp.shape[2], xp.shape[3])[:, :, c]
        if per_group_out > 1:  # output channel o reads group o // (O/g)
            xc = xc.unsqueeze(2).expand(-1, g, per_group_out, xp.shape[2], xp.shape[3])
            xc = xc.reshape(-1, c_out, xp.shape[2], xp.shape[3])
        for i in range(kh):
            for j in range(kw):
                tap = xc[:, :, i * dh : i * dh + sh * (H - 1) + 1 : sh, j * dw : j * dw + sw * (W - 1) + 1 : sw]
                term = tap * weight[:, :, (c * kh + i) * kw + j]
                y = term if y is None else y + term
    return _add_bias(y, bias)


def stacked(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """One input channel per group: the experts stacked behind each output channel, ``(O * M, 1, kh, kw)``, so that
    group j's outputs are its O/g channels times M experts; then the M outputs mixed per sample."""
    M, c_out = geo.num_experts, geo.out_channels
    bank = experts.transpose(0, 1).reshape(c_out * M, 1, *geo.kernel_size)
    y = geo.conv(x, bank, None, geo.groups)  # (B, O * M, H', W')
    H, W = y.shape[2], y.shape[3]
    y = alpha.view(-1, 1, 1, M) @ y.view(-1, c_out, M, H * W)  # (B, O, 1, H'W')
    return _add_bias(y.view(-1, c_out, H, W), bias)


def unfold(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """Patches ``(B, C * kh * kw, H', W')`` by a depthwise conv with one-hot kernels, then per-sample kernels."""
    (kh, kw), c_in, c_out, g = geo.kernel_size, geo.in_channels, geo.out_channels, geo.groups
    taps = torch.eye(kh * kw, dtype=x.dtype, device=x.device).view(kh * kw, 1, kh, kw).repeat(c_in, 1, 1, 1)
    patches = geo.conv(x, taps, None, c_in)
    H, W = patches.shape[2], patches.shape[3]
    k = (c_in // g) * kh * kw
    weight = _mix(alpha, experts, geo).view(-1, g, c_out // g, k)
    y = weight @ patches.view(-1, g, k, H * W)  # (B, g, O/g, H'W')
    return _add_bias(y.view(-1, c_out, H, W), bias)


def im2col(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """Patches ``(B, C * kh * kw, H'W')`` by ``F.unfold`` (im2col), then one matrix product per sample and group
    with the mixed kernels. The conv's own multiply-adds as a matmul, which the FLOP counters that trace (torchprofile,
    fvcore) count as they count the conv; no batch size in the graph; ``kh * kw`` times the input's memory."""
    x = _padded(x, geo)
    (kh, kw), c_in, c_out, g = geo.kernel_size, geo.in_channels, geo.out_channels, geo.groups
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    H = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    k = (c_in // g) * kh * kw
    patches = F.unfold(x, geo.kernel_size, dilation=geo.dilation, stride=geo.stride)  # (B, C * kh * kw, H'W')
    weight = _mix(alpha, experts, geo).view(-1, g, c_out // g, k)
    y = weight @ patches.view(-1, g, k, H * W)  # (B, g, O/g, H'W')
    return _add_bias(y.view(-1, c_out, H, W), bias)


def triton_depthwise(x, alpha, experts, bias, geo: ConvGeometry, batch_size=None):
    """A depthwise layer (one input and one output channel per group, zero padding) by the Triton kernels of
    :mod:`~parameternet.layers.triton_depthwise`: per-sample kernels ``(B, C, kh, kw)`` mixed first, then one
    kernel that reads and writes through the strides (channels_last in, channels_last out, no copy). Under autocast
    every operand takes the autocast dtype, as the conv would. Under a function transform (``torch.func``,
    forward-mode AD), which the custom op does not enter, it is ``grouped``."""
    if transforms_active():
        return grouped(x, alpha, experts, bias, geo, batch_size)
    weight = _mix(alpha, experts, geo).view(-1, geo.out_channels, *geo.kernel_size)  # (B, C, kh, kw)
    dtype = _autocast_dtype(x)
    if dtype is not None or x.dtype != weight.dtype:
        dtype = dtype or torch.promote_types(x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if bias is not None and bias.dim() == 1:
        bias = bias.expand(x.shape[0], -1)
    return per_sample_depthwise(x, weight, bias, geo.stride, geo.pad, geo.dilation)


def triton_eligible(geo: ConvGeometry) -> bool:
    """Whether :func:`triton_depthwise` computes this geometry: depthwise with one output channel per group and zero
    padding."""
    return geo.kind == "depthwise" and geo.out_channels == geo.groups and geo.padding_mode == "zeros"


_FUNCTIONS: dict = {
    "single": single,
    "per_sample_matmul": per_sample_matmul_conv,
    "bmm": bmm,
    "grouped": grouped,
    "grouped_op": grouped_op,
    "shifted": shifted,
    "stacked": stacked,
    "unfold": unfold,
    "im2col": im2col,
    "triton": triton_depthwise,
}

NAMES = tuple(_FUNCTIONS)

# context -> kind -> implementation. The graph contexts' depthwise choices come from benchmarks/compile_speed.py.
IMPLEMENTATIONS: dict[Context, dict[str, str]] = {
    Context.EAGER: {"pointwise": "per_sample_matmul", "depthwise": "grouped", "other": "grouped"},
    Context.PLAIN: {"pointwise": "bmm", "depthwise": "grouped", "other": "grouped"},
    Context.INDUCTOR: {"pointwise": "bmm", "depthwise": "grouped_op", "other": "grouped_op"},
    Context.ONNX: {"pointwise": "bmm", "depthwise": "stacked", "other": "unfold"},
    Context.TRACE: {"pointwise": "bmm", "depthwise": "im2col", "other": "im2col"},
}


def table_choice(context: Context, geo: ConvGeometry, batch_size: int | None = None) -> str:
    """The table's implementation for a layer of this geometry in ``context``; ``batch_size`` is the batch size
    when it is known (an int) and None when it is symbolic. A known batch of one is ``single`` everywhere."""
    if batch_size == 1:
        return "single"
    name = IMPLEMENTATIONS[context][geo.kind]
    if name == "shifted" and geo.in_channels // geo.groups * geo.kernel_size[0] * geo.kernel_size[1] > SHIFTED_MAX_TAPS:
        return "unfold"
    return name


def runtime(x) -> tuple[Context, int | None]:
    """Where a dynamic layer's input ``x`` is being computed, and the batch size known there (None: symbolic).

    The only code that looks at the runtime: a ``torch.fx`` Proxy is a symbolic graph; inside ``torch.compile`` /
    ``torch.export`` a batch size the compiler holds as a number gets the plain formulas, a symbolic one inductor's
    (or, exporting, the portable ones); inside ``torch.jit.trace`` the trace mode decides
    (:class:`~parameternet.layers.kernels.counting_trace`, :class:`~parameternet.layers.kernels.fixed_batch_trace`);
    anything else is eager."""
    if type(x) is not torch.Tensor and isinstance(x, torch.fx.Proxy):
        return Context.ONNX, None
    if torch.compiler.is_compiling():
        batch = static_batch_size(x)
        if batch is not None:
            return Context.PLAIN, batch
        return (Context.ONNX if torch.compiler.is_exporting() else Context.INDUCTOR), None
    if torch.jit.is_tracing():
        batch = traced_batch_size(x)
        if batch is not None:
            return Context.PLAIN, batch
        return (Context.ONNX if torch.onnx.is_in_onnx_export() else Context.TRACE), None
    return Context.EAGER, int(x.shape[0])


def applies(name: str, geo: ConvGeometry, batch_size: int | None) -> bool:
    """Whether the implementation ``name`` computes a layer of this geometry at this batch size (None: any)."""
    return {
        "single": batch_size == 1,
        "per_sample_matmul": geo.kind == "pointwise",
        "bmm": geo.kind == "pointwise",
        "stacked": geo.in_channels == geo.groups,
        "triton": triton_eligible(geo),
    }.get(name, True)


def select(geo: ConvGeometry, x, implementation: str = "auto") -> tuple[Context, str, int | None]:
    """``(context, implementation, batch size)`` for a layer of this geometry on input ``x``.

    ``implementation`` is the layer's setting: ``"auto"`` takes the table's choice for the runtime (:func:`runtime`,
    :func:`table_choice`); a name from :data:`NAMES` forces that implementation wherever it computes the layer.
    Raises ``ParameterNetError`` for an unknown name, or a name that cannot compute this layer or run here.
    """
    context, batch = runtime(x)
    if implementation == "auto":
        return context, table_choice(context, geo, batch), batch
    if implementation not in _FUNCTIONS:
        raise ParameterNetError(
            f"unknown dynamic-conv implementation {implementation!r}; choose 'auto' or one of {', '.join(NAMES)}."
        )
    if not applies(implementation, geo, batch):
        raise ParameterNetError(
            f"implementation {implementation!r} does not compute a {geo.kind} layer "
            f"({geo.in_channels}->{geo.out_channels}, kernel {geo.kernel_size}, groups {geo.groups}) at batch "
            f"{'symbolic' if batch is None else batch}; set 'auto' for this layer."
        )
    if implementation == "triton" and isinstance(x, torch.Tensor) and not _triton.available(x):
        raise ParameterNetError(
            f"implementation 'triton' needs Triton and a CUDA input (got a {x.device.type} tensor); set 'auto'."
        )
    return context, implementation, batch


def dynamic_conv2d(
    x: torch.Tensor,
    alpha: torch.Tensor,
    experts: torch.Tensor,
    bias: torch.Tensor | None,
    geo: ConvGeometry,
    implementation: str,
    batch_size: int | None = None,
) -> torch.Tensor:
    """``y_b = conv(x_b, sum_i alpha_bi experts_i) + bias_b`` by the named implementation (see the module's table).

    ``x`` ``(B, C, H, W)``, ``alpha`` ``(B, M)``, ``experts`` ``(M, O, C/g, kh, kw)``, ``bias`` ``(B, O)``, ``(O,)``
    or None (``per_sample_matmul`` takes ``(B, O)`` or None); returns ``(B, O, H', W')``. ``batch_size`` fixes the
    batch size of ``grouped``'s kernel (an ONNX graph for one batch size). Raises ``KeyError`` for an unknown name.
    """
    return _FUNCTIONS[implementation](x, alpha, experts, bias, geo, batch_size)
