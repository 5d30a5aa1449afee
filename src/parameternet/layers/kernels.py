"""Eager kernels of the dynamic layers (ParameterNet, arXiv 2306.14525, sec. 3.2): what autograd does badly alone.

- :func:`route` and :func:`route_mean`: the release's ``linear-sigmoid`` router as one linear and a sigmoid,
  without two module calls per layer (batch-1 inference runs 88 routers in ParameterNet-600M), the pooling's
  division folded into the linear layer; any other router is called as a module.
- :func:`spatial_mean`: the router's pooled input. Its gradient is a broadcast view of ``grad / n``: the stock
  ``mean`` backward writes a full-size tensor for every dynamic layer just to add a constant per channel.
- :func:`per_sample_matmul`: ``y_b = W_b x_b`` with ``W_b = sum_i alpha_bi W_i``, the product of a 1x1 dynamic
  conv or a dynamic linear. On a CPU, once a batch's per-sample kernels ``(B, O, I)`` outgrow a few MB they are
  built a few samples at a time and rebuilt in backward instead of being kept: at batch 32 ParameterNet-600M's come
  to about 600 MB (from the layers' shapes), often larger than the activations they multiply, and large fresh
  buffers cost page faults on every step, while a chunk that stays in the cache is written and read back at cache
  speed.

Both equal the plain formulas (``x.mean``, ``torch.bmm`` of the mixed kernels); ``tests/test_layers.py`` checks.

Function transforms: under a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``, ``jacrev``, ...) or a
forward-mode AD level (:func:`transforms_active`) both step aside for the plain formulas, on either side of every size
threshold, since functorch takes only autograd functions with a ``setup_context``, a vmap rule and a jvp, which
``out=`` writes into chunks cannot have. Their backwards are differentiable: with ``create_graph=True`` (a gradient
penalty, a Hessian-vector product) or under ``vmap`` (``torch.autograd.grad(..., is_grads_batched=True)``) the
chunked matmul's backward is the plain formula of the full per-sample kernels. ``tests/test_transforms.py`` checks.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import nn

from parameternet.layers.router import LinearSigmoidRouter, router_precision

__all__ = [
    "CHUNK_BYTES",
    "counting_trace",
    "fixed_batch_trace",
    "is_counting_trace",
    "KEEP_BYTES",
    "KEEP_BYTES_GPU",
    "MEAN_MIN_NUMEL",
    "per_sample_matmul",
    "route",
    "route_mean",
    "spatial_mean",
    "static_batch_size",
    "traced_batch_size",
    "transforms_active",
]

# Per-sample kernels built at once: small enough for the cache and for the heap (glibc maps anything over 32 MB
# afresh, page by page, on every call), large enough that the expert gradient is not re-read for every sample.
CHUNK_BYTES = 16 << 20
# Kernels of a whole batch up to this size are built at once and kept for backward by autograd: cheaper than the
# chunked function for small layers, and little memory. On a GPU, where the chunk loop costs kernel launches and
# memory is less tight, up to KEEP_BYTES_GPU (the measurement behind it: docs/deployment.md, "On a GPU").
KEEP_BYTES = 4 << 20
KEEP_BYTES_GPU = 2 << 30
# Below this many elements the stock mean backward is cheaper than a Python autograd function.
MEAN_MIN_NUMEL = 1 << 16


# What a torch.jit.trace of a dynamic layer records: None (a symbolic batch: batch-agnostic formulations), COUNTED
# (the MAC counter: the paper's formulas for the input's batch size) or a batch size (a graph for that size only).
_TRACE = [None]
_COUNTED = "counted"


class _TraceMode:
    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.prev = _TRACE[0]
        _TRACE[0] = self.mode
        return self

    def __exit__(self, *exc):
        _TRACE[0] = self.prev


class counting_trace(_TraceMode):
    """While active, ``torch.jit.trace`` of a dynamic layer records the paper's plain formulas (what the MAC
    counter counts: a grouped conv over the batch, whose group count fixes the batch size) instead of the
    batch-agnostic graph formulations every other trace gets."""

    def __init__(self):
        super().__init__(_COUNTED)


class fixed_batch_trace(_TraceMode):
    """While active, ``torch.jit.trace`` (ONNX's TorchScript exporter) of a dynamic conv records a graph for inputs
    of ``batch_size`` images only: the eager formulas, whose group count may hold the batch size, and for one image
    a plain conv whose kernel is computed in the graph. The kernel's shape then comes from the layer, never from
    shape inference (which a reflect pad or timm's ``Conv2dSame`` upstream loses). ``export_onnx`` enters it for a
    fixed-batch graph. Raises ``ValueError`` for a batch size below 1."""

    def __init__(self, batch_size: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"fixed_batch_trace needs a batch size >= 1, got {batch_size!r}.")
        super().__init__(batch_size)


def is_counting_trace() -> bool:
    return _TRACE[0] == _COUNTED


def traced_batch_size(x: torch.Tensor) -> int | None:
    """Inside ``torch.jit.trace``: the batch size the graph is for, or None for a symbolic batch (the default)."""
    mode = _TRACE[0]
    if mode == _COUNTED:
        return int(x.shape[0])
    return mode


def static_batch_size(x: torch.Tensor) -> int | None:
    """Inside ``torch.compile`` / ``torch.export``: ``x``'s batch size when the compiler holds it as a number (static
    shapes, or a batch of 0 or 1, which PyTorch specialises), None when it is symbolic. A symbolic size's parity is
    not known statically, a number's is; asking adds no guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    B = x.shape[0]
    if statically_known_true(B % 2 == 0) or statically_known_true(B % 2 == 1):
        return int(B)
    return None


def transforms_active() -> bool:
    """Whether eager PyTorch runs under a ``torch.func`` transform (``grad``, ``vjp``, ``jvp``, ``vmap``, ``jacrev``,
    ``hessian``, ...) or inside ``torch.autograd.forward_ad.dual_level``: the dynamic layers then compute their plain
    formulas, without custom autograd functions or custom ops (functorch takes only ``setup_context``-style functions
    with a vmap rule and a jvp; the chunked kernels write into ``out=`` chunks and the custom op has no vmap rule).
    False inside ``torch.compile``, which traces the same code paths as before."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def _differentiable_backward(grad: torch.Tensor) -> bool:
    """In an autograd function's backward of ``grad``: whether the gradient must itself be differentiable or batched,
    i.e. built from plain ops: ``create_graph=True`` turns grad mode on, a ``torch.func`` transform may be active,
    and ``is_grads_batched=True`` (``torch.autograd.functional.jacobian(vectorize=True)``) runs the backward under
    the legacy ``vmap``, whose batched gradients carry no functorch level."""
    if torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(grad)


def _plain_linear(router: nn.Module) -> nn.Linear | None:
    """The linear layer of a ``linear-sigmoid`` router that no hook watches, else None."""
    if type(router) is LinearSigmoidRouter and not (router._forward_hooks or router._forward_pre_hooks):
        fc = router.fc
        if not (fc._forward_hooks or fc._forward_pre_hooks):
            return fc
    return None


def route(router: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """``router(pooled)``: coefficients ``(B, M)``."""
    fc = _plain_linear(router)
    if fc is not None:
        with router_precision(pooled) as p:
            return torch.sigmoid(F.linear(p.cast(pooled), p.cast(fc.weight), p.cast(fc.bias)))
    return router(pooled)


def route_mean(router: nn.Module, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``router(x.mean(dims))``. For the ``linear-sigmoid`` router the mean's division rides in the linear layer:
    ``sigmoid(addmm(b, x.sum(dims), W^T, alpha=1/n))``, three ops instead of six at batch 1 (a mean is a sum and a
    division), and the sum's backward is a broadcast view where the mean's is a full-size tensor."""
    fc = _plain_linear(router)
    if fc is None or fc.bias is None or not dims:
        return route(router, spatial_mean(x, dims) if dims else x)
    n = 1
    for d in dims:
        n *= x.shape[d]
    with router_precision(x) as p:  # float32 under autocast (the sum accumulates in float32 either way)
        if x.shape[0] == 1 and not transforms_active():
            # One sample: a matrix-vector product needs no transposed weight and no broadcast bias copy, and a view
            # gives the mix its (1, M) row in one op where unsqueeze takes two; at batch 1 a GPU's eager time is the
            # ops it dispatches.
            sum_dims = (0, *dims)
            pooled = x.sum(sum_dims, dtype=torch.float32) if p.active else x.sum(sum_dims)
            return torch.addmv(p.cast(fc.bias), p.cast(fc.weight), pooled, alpha=1.0 / n).sigmoid_().view(1, -1)
        pooled = x.sum(dims, dtype=torch.float32) if p.active else x.sum(dims)
        return torch.addmm(p.cast(fc.bias), pooled, p.cast(fc.weight).t(), alpha=1.0 / n).sigmoid_()


class _SpatialMean(torch.autograd.Function):
    # The backward is plain broadcasting ops: differentiable (double backward) and batched under vmap as it stands.
    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.dims = dims
        return x.mean(dims)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = 1
        for d in ctx.dims:
            n *= ctx.shape[d]
        for d in sorted(ctx.dims):
            grad = grad.unsqueeze(d)
        return (grad / n).expand(ctx.shape), None


def spatial_mean(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x.mean(dims)`` whose backward is a broadcast view rather than a full-size tensor (``x.mean`` itself under a
    function transform)."""
    if x.requires_grad and torch.is_grad_enabled() and x.numel() >= MEAN_MIN_NUMEL and not transforms_active():
        return _SpatialMean.apply(x, dims)
    return x.mean(dims)


def _chunk(batch: int, kernel_numel: int, element_size: int) -> int:
    return max(1, min(batch, CHUNK_BYTES // max(1, kernel_numel * element_size)))


def _mix(alpha: torch.Tensor, bank: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return (alpha @ bank).view(alpha.shape[0], *shape)  # (b, O, I)


class _PerSampleMatmul(torch.autograd.Function):
    """``x (B, I, L) -> y (B, O, L)`` (``channels_first``) or ``x (B, L, I) -> y (B, L, O)``."""

    @staticmethod
    def forward(ctx, x, alpha, bank, bias, channels_first):
        M, n_out, n_in = bank.shape
        B = x.shape[0]
        flat = bank.reshape(M, n_out * n_in)
        L = x.shape[2] if channels_first else x.shape[1]
        y = x.new_empty((B, n_out, L) if channels_first else (B, L, n_out))
        step = _chunk(B, n_out * n_in, bank.element_size())
        for s in range(0, B, step):
            w = _mix(alpha[s : s + step], flat, (n_out, n_in))
            if channels_first:
                torch.bmm(w, x[s : s + step], out=y[s : s + step])
            else:
                torch.bmm(x[s : s + step], w.transpose(1, 2), out=y[s : s + step])
        if bias is not None:
            y += bias.unsqueeze(2 if channels_first else 1)
        ctx.save_for_backward(x, alpha, bank)
        ctx.channels_first = channels_first
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, alpha, bank = ctx.saved_tensors
        if _differentiable_backward(gy):
            return _per_sample_matmul_backward(
                gy, x, alpha, bank, ctx.channels_first, ctx.has_bias, ctx.needs_input_grad
            )
        gy = gy.contiguous()
        cf = ctx.channels_first
        M, n_out, n_in = bank.shape
        B = x.shape[0]
        flat = bank.reshape(M, n_out * n_in)
        need_x, need_alpha, need_bank, need_bias, _ = ctx.needs_input_grad
        gx = torch.empty_like(x) if need_x else None
        g_alpha = alpha.new_empty(alpha.shape) if need_alpha else None
        g_bank = None
        g_bias = (gy.sum(2) if cf else gy.sum(1)) if need_bias and ctx.has_bias else None
        step = _chunk(B, n_out * n_in, bank.element_size())
        for s in range(0, B, step):
            xs, gs = x[s : s + step], gy[s : s + step]
            if need_x:
                w = _mix(alpha[s : s + step], flat, (n_out, n_in))
                if cf:
                    torch.bmm(w.transpose(1, 2), gs, out=gx[s : s + step])  # (b, I, L)
                else:
                    torch.bmm(gs, w, out=gx[s : s + step])  # (b, L, I)
            if need_alpha or need_bank:
                gw = torch.bmm(gs, xs.transpose(1, 2)) if cf else torch.bmm(gs.transpose(1, 2), xs)  # (b, O, I)
                gw = gw.view(gw.shape[0], n_out * n_in)
                if need_bank and g_bank is None:
                    g_bank = alpha[s : s + step].t() @ gw  # (M, O*I)
                elif need_bank:
                    g_bank.addmm_(alpha[s : s + step].t(), gw)
                if need_alpha:
                    torch.mm(gw, flat.t(), out=g_alpha[s : s + step])
        return gx, g_alpha, None if g_bank is None else g_bank.view(M, n_out, n_in), g_bias, None


def _per_sample_matmul_backward(gy, x, alpha, bank, channels_first, has_bias, needs_input_grad):
    """``_PerSampleMatmul``'s gradients by the plain formulas of the full per-sample kernels ``(B, O, I)``, without
    ``out=``: differentiable in every operand (``x``, ``alpha`` and ``bank`` are the function's saved inputs, so a
    second backward reaches the graph before them), and batched under ``vmap``."""
    M, n_out, n_in = bank.shape
    flat = bank.reshape(M, n_out * n_in)
    need_x, need_alpha, need_bank, need_bias, _ = needs_input_grad
    gx = g_alpha = g_bank = g_bias = None
    if need_x:
        w = _mix(alpha, flat, (n_out, n_in))  # (B, O, I)
        gx = torch.bmm(w.transpose(1, 2), gy) if channels_first else torch.bmm(gy, w)
    if need_alpha or need_bank:
        gw = torch.bmm(gy, x.transpose(1, 2)) if channels_first else torch.bmm(gy.transpose(1, 2), x)  # (B, O, I)
        gw = gw.reshape(gw.shape[0], n_out * n_in)
        g_alpha = gw @ flat.t() if need_alpha else None
        g_bank = (alpha.t() @ gw).view(M, n_out, n_in) if need_bank else None
    if need_bias and has_bias:
        g_bias = gy.sum(2 if channels_first else 1)
    return gx, g_alpha, g_bank, g_bias, None


def per_sample_matmul(
    x: torch.Tensor, alpha: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor | None, channels_first: bool
) -> torch.Tensor:
    """Multiply every sample by its own mixed kernel ``sum_i alpha[b, i] * bank[i]`` (``bank``: ``(M, O, I)``).

    ``x`` is ``(B, I, L)`` with ``channels_first``, else ``(B, L, I)``; ``bias`` is ``(B, O)`` or None. When all
    the per-sample kernels fit in one chunk they are built at once and autograd keeps them, which is cheaper.
    Under ``torch.autocast`` every operand is cast to the autocast dtype (on both sides of the size threshold) and
    the output has that dtype; gradients come back in each operand's own dtype. Mixed dtypes without autocast are
    refused by ``torch.bmm``, as ``nn.Linear`` refuses them. Under a function transform (:func:`transforms_active`)
    the kernels are built at once whatever their size, with plain ops.
    """
    dtype = _autocast_dtype(x)
    if dtype is not None:
        # Autocast does not reach into an autograd Function (nor does it cast bmm's ``out=``): cast once as it
        # would for bmm, and run the kernels with it off. The casts' backward returns every gradient in its
        # input's dtype (fp32 experts get fp32 gradients).
        x, alpha, bank = x.to(dtype), alpha.to(dtype), bank.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _per_sample_matmul(x, alpha, bank, bias, channels_first)
    return _per_sample_matmul(x, alpha, bank, bias, channels_first)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul of ``x`` in, or None when autocast is off for its device."""
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _per_sample_matmul(x, alpha, bank, bias, channels_first):
    B, (M, n_out, n_in) = x.shape[0], bank.shape
    keep = B * n_out * n_in * bank.element_size() <= (KEEP_BYTES if x.device.type == "cpu" else KEEP_BYTES_GPU)
    if keep or transforms_active():
        w = _mix(alpha, bank.reshape(M, n_out * n_in), (n_out, n_in))  # (B, O, I)
        y = torch.bmm(w, x) if channels_first else torch.bmm(x, w.transpose(1, 2))
        return y if bias is None else y + bias.unsqueeze(2 if channels_first else 1)
    return _PerSampleMatmul.apply(x.contiguous(), alpha.contiguous(), bank, bias, channels_first)
