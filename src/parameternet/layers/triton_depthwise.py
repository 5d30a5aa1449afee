"""A per-sample depthwise conv as Triton kernels: ``y[b, c] = conv2d(x[b, c], w[b, c]) (+ bias[b, c])``.

The depthwise layers of a ParameterNet (one input channel per group, one output channel per input channel) hold a
different ``kh x kw`` kernel for every sample and channel. The portable formulation folds the batch into the
channels (a conv with ``groups = B * C``), which needs an NCHW tensor: a channels_last input is copied to NCHW and the
output comes back NCHW. These kernels read and write through the tensors' strides instead, so a channels_last input
gives a channels_last output with no copy, and the per-sample kernels ``(B, C, kh, kw)`` are small (the B per-sample
kernels of a depthwise layer are ``kh * kw`` numbers a channel).

- forward: one program per output row block ``(b, oh, ow-block, c-block)``, summing the ``kh * kw`` taps in
  float32.
- backward: the input gradient gathers, for each input position, the taps whose output it fed (any stride and
  dilation); the kernel gradient reduces ``grad_y * x_shifted`` over the output positions, one program per
  ``(b, c-block, tap)``.

Zero padding only (explicit, possibly asymmetric); other padding modes and channel multipliers take another
implementation. Runs on CUDA, and on a CPU under Triton's interpreter (``TRITON_INTERPRET=1``), where the test suite
checks its arithmetic. :func:`available` says whether it can run for a tensor.
"""

from __future__ import annotations

import os

import torch

try:  # an optional dependency: without Triton every layer takes a pure-PyTorch implementation
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None

__all__ = ["available", "per_sample_depthwise"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: Triton is installed and ``x`` is on a CUDA device, or on a
    CPU with ``TRITON_INTERPRET=1`` set (the interpreter: exact but slow, for tests)."""
    if triton is None:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and _interpreting()


if triton is not None:

    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        C, H, W, OH, OW,
        sxb, sxc, sxh, sxw,
        syb, syc, syh, syw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * OH + oh
        b = row // OH
        oh = row % OH
        ow = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        x_base = x_ptr + b.to(tl.int64) * sxb + c[None, :].to(tl.int64) * sxc
        w_base = w_ptr + (b * C + c).to(tl.int64) * (KH * KW)
        for i in tl.static_range(KH):
            ih = oh * SH - PT + i * DH
            h_ok = (ih >= 0) & (ih < H)
            for j in tl.static_range(KW):
                iw = ow * SW - PL + j * DW
                m = (h_ok & (iw >= 0) & (iw < W) & (ow < OW))[:, None] & c_ok[None, :]
                xv = tl.load(x_base + ih.to(tl.int64) * sxh + iw[:, None].to(tl.int64) * sxw, mask=m, other=0.0)
                wv = tl.load(w_base + (i * KW + j), mask=c_ok, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + b * C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        m = (ow < OW)[:, None] & c_ok[None, :]
        y_off = b.to(tl.int64) * syb + c[None, :].to(tl.int64) * syc + oh.to(tl.int64) * syh
        tl.store(y_ptr + y_off + ow[:, None].to(tl.int64) * syw, acc.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _grad_input_kernel(
        g_ptr, w_ptr, gx_ptr,
        C, H, W, OH, OW,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * H + ih
        b = row // H
        ih = row % H
        iw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        g_base = g_ptr + b.to(tl.int64) * sgb + c[None, :].to(tl.int64) * sgc
        w_base = w_ptr + (b * C + c).to(tl.int64) * (KH * KW)
        for i in tl.static_range(KH):
            th = ih + PT - i * DH  # oh * SH for the output row this tap reads ih into
            oh = tl.where(th >= 0, th, 0) // SH
            h_ok = (th >= 0) & (th % SH == 0) & (oh < OH)
            for j in tl.static_range(KW):
                tw = iw + PL - j * DW
                ow = tl.where(tw >= 0, tw, 0) // SW
                m = (h_ok & (tw >= 0) & (tw % SW == 0) & (ow < OW) & (iw < W))[:, None] & c_ok[None, :]
                gv = tl.load(g_base + oh.to(tl.int64) * sgh + ow[:, None].to(tl.int64) * sgw, mask=m, other=0.0)
                wv = tl.load(w_base + (i * KW + j), mask=c_ok, other=0.0)
                acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
        m = (iw < W)[:, None] & c_ok[None, :]
        x_off = b.to(tl.int64) * sxb + c[None, :].to(tl.int64) * sxc + ih.to(tl.int64) * sxh
        tl.store(gx_ptr + x_off + iw[:, None].to(tl.int64) * sxw, acc.to(gx_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _grad_weight_kernel(
        g_ptr, x_ptr, gw_ptr,
        C, H, W, OH, OW,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        tap = tl.program_id(0)  # i * KW + j: the taps of one (b, c-block) run side by side and share the cache
        i = tap // KW
        j = tap % KW
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        b = tl.program_id(2)
        c_ok = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        g_base = g_ptr + b.to(tl.int64) * sgb + c[None, :].to(tl.int64) * sgc
        x_base = x_ptr + b.to(tl.int64) * sxb + c[None, :].to(tl.int64) * sxc
        for start in range(0, OH * OW, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            oh = p // OW
            ow = p % OW
            ih = oh * SH - PT + i * DH
            iw = ow * SW - PL + j * DW
            p_ok = p < OH * OW
            gm = p_ok[:, None] & c_ok[None, :]
            xm = (p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
            gv = tl.load(g_base + oh[:, None].to(tl.int64) * sgh + ow[:, None].to(tl.int64) * sgw, mask=gm, other=0.0)
            xv = tl.load(x_base + ih[:, None].to(tl.int64) * sxh + iw[:, None].to(tl.int64) * sxw, mask=xm, other=0.0)
            acc += tl.sum(gv.to(tl.float32) * xv.to(tl.float32), axis=0)
        tl.store(gw_ptr + (b * C + c).to(tl.int64) * (KH * KW) + tap, acc, mask=c_ok)


def _blocks(C: int) -> tuple[int, int]:
    """``(BLOCK_W, BLOCK_C)``: channels in blocks of up to 32 (the contiguous dimension of a channels_last tensor),
    output positions in blocks that make a tile of about 1024 elements."""
    block_c = min(32, triton.next_power_of_2(C))
    return max(1, 1024 // block_c), block_c


def _like(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``x``'s memory format (channels_last stays channels_last)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else None
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt or torch.contiguous_format)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + p - d * (k - 1) - 1) // s + 1


def _forward(x, weight, bias, stride, pad, dilation):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    (sh, sw), (dh, dw), (pl, pr, pt, pb) = stride, dilation, pad
    OH, OW = _out_size(H, KH, sh, pt + pb, dh), _out_size(W, KW, sw, pl + pr, dw)
    y = _like(x, (B, C, OH, OW), x.dtype)
    if y.numel() == 0:
        return y
    block_w, block_c = _blocks(C)
    grid = (B * OH, triton.cdiv(OW, block_w), triton.cdiv(C, block_c))
    _forward_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        C, H, W, OH, OW, *x.stride(), *y.stride(),
        KH=KH, KW=KW, SH=sh, SW=sw, PT=pt, PL=pl, DH=dh, DW=dw,
        HAS_BIAS=bias is not None, BLOCK_W=block_w, BLOCK_C=block_c,
    )  # fmt: skip
    return y


def _backward(grad, x, weight, stride, pad, dilation, need_x: bool, need_w: bool):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    OH, OW = grad.shape[2], grad.shape[3]
    (sh, sw), (dh, dw), (pl, _, pt, _) = stride, dilation, pad
    geo = dict(KH=KH, KW=KW, SH=sh, SW=sw, PT=pt, PL=pl, DH=dh, DW=dw)
    block_w, block_c = _blocks(C)
    gx = gw = None
    if need_x:
        gx = _like(x, x.shape, x.dtype)
        if gx.numel():
            grid = (B * H, triton.cdiv(W, block_w), triton.cdiv(C, block_c))
            _grad_input_kernel[grid](
                grad, weight, gx, C, H, W, OH, OW, *grad.stride(), *gx.stride(),
                **geo, BLOCK_W=block_w, BLOCK_C=block_c,
            )  # fmt: skip
    if need_w:
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        if grad.numel() and x.numel():
            grid = (KH * KW, triton.cdiv(C, block_c), B)
            _grad_weight_kernel[grid](
                grad, x, gw, C, H, W, OH, OW, *grad.stride(), *x.stride(),
                **geo, BLOCK_P=max(1, 2048 // block_c), BLOCK_C=block_c,
            )  # fmt: skip
        gw = gw.to(weight.dtype)
    return gx, gw


@torch.library.custom_op("parameternet::per_sample_depthwise", mutates_args=())
def _depthwise_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    pad: list[int],
    dilation: list[int],
) -> torch.Tensor:
    return _forward(x, weight.contiguous(), None if bias is None else bias.contiguous(), stride, pad, dilation)


@_depthwise_op.register_fake
def _(x, weight, bias, stride, pad, dilation):
    B, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    OH = _out_size(H, KH, stride[0], pad[2] + pad[3], dilation[0])
    OW = _out_size(W, KW, stride[1], pad[0] + pad[1], dilation[1])
    return _like(x, (B, C, OH, OW), x.dtype)


@torch.library.custom_op("parameternet::per_sample_depthwise_backward", mutates_args=())
def _depthwise_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    pad: list[int],
    dilation: list[int],
    need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gw = _backward(grad, x, weight.contiguous(), stride, pad, dilation, need_x, need_w)
    # A custom op returns tensors, never None: an unneeded gradient is an empty tensor, dropped by the autograd rule.
    return (x.new_empty(0) if gx is None else gx), (weight.new_empty(0) if gw is None else gw)


@_depthwise_backward_op.register_fake
def _(grad, x, weight, stride, pad, dilation, need_x, need_w):
    gx = _like(x, tuple(x.shape), x.dtype) if need_x else x.new_empty(0)
    return gx, (weight.new_empty(weight.shape) if need_w else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, pad, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, pad, dilation)
    ctx.has_bias = bias is not None


def _backward_rule(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gx, gw = _depthwise_backward_op(grad, x, weight, *ctx.conv, need_x, need_w)
    gb = grad.sum((2, 3)) if ctx.has_bias and need_b else None
    return (gx if need_x else None), (gw if need_w else None), gb, None, None, None


_depthwise_op.register_autograd(_backward_rule, setup_context=_setup_context)


def per_sample_depthwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    pad: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``y[b] = conv2d(x[b], weight[b], bias[b], groups=C)`` with zero padding, by the Triton kernels.

    ``x`` ``(B, C, H, W)`` in any memory format, ``weight`` ``(B, C, kh, kw)``, ``bias`` ``(B, C)`` or None, ``pad``
    ``(left, right, top, bottom)``. Returns ``(B, C, H', W')`` in ``x``'s memory format and dtype (accumulated in
    float32). All operands share one dtype; gradients come back in each one's dtype. Call :func:`available` first.
    """
    return _depthwise_op(x, weight, bias, list(stride), list(pad), list(dilation))
