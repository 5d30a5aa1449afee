"""A per-sample depthwise conv as Triton kernels: ``y[b, c] = conv2d(x[b, c], w[b, c]) (+ bias[b, c])``.

The depthwise layers of a ParameterNet (one input channel per group, one output channel per input channel) hold a
different ``kh x kw`` kernel for every sample and channel. The portable formulation folds the batch into the
channels (a conv with ``groups = B * C``), which needs an NCHW tensor: a channels_last input is copied to NCHW and the
output comes back NCHW. These kernels read and write through the tensors' strides instead, so a channels_last input
gives a channels_last output with no copy, and the per-sample kernels ``(B, C, kh, kw)`` are small (the B per-sample
kernels of a depthwise layer are ``kh * kw`` numbers a channel).

Every kernel works on 2-D tiles of one row: ``BLOCK_W`` positions by ``BLOCK_C`` channels, shaped in Python from the
layout so that the tile's long side is the tensor's unit-stride dimension: in channels_last the channels (up to 128
of them, so neighbouring positions are one contiguous run), in NCHW the row (up to 128 positions, a few channels).
Programs are numbered channel block first, so the blocks of one row run side by side and share the cache lines they
split. Each load of a tap is a tile read through a scalar base (int64) plus a per-tile offset computed once; where the
row and stride sizes are multiples of a vector width the kernels tell the compiler so, and it vectorises the loads
and stores along the unit-stride dimension.

- forward: a program computes ``ROWS`` output rows of a ``(BLOCK_W, BLOCK_C)`` column block, summing the
  ``kh * kw`` shifted input tiles in float32, bias fused. The padding is masks, not branches, so every tap's load
  of a row can be in flight at once.
- input gradient: the transposed conv as a gather. For stride 1 it is a conv with the flipped kernel. For a stride
  ``s > 1`` the input rows and columns split into phases (``iw = phase + s * k``): in one phase the taps that reach
  an output are known at compile time and the output columns they read are contiguous in ``k``, so no lane and no
  instruction is spent on the taps that a stride skips.
- kernel gradient: a program owns ``(b, channel block, block of output rows)``, reads each ``grad_y`` tile once and,
  for every tap, the shifted input tile (neighbouring taps hit the cache), and keeps one float32 tile of partial
  products a tap (a tuple of ``kh * kw`` accumulators), reduced over positions once at the end. It writes the
  partial sums of its row block to a ``(B, C, row blocks, kh * kw)`` buffer that torch sums: deterministic, and the
  inputs are read once from memory instead of ``kh * kw`` times.

All arithmetic is exact up to float32 accumulation order. Zero padding only (explicit, possibly asymmetric); other
padding modes and channel multipliers take another implementation. Runs on CUDA, and on a CPU under Triton's
interpreter (``TRITON_INTERPRET=1``), where the test suite checks its arithmetic. :func:`available` says whether it
can run for a tensor.
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
    def _multiple(v, VEC: tl.constexpr):
        """``v`` itself, known to the compiler as a multiple of ``VEC`` (the caller checked that it is): with rows
        aligned to ``VEC`` elements the loads and stores along the unit-stride dimension become vector accesses."""
        if VEC > 1:
            v = (v // VEC) * VEC
        return v

    @triton.jit
    def _tile(lw, lc, s_w, s_c, WIDE: tl.constexpr):
        """The ``(BLOCK_W, BLOCK_C)`` offsets of a tile from its first element: ``lw * s_w + lc * s_c``, in int64
        where they could pass 2**31 (``WIDE``), in int32 otherwise."""
        if WIDE:
            off = lw.to(tl.int64)[:, None] * s_w + lc.to(tl.int64)[None, :] * s_c
        else:
            off = lw[:, None] * s_w + lc[None, :] * s_c
        return off

    @triton.jit
    def _forward_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        C, H, W, OH, OW,
        sxb, sxc, sxh, sxw,
        syb, syc, syh, syw,
        swb, swt, swc,
        n_cb, n_wb, n_rb, ROWS,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        HAS_BIAS: tl.constexpr, CL: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # The alignment hints: _hinted lists the same values, and _vec checks them.
        if CL:
            C = _multiple(C, VEC)
            sxb, sxh, sxw = _multiple(sxb, VEC), _multiple(sxh, VEC), _multiple(sxw, VEC)
            syb, syh, syw = _multiple(syb, VEC), _multiple(syh, VEC), _multiple(syw, VEC)
            swb, swt = _multiple(swb, VEC), _multiple(swt, VEC)
        else:
            W, OW = _multiple(W, VEC), _multiple(OW, VEC)
            sxb, sxc, sxh = _multiple(sxb, VEC), _multiple(sxc, VEC), _multiple(sxh, VEC)
            syb, syc, syh = _multiple(syb, VEC), _multiple(syc, VEC), _multiple(syh, VEC)
        pid = tl.program_id(0)  # ((b * n_rb + row block) * n_wb + column block) * n_cb + channel block
        cb = pid % n_cb
        rest = pid // n_cb
        wb = rest % n_wb
        rest = rest // n_wb
        rb = rest % n_rb
        b = (rest // n_rb).to(tl.int64)
        c0 = cb * BLOCK_C
        ow0 = wb * BLOCK_W
        lc = tl.arange(0, BLOCK_C)
        lw = tl.arange(0, BLOCK_W)
        c_ok = c0 + lc < C
        ow = ow0 + lw
        x_tile = _tile(lw * SW, lc, sxw, sxc, WIDE)
        y_tile = _tile(lw, lc, syw, syc, WIDE)
        x_base = x_ptr + (b * sxb + c0.to(tl.int64) * sxc)
        y_base = y_ptr + (b * syb + c0.to(tl.int64) * syc + ow0.to(tl.int64) * syw)
        w_base = w_ptr + b * swb + (c0 + lc).to(tl.int64) * swc
        if HAS_BIAS:
            bias = tl.load(b_ptr + b * C + c0 + lc, mask=c_ok, other=0.0).to(tl.float32)
        out_ok = (ow < OW)[:, None] & c_ok[None, :]
        oh0 = rb * ROWS
        for oh in range(oh0, tl.minimum(oh0 + ROWS, OH)):
            acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
            for i in tl.static_range(KH):
                ih = oh * SH - PT + i * DH
                h_ok = (ih >= 0) & (ih < H)  # a mask, not a branch: every tap's load can be in flight at once
                x_row = x_base + tl.cast(ih, tl.int64) * sxh
                for j in tl.static_range(KW):
                    iw = ow * SW + (j * DW - PL)
                    m = (h_ok & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
                    col = tl.cast(ow0 * SW + (j * DW - PL), tl.int64) * sxw
                    xv = tl.load(x_row + col + x_tile, mask=m, other=0.0)
                    wv = tl.load(w_base + (i * KW + j) * swt, mask=c_ok, other=0.0)
                    acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += bias[None, :]
            y = y_base + tl.cast(oh, tl.int64) * syh + y_tile
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_ok)

    @triton.jit
    def _grad_input_kernel(
        g_ptr, w_ptr, gx_ptr,
        C, H, W, OH, OW,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        swb, swt, swc,
        n_cb, n_kb, n_rb, ROWS,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        CL: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # gx[ih, iw] = sum over the taps (i, j) with oh * SH == ih + PT - i * DH and ow * SW == iw + PL - j * DW of
        # g[oh, ow] * w[i, j]. Rows and columns go by phase: ih = qh + SH * m, iw = qw + SW * k, for m in this
        # program's rows and k in its column block. In phase (qh, qw), kernel row i reaches an output row iff
        # (qh + PT - i * DH) % SH == 0, at oh = m + that quotient, and column j likewise: known at compile time, so
        # a stride skips taps without spending a lane on them, and the columns read are contiguous in k. For stride
        # 1 there is one phase: the conv of g with the flipped kernel.
        if CL:
            C = _multiple(C, VEC)
            sgb, sgh, sgw = _multiple(sgb, VEC), _multiple(sgh, VEC), _multiple(sgw, VEC)
            sxb, sxh, sxw = _multiple(sxb, VEC), _multiple(sxh, VEC), _multiple(sxw, VEC)
            swb, swt = _multiple(swb, VEC), _multiple(swt, VEC)
        else:
            W, OW = _multiple(W, VEC), _multiple(OW, VEC)
            sgb, sgc, sgh = _multiple(sgb, VEC), _multiple(sgc, VEC), _multiple(sgh, VEC)
            sxb, sxc, sxh = _multiple(sxb, VEC), _multiple(sxc, VEC), _multiple(sxh, VEC)
        pid = tl.program_id(0)  # ((b * n_rb + row block) * n_kb + column block) * n_cb + channel block
        cb = pid % n_cb
        rest = pid // n_cb
        kb = rest % n_kb
        rest = rest // n_kb
        rb = rest % n_rb
        b = (rest // n_rb).to(tl.int64)
        c0 = cb * BLOCK_C
        k0 = kb * BLOCK_W
        lc = tl.arange(0, BLOCK_C)
        lw = tl.arange(0, BLOCK_W)
        c_ok = c0 + lc < C
        k = k0 + lw
        g_tile = _tile(lw, lc, sgw, sgc, WIDE)
        x_tile = _tile(lw * SW, lc, sxw, sxc, WIDE)
        g_base = g_ptr + (b * sgb + c0.to(tl.int64) * sgc)
        x_base = gx_ptr + (b * sxb + c0.to(tl.int64) * sxc)
        w_base = w_ptr + b * swb + (c0 + lc).to(tl.int64) * swc
        m0 = rb * ROWS
        for m in range(m0, tl.minimum(m0 + ROWS, tl.cdiv(H, SH))):
            for qh in tl.static_range(SH):
                ih = qh + SH * m
                x_row = x_base + tl.cast(ih, tl.int64) * sxh
                for qw in tl.static_range(SW):
                    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
                    for i in tl.static_range(KH):
                        if (qh + PT - i * DH) % SH == 0:
                            oh = m + (qh + PT - i * DH) // SH  # a constant offset, exact
                            h_ok = (oh >= 0) & (oh < OH)
                            g_row = g_base + tl.cast(oh, tl.int64) * sgh
                            for j in tl.static_range(KW):
                                if (qw + PL - j * DW) % SW == 0:
                                    d = (qw + PL - j * DW) // SW  # a constant, exact: ow = k + d
                                    ow = k + d
                                    msk = (h_ok & (ow >= 0) & (ow < OW))[:, None] & c_ok[None, :]
                                    col = (k0 + d).to(tl.int64) * sgw
                                    gv = tl.load(g_row + col + g_tile, mask=msk, other=0.0)
                                    wv = tl.load(w_base + (i * KW + j) * swt, mask=c_ok, other=0.0)
                                    acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
                    iw = qw + SW * k
                    col = (qw + SW * k0).to(tl.int64) * sxw
                    msk = ((ih < H) & (iw < W))[:, None] & c_ok[None, :]
                    tl.store(x_row + col + x_tile, acc.to(gx_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _grad_weight_kernel(
        g_ptr, x_ptr, part_ptr,
        C, H, W, OH, OW,
        sgb, sgc, sgh, sgw,
        sxb, sxc, sxh, sxw,
        n_cb, n_rb, ROWS,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        PT: tl.constexpr, PL: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
        CL: tl.constexpr, VEC: tl.constexpr, WIDE: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # part[b, c, rb, i * KW + j] = sum over the output rows of block rb and all columns of
        # g[b, c, oh, ow] * x[b, c, oh * SH - PT + i * DH, ow * SW - PL + j * DW].
        if CL:
            C = _multiple(C, VEC)
            sgb, sgh, sgw = _multiple(sgb, VEC), _multiple(sgh, VEC), _multiple(sgw, VEC)
            sxb, sxh, sxw = _multiple(sxb, VEC), _multiple(sxh, VEC), _multiple(sxw, VEC)
        else:
            W, OW = _multiple(W, VEC), _multiple(OW, VEC)
            sgb, sgc, sgh = _multiple(sgb, VEC), _multiple(sgc, VEC), _multiple(sgh, VEC)
            sxb, sxc, sxh = _multiple(sxb, VEC), _multiple(sxc, VEC), _multiple(sxh, VEC)
        pid = tl.program_id(0)  # (b * n_rb + row block) * n_cb + channel block
        cb = pid % n_cb
        rest = pid // n_cb
        rb = rest % n_rb
        b = (rest // n_rb).to(tl.int64)
        c0 = cb * BLOCK_C
        lc = tl.arange(0, BLOCK_C)
        lw = tl.arange(0, BLOCK_W)
        c_ok = c0 + lc < C
        g_tile = _tile(lw, lc, sgw, sgc, WIDE)
        x_tile = _tile(lw * SW, lc, sxw, sxc, WIDE)
        g_base = g_ptr + (b * sgb + c0.to(tl.int64) * sgc)
        x_base = x_ptr + (b * sxb + c0.to(tl.int64) * sxc)
        accs = ()
        for _ in tl.static_range(KH * KW):
            accs = accs + (tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32),)
        oh0 = rb * ROWS
        for oh in range(oh0, tl.minimum(oh0 + ROWS, OH)):
            g_row = g_base + tl.cast(oh, tl.int64) * sgh
            for w0 in range(0, OW, BLOCK_W):
                ow = w0 + lw
                ow_ok = ow < OW
                gv = tl.load(
                    g_row + tl.cast(w0, tl.int64) * sgw + g_tile, mask=ow_ok[:, None] & c_ok[None, :], other=0.0
                )
                gv = gv.to(tl.float32)
                new = ()
                for i in tl.static_range(KH):
                    ih = oh * SH - PT + i * DH
                    h_ok = (ih >= 0) & (ih < H)
                    x_row = x_base + tl.cast(ih, tl.int64) * sxh
                    for j in tl.static_range(KW):
                        iw = ow * SW + (j * DW - PL)
                        # every lane whose g is masked is masked here too: no 0 * inf from a neighbour's input
                        m = (h_ok & ow_ok & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
                        col = tl.cast(w0 * SW + (j * DW - PL), tl.int64) * sxw
                        xv = tl.load(x_row + col + x_tile, mask=m, other=0.0)
                        new = new + (accs[i * KW + j] + gv * xv.to(tl.float32),)
                accs = new
        part = part_ptr + ((b * C + c0 + lc) * n_rb + rb) * (KH * KW)
        for t in tl.static_range(KH * KW):
            tl.store(part + t, tl.sum(accs[t], axis=0), mask=c_ok)


_PER_THREAD = 4  # elements a thread of a forward / input-gradient tile (4 warps): with kh * kw taps in flight,
#                 more costs registers (occupancy) and buys no bandwidth; channels_last takes a whole vector
_TILE = 1024  # the most elements in such a tile
_ACC_BUDGET = 64  # float32 accumulators a thread for the kernel gradient's kh * kw tiles
_PROGRAMS = 4096  # about 4 waves of resident programs on an H100 / H200 (132 SMs)
_PARTIAL_BYTES = 32  # bytes of grad_y a kernel-gradient row block should read a partial sum it writes (see below)
_ROW_TILES = 16384  # past this many row tiles, a forward / input-gradient program takes up to 4 rows


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _channels_last(t: torch.Tensor) -> bool:
    """Whether the tiles should run along the channels: they are ``t``'s unit-stride dimension (channels_last)."""
    return t.shape[1] > 1 and t.stride(1) == 1 and not (t.shape[3] > 1 and t.stride(3) == 1)


def _blocks(C: int, width: int, cl: bool, tile: int) -> tuple[int, int]:
    """``(BLOCK_W, BLOCK_C)`` for rows ``width`` positions long: along the unit-stride dimension first. In
    channels_last every channel (up to 128; past that the block of 128 or 64 that pads least), so neighbouring
    positions are one contiguous run, and as many positions as fill ``tile``. In NCHW the row (up to 128), and as
    many channels as fill ``tile``."""
    if cl:
        bc = _pow2(C) if C <= 128 else min((128, 64), key=lambda n: (triton.cdiv(C, n) * n, -n))
        bc = min(bc, tile)
        return max(1, min(tile // bc, _pow2(width))), bc
    bw = min(_pow2(width), 128, tile)
    return bw, max(1, min(tile // bw, _pow2(C)))


def _vec(t: torch.Tensor, *values: int) -> int:
    """The widest vector (up to 16 bytes, a power of two of elements) that divides every one of ``values``: the
    extents and strides the kernels declare multiples of ``VEC``."""
    v = max(1, 16 // t.element_size())
    while v > 1 and any(n % v for n in values):
        v //= 2
    return v


def _hinted(cl: bool, extents: tuple[int, ...], *tensors: tuple[int, ...]) -> tuple[int, ...]:
    """The values a kernel declares multiples of ``VEC`` (the ``_multiple`` calls at its top): in channels_last the
    channel count and every stride but the channel's; in NCHW the row lengths and every stride but the column's.
    ``tensors`` are the 4-d strides, and for the weights ``(b, tap)`` strides given as a pair."""
    out = list(extents)
    for s in tensors:
        if len(s) == 2:  # the weights (b, tap): hinted in channels_last only, where the channels are contiguous
            out += list(s) if cl else []
        else:
            out += [s[0], s[2], s[3]] if cl else [s[0], s[1], s[2]]
    return tuple(out)


def _wide(block_w: int, block_c: int, step: int, *strides: tuple[int, ...]) -> bool:
    """Whether a tile's offsets (``BLOCK_C`` channels by ``BLOCK_W`` columns ``step`` apart) can pass int32."""
    return any(block_c * abs(s[1]) + block_w * step * abs(s[3]) >= 2**31 for s in strides)


def _tile_shape(cl: bool, vec: int) -> tuple[int, int]:
    """``(elements, num_warps)`` of a forward / input-gradient tile: 4 warps, ``_PER_THREAD`` elements a thread,
    or in channels_last one whole ``VEC`` (up to 16 bytes: 8 bf16) so each tap is a single vector load a thread.
    (In NCHW the shifted taps are misaligned by an element: scalar loads whatever the tile.)"""
    per_thread = max(_PER_THREAD, vec) if cl else _PER_THREAD
    tile = min(_TILE, 128 * per_thread)
    return tile, max(1, min(8, tile // (32 * per_thread)))


def _weights(weight: torch.Tensor, cl: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The per-sample kernels as ``(B, taps, C)`` strides over a tensor: in channels_last a ``(B, kh * kw, C)``
    copy (``B * C * kh * kw`` numbers, small next to an activation), so each tap's weights for a channel block are
    one contiguous load; in NCHW the ``(B, C, kh, kw)`` tensor itself (a tile holds only a few channels)."""
    B, C = weight.shape[:2]
    w = weight.reshape(B, C, -1)
    if cl:
        w = w.transpose(1, 2).contiguous()
        return w, (w.stride(0), w.stride(1), w.stride(2))
    return w, (w.stride(0), w.stride(2), w.stride(1))


def _geometry(weight, stride, pad, dilation) -> dict:
    (sh, sw), (dh, dw), (pl, _, pt, _) = stride, dilation, pad
    return dict(KH=weight.shape[2], KW=weight.shape[3], SH=sh, SW=sw, PT=pt, PL=pl, DH=dh, DW=dw)


def _like(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of ``shape`` in ``x``'s memory format (channels_last stays channels_last)."""
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else None
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt or torch.contiguous_format)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + p - d * (k - 1) - 1) // s + 1


def _forward(x, weight, bias, stride, pad, dilation):
    B, C, H, W = x.shape
    geo = _geometry(weight, stride, pad, dilation)
    KH, KW, (pl, pr, pt, pb) = geo["KH"], geo["KW"], pad
    OH, OW = _out_size(H, KH, geo["SH"], pt + pb, geo["DH"]), _out_size(W, KW, geo["SW"], pl + pr, geo["DW"])
    y = _like(x, (B, C, OH, OW), x.dtype)
    if y.numel() == 0:
        return y
    cl = _channels_last(x)
    w, ws = _weights(weight, cl)
    vec = _vec(x, *_hinted(cl, (C,) if cl else (W, OW), x.stride(), y.stride(), ws[:2]))
    tile, warps = _tile_shape(cl, vec)
    bw, bc = _blocks(C, OW, cl, tile)
    n_cb, n_wb = triton.cdiv(C, bc), triton.cdiv(OW, bw)
    rows = max(1, min(4, B * OH * n_wb * n_cb // _ROW_TILES))
    n_rb = triton.cdiv(OH, rows)
    _forward_kernel[(B * n_rb * n_wb * n_cb,)](
        x, w, bias if bias is not None else w, y,
        C, H, W, OH, OW, *x.stride(), *y.stride(), *ws,
        n_cb, n_wb, n_rb, rows,
        **geo, HAS_BIAS=bias is not None, CL=cl, VEC=vec,
        WIDE=_wide(bw, bc, geo["SW"], x.stride(), y.stride()),
        BLOCK_W=bw, BLOCK_C=bc, num_warps=warps,
    )  # fmt: skip
    return y


def _grad_input(grad, x, weight, geo):
    B, C, H, W = x.shape
    OH, OW = grad.shape[2], grad.shape[3]
    gx = _like(x, x.shape, x.dtype)
    if gx.numel() == 0:
        return gx
    if grad.numel() == 0:
        return gx.zero_()
    cl = _channels_last(x)
    w, ws = _weights(weight, cl)
    vec = _vec(x, *_hinted(cl, (C,) if cl else (W, OW), grad.stride(), gx.stride(), ws[:2]))
    tile, warps = _tile_shape(cl, vec)
    bw, bc = _blocks(C, triton.cdiv(W, geo["SW"]), cl, tile)
    n_cb, n_kb = triton.cdiv(C, bc), triton.cdiv(triton.cdiv(W, geo["SW"]), bw)
    n_m = triton.cdiv(H, geo["SH"])  # row steps: one row of each of the SH phases a step
    rows = max(1, min(4, B * n_m * n_kb * n_cb // _ROW_TILES))
    n_rb = triton.cdiv(n_m, rows)
    _grad_input_kernel[(B * n_rb * n_kb * n_cb,)](
        grad, w, gx, C, H, W, OH, OW, *grad.stride(), *gx.stride(), *ws,
        n_cb, n_kb, n_rb, rows,
        **geo, CL=cl, VEC=vec, WIDE=_wide(bw, bc, geo["SW"], grad.stride(), gx.stride()),
        BLOCK_W=bw, BLOCK_C=bc, num_warps=warps,
    )  # fmt: skip
    return gx


def _grad_weight(grad, x, weight, geo):
    B, C, H, W = x.shape
    OH, OW = grad.shape[2], grad.shape[3]
    taps = geo["KH"] * geo["KW"]
    if grad.numel() == 0 or x.numel() == 0:
        return torch.zeros(weight.shape, dtype=weight.dtype, device=x.device)
    cl = _channels_last(x)
    # one float32 tile of partial products a tap: about _ACC_BUDGET of them a thread with 4 warps
    tile = max(32, min(1024, 1 << ((_ACC_BUDGET * 128 // taps).bit_length() - 1)))
    bw, bc = _blocks(C, OW, cl, tile)
    warps = min(4, _pow2(triton.cdiv(taps * bw * bc, 32 * _ACC_BUDGET)))
    n_cb = triton.cdiv(C, bc)
    # Row blocks: about _PROGRAMS programs, fewer where the partial sums (4 bytes each, written, then read by torch)
    # would move more than an 8th of the bytes of grad_y and x that the blocks read, but never under a quarter of
    # _PROGRAMS (a small map with few channels: filling the GPU matters more than those few bytes).
    cap = OH * OW * x.element_size() // (_PARTIAL_BYTES * taps)
    programs = B * n_cb
    blocks = min(OH, max(triton.cdiv(_PROGRAMS // 4, programs), min(triton.cdiv(_PROGRAMS, programs), cap)))
    rows = triton.cdiv(OH, max(1, blocks))
    n_rb = triton.cdiv(OH, rows)
    part = torch.empty((B, C, n_rb, taps), dtype=torch.float32, device=x.device)
    vec = _vec(x, *_hinted(cl, (C,) if cl else (W, OW), grad.stride(), x.stride()))
    _grad_weight_kernel[(B * n_rb * n_cb,)](
        grad, x, part, C, H, W, OH, OW, *grad.stride(), *x.stride(),
        n_cb, n_rb, rows,
        **geo, CL=cl, VEC=vec, WIDE=_wide(bw, bc, geo["SW"], grad.stride(), x.stride()),
        BLOCK_W=bw, BLOCK_C=bc, num_warps=warps,
    )  # fmt: skip
    return part.sum(2).to(weight.dtype).view(weight.shape)


def _backward(grad, x, weight, stride, pad, dilation, need_x: bool, need_w: bool):
    geo = _geometry(weight, stride, pad, dilation)
    gx = _grad_input(grad, x, weight, geo) if need_x else None
    gw = _grad_weight(grad, x, weight, geo) if need_w else None
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
