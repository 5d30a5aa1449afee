"""Top-k mixture-of-experts linear projection (ParameterNet section 5.4 and Table 7; Switch Transformer routing).

The language-model form of ParameterNet replaces one linear projection of the LLaMA FFN by ``M`` expert matrices
and a router, so parameters grow about ``M`` times while every token still goes through one matrix (the same
FLOPs). For a token ``x``::

    logits = R x                      # router, Linear(in, M, bias=False)
    p = softmax(logits)               # in float32 (Switch's "selective precision")
    y = sum_{e in top-k(logits)} p_e (W_e x + b_e)

With ``top_k=1`` this is Switch routing: the token goes to its argmax expert and the output is scaled by that
expert's probability, which is what gives the router a gradient from the language-model loss.

Dispatch has no per-token Python: the ``N * k`` (token, expert) assignments are sorted by expert, every expert
runs once on its contiguous block, and the results go back to token order through an index permutation (or an
``index_add`` when a token has several experts). The per-expert matmuls run as one
``torch.nn.functional.grouped_mm`` where torch has it for the dtype and device, otherwise as a loop over experts.
Nothing reads a tensor's value on the host where the graph must stay whole (compiled, exported, captured by CUDA
graphs): the counts per expert are a scatter-add, not ``bincount``, and :func:`expert_matmul` has a path for that.
Under a function transform (``torch.func.grad`` / ``jvp`` / ``vmap``, forward-mode AD), whose per-sample expert
counts would be data-dependent shapes, every token goes through every expert and each output is weighted by its gate
(zero for experts not chosen or over capacity): ``M`` times the multiply-adds, plain ops only.

``capacity_factor`` (None = no token dropped, the paper's setting) caps every expert at
``ceil(capacity_factor * N * k / M)`` assignments; first choices of all tokens come before second choices, and
within a choice rank earlier tokens win. A dropped assignment contributes zero (it is computed and scaled by zero).

Auxiliary losses, computed from the router logits by :func:`load_balancing_loss` and :func:`router_z_loss`:

- Switch load balancing (Fedus et al. 2021, eq. 4): ``M * sum_e f_e * P_e``, where ``f_e`` is the fraction of the
  ``N * k`` assignments that chose expert ``e`` and ``P_e`` the mean router probability of ``e``. This is the
  release's ``M^2 * mean_e(f_e * P_e)``; it is 1 for perfectly uniform routing and ``M`` when one expert takes
  every token with probability 1. Dividing ``f`` by ``k`` keeps that scale for top-k.
- Router z-loss (ST-MoE, Zoph et al. 2022): the mean of ``logsumexp(logits)^2``, which keeps the logits small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts
from parameternet.layers.kernels import transforms_active
from parameternet.layers.router import router_precision

__all__ = ["MoERouter", "TopKMoELinear", "load_balancing_loss", "padding_mask", "route", "router_z_loss"]

# Dtypes torch's CPU grouped matmul takes; on CUDA it needs bfloat16 on compute capability >= 8.0.
_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Dtypes torch's fake (meta) grouped_mm takes everywhere, so that torch.compile / torch.export can trace it: float32
# never, float16 only on CUDA with cuBLASLt's grouped GEMM (CUDA >= 13.3, compute capability 9 to 11).
_GROUPED_MM_TRACED_DTYPES = (torch.bfloat16,)


class MoERouter(nn.Linear):
    """Router logits ``(N, M)`` of a :class:`TopKMoELinear`: ``Linear(in_features, num_experts, bias=False)``.

    A class of its own so that forward hooks (transformers' output capture) find every router's logits.
    """

    def __init__(self, in_features: int, num_experts: int, device=None, dtype=None):
        super().__init__(in_features, num_experts, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, M)``; under ``torch.autocast`` in float32 (selective precision, as Switch Transformer:
        a bf16 router sends a fraction of tokens elsewhere than the float32 one and breaks ties to expert 0)."""
        with router_precision(x) as p:
            return F.linear(p.cast(x), p.cast(self.weight))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs (N, M) float32, top_p (N, k) float32, top_e (N, k) long)`` for router logits ``(N, M)``.

    Experts are chosen on the logits rather than the probabilities: tiny logit differences that round to equal
    float32 probabilities (see :meth:`TopKMoELinear.from_linear`) still decide the expert.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    if top_k == 1:
        top_e = router_logits.argmax(dim=-1, keepdim=True)  # first maximum on ties
    else:
        top_e = router_logits.topk(top_k, dim=-1).indices
    return probs, probs.gather(-1, top_e), top_e


def _flat_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if mask.numel() != n:
        raise ParameterNetError(f"The mask has {mask.numel()} entries for {n} routed tokens; pass one per token.")
    return mask


def load_balancing_loss(router_logits: torch.Tensor, top_k: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss ``M * sum_e f_e P_e`` of one router over its tokens (see the module docstring).

    ``router_logits`` is ``(..., M)``; ``mask`` (one entry per token, 1 = real, 0 = padding) leaves tokens out.
    """
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    num_experts = logits.shape[-1]
    probs, _, top_e = route(logits, top_k)
    chosen = torch.zeros_like(probs).scatter_(1, top_e, 1.0)  # (N, M): 1 where the token chose the expert
    weight = _flat_mask(mask, logits.shape[0], logits.device)
    if weight is None:
        f = chosen.mean(0) / top_k
        p = probs.mean(0)
    else:
        total = weight.sum().clamp_min(1.0)
        f = (chosen * weight[:, None]).sum(0) / (total * top_k)
        p = (probs * weight[:, None]).sum(0) / total
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: the mean over tokens of ``logsumexp(logits)^2``."""
    logits = router_logits.reshape(-1, router_logits.shape[-1])
    z = torch.logsumexp(logits.float(), dim=-1).square()
    weight = _flat_mask(mask, logits.shape[0], logits.device)
    if weight is None:
        return z.mean()
    return (z * weight).sum() / weight.sum().clamp_min(1.0)


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The grouped kernels need every row stride to be a multiple of 16 bytes.
    if not hasattr(F, "grouped_mm") or any(d * x.element_size() % 16 for d in weight.shape[1:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in _GROUPED_MM_CPU_DTYPES
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def _sync_free() -> bool:
    """Whether the dispatch must not read a tensor's value on the host: inside ``torch.compile`` / ``torch.export``
    (a graph break, or a failed ``fullgraph``) or while a CUDA graph is being captured (an error)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x`` ``(A, in)`` sorted by expert, ``counts`` ``(M,)`` rows per expert -> ``(A, out)``, row block ``e``
    multiplied by ``weight[e].T``.

    One ``grouped_mm`` where torch has it for the dtype and device (and, compiled or exported, where its tracing
    accepts the dtype: bfloat16; torch's fake kernel refuses float32, and float16 off CUDA's cuBLASLt grouped GEMM);
    otherwise, in eager PyTorch, a loop over the experts' row blocks (their sizes read on the host); otherwise
    (compiled, exported or captured, float32 / float16) every row through every expert and each row's own result
    gathered: ``M`` times the multiply-adds, but no host read, so the graph stays whole."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    sync_free = _sync_free()
    if _grouped_mm_ok(x, weight) and not (sync_free and x.dtype not in _GROUPED_MM_TRACED_DTYPES):
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    if not sync_free:
        blocks = x.split(counts.tolist())
        return torch.cat([F.linear(block, w) for block, w in zip(blocks, weight)])
    m = weight.shape[0]
    row_expert = torch.repeat_interleave(torch.arange(m, device=x.device), counts, output_size=x.shape[0])
    every = torch.matmul(x.unsqueeze(0), weight.transpose(1, 2))  # (M, A, out)
    return every.gather(0, row_expert.view(1, -1, 1).expand(1, -1, every.shape[2])).squeeze(0)


def expert_counts(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, ``(M,)`` int64, without a host read (``torch.bincount`` reads the maximum on CUDA)."""
    return torch.zeros(num_experts, dtype=torch.long, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert)
    )


def _real_tokens(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``(N,)`` bool, True for a real token, from a mask with one entry per token or an attention mask ``(B, L)``
    whose last ``N / B`` columns are the tokens of this call (a cache adds the past ones before them)."""
    if mask is None:
        return None
    if mask.dim() == 2 and mask.numel() != n and n % mask.shape[0] == 0 and n // mask.shape[0] <= mask.shape[1]:
        mask = mask[:, mask.shape[1] - n // mask.shape[0] :]
    if mask.numel() != n:
        raise ParameterNetError(
            f"the token mask has {mask.numel()} entries (shape {tuple(mask.shape)}) for {n} tokens; pass one per "
            "token, or the attention mask (batch, length)."
        )
    return mask.reshape(-1) != 0


class padding_mask:
    """``with padding_mask(model, attention_mask):`` every :class:`TopKMoELinear` in ``model`` leaves the tokens the
    mask marks as padding (0 / False) out of its capacity for the forward passes inside (see
    :meth:`TopKMoELinear.forward`). ``None`` clears nothing and sets nothing."""

    def __init__(self, model: nn.Module, mask: torch.Tensor | None):
        self.layers = [m for m in model.modules() if isinstance(m, TopKMoELinear)] if mask is not None else []
        self.mask = mask

    def __enter__(self) -> padding_mask:
        for layer in self.layers:
            layer.token_mask = self.mask
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.token_mask = None


class _PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose inverse is known: the backward is a gather as well, not the
    zero-fill and scatter-add that ``index_select`` needs in general. The backward is a plain ``index_select``:
    differentiable (double backward) and batched under ``vmap``; under a function transform the layer does not call
    it (:meth:`TopKMoELinear._forward_dense`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class TopKMoELinear(nn.Module):
    """A drop-in ``nn.Linear`` with ``num_experts`` matrices, each token routed to its top-k (Switch, top-1).

    ``weight`` is ``(M, out, in)``, ``bias`` ``(M, out)`` or None, ``router`` a :class:`MoERouter`. The input is
    ``(..., in_features)``; every position is a token.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        num_experts: int = 8,
        top_k: int = 1,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        check_num_experts(num_experts)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
            raise ParameterNetError(
                f"top_k={top_k!r} must be an integer from 1 to num_experts={num_experts}; lower it or add experts."
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ParameterNetError(
                f"capacity_factor must be positive or None (no token dropped), got {capacity_factor!r}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.token_mask: torch.Tensor | None = None  # set by padding_mask() for the duration of a forward
        kw = dict(device=device, dtype=dtype)
        self.router = MoERouter(in_features, num_experts, **kw)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every expert (and the router) initialised the way ``nn.Linear`` initialises its weight and bias."""
        self.router.reset_parameters()
        with torch.no_grad():
            for expert in self.weight:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = None,
        bias: bool | None = None,
        router_init_std: float = 1e-12,
        generator: torch.Generator | None = None,
    ) -> TopKMoELinear:
        """Upcycle a dense linear: the layer computes ``linear(x)`` (float32: to rounding) until trained.

        Every expert is ``(M / k) * W`` (and ``(M / k) * b``). The router gets random weights of std
        ``router_init_std``, so small that every logit is below 1e-8 for any realistic input: the float32 softmax
        then rounds to exactly ``1 / M`` for every expert and the output is ``k * (1 / M) * (M / k) W x = W x``,
        while the argmax still sees distinct, random logits and spreads the tokens over all experts. Symmetry is
        thus broken from the first step (each expert sees different tokens, so the experts and the router rows
        get different gradients) without changing the function at conversion. An all-zero router would also be
        exact, but its rows would stay identical forever: experts that never win a token get identical
        gradients. In float64 the deviation is of the order of the logits (about 1e-10), not zero.

        ``bias`` defaults to whether ``linear`` has one; without one the expert biases start at zero.
        """
        bias = linear.bias is not None if bias is None else bias
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=bias,
            device=weight.device,
            dtype=weight.dtype,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
        )
        scale = num_experts / top_k
        with torch.no_grad():
            layer.weight.copy_((weight * scale).unsqueeze(0).expand_as(layer.weight))
            if layer.bias is not None:
                if linear.bias is None:
                    layer.bias.zero_()
                else:
                    layer.bias.copy_((linear.bias * scale).unsqueeze(0).expand_as(layer.bias))
            # The noise must survive the router's dtype: float16 flushes 1e-12 to zero (every token would go to
            # expert 0, for ever), so it is raised to 64 of that dtype's smallest subnormals (about 4e-6); the
            # logits stay far below float16's resolution, so the upcycled layer still computes the dense one.
            tiny = torch.finfo(layer.router.weight.dtype).smallest_normal * torch.finfo(layer.router.weight.dtype).eps
            std = max(router_init_std, 64 * tiny)
            noise = torch.randn(layer.router.weight.shape, generator=generator, dtype=torch.float32)
            layer.router.weight.copy_(noise * std)
        return layer

    def extra_repr(self) -> str:
        cap = "" if self.capacity_factor is None else f", capacity_factor={self.capacity_factor}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}{cap}"
        )

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(..., in)`` -> ``(..., out)``. ``token_mask`` (1 / True = a real token, 0 / False = padding; one
        entry per token, or ``(B, L)`` whose last ``N / B`` columns are this call's tokens, as an attention mask with
        a cache) leaves padding out of the capacity: a pad neither takes an expert's slot nor loses its own. Without
        it, the mask :class:`padding_mask` set applies."""
        if x.shape[-1] != self.in_features:
            raise ParameterNetError(
                f"{type(self).__name__} expects inputs (..., {self.in_features}), got shape {tuple(x.shape)}."
            )
        flat = x.reshape(-1, self.in_features)  # (N, in)
        real = None
        if self.capacity_factor is not None:
            real = _real_tokens(token_mask if token_mask is not None else self.token_mask, flat.shape[0])
        if transforms_active():
            return self._forward_dense(flat, real).view(*x.shape[:-1], self.out_features)
        n, k, m = flat.shape[0], self.top_k, self.num_experts
        logits = self.router(flat)  # (N, M)
        _, top_p, top_e = route(logits, k)
        # Assignment a = j * N + t is token t's j-th choice: sorting by expert (stably) keeps first choices ahead
        # of second choices and earlier tokens ahead of later ones, which is the capacity priority.
        expert = top_e.t().reshape(-1)  # (k*N,)
        order = torch.argsort(expert, stable=True)  # (k*N,) assignments grouped by expert
        counts = expert_counts(expert, m)  # (M,)
        scale = top_p.t().reshape(-1).index_select(0, order)  # (k*N,) each sorted assignment's probability
        if self.capacity_factor is not None:
            # Every assignment is computed; one past its expert's capacity is scaled by zero, which drops it with
            # no host read (the number kept would be one) and no data-dependent shape.
            start = counts.cumsum(0) - counts
            first = start[expert.index_select(0, order)]  # where each sorted assignment's expert block starts
            if real is None:
                capacity = math.ceil(self.capacity_factor * n * k / m)
                rank = torch.arange(order.numel(), device=order.device) - first
                scale = torch.where(rank < capacity, scale, torch.zeros_like(scale))
            else:  # only real tokens count, and only real tokens can be dropped
                taken = real.repeat(k).index_select(0, order)  # assignment a is token a % N's
                before = taken.long().cumsum(0) - taken.long()
                rank = before - before.index_select(0, first)  # real assignments of its expert ahead of it
                capacity = torch.ceil(self.capacity_factor * taken.sum() / m)
                scale = torch.where((rank < capacity) | ~taken, scale, torch.zeros_like(scale))
        if k == 1:  # every token exactly once: sorting is a permutation of the rows
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(n, device=order.device)
            xs = _PermuteRows.apply(flat, order, inverse)
        else:
            token = order % n  # (k*N,) the token of each assignment
            xs = flat.index_select(0, token)
        y = expert_matmul(xs, self.weight, counts)  # (k*N, out), grouped by expert
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=y.shape[0])  # autocast's dtype
        y = y * scale.to(y.dtype)[:, None]
        if k == 1:
            out = _PermuteRows.apply(y, inverse, order)
        else:
            out = y.new_zeros(n, self.out_features).index_add_(0, token, y)
        return out.view(*x.shape[:-1], self.out_features)

    def _forward_dense(self, flat: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, in) -> (N, out)``: every token through every expert, ``sum_e gate_te (W_e x_t + b_e)`` with the gate
        ``p_te`` for a chosen expert within its capacity and 0 otherwise. The same function as :meth:`forward`'s
        dispatch, with no host read, no data-dependent shape and no custom autograd function: what ``torch.func``
        transforms take (``vmap`` over samples, ``grad``, ``jvp``)."""
        n, k, m = flat.shape[0], self.top_k, self.num_experts
        _, top_p, top_e = route(self.router(flat), k)
        # Assignment (j, t): token t's j-th choice, one-hot over the experts; (j, t) in that order is the priority.
        chosen = (top_e.t().unsqueeze(-1) == torch.arange(m, device=flat.device)).to(top_p.dtype)  # (k, N, M)
        gate = top_p.t().unsqueeze(-1) * chosen  # (k, N, M)
        if self.capacity_factor is not None:
            counted = chosen if real is None else chosen * real.view(1, n, 1).to(chosen.dtype)
            ahead = counted.reshape(k * n, m).cumsum(0).reshape(k, n, m) - counted  # that expert's, ahead of it
            if real is None:
                gate = torch.where(ahead < math.ceil(self.capacity_factor * n * k / m), gate, torch.zeros_like(gate))
            else:
                capacity = torch.ceil(self.capacity_factor * real.sum() * k / m)
                gate = torch.where((ahead < capacity) | ~real.view(1, n, 1), gate, torch.zeros_like(gate))
        gate = gate.sum(0)  # (N, M): a token chooses an expert at most once
        weight = self.weight
        if torch.is_autocast_enabled(flat.device.type):  # as expert_matmul casts
            dtype = torch.get_autocast_dtype(flat.device.type)
            flat, weight = flat.to(dtype), weight.to(dtype)
        y = torch.matmul(flat.unsqueeze(0), weight.transpose(1, 2))  # (M, N, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).unsqueeze(1)
        return (y * gate.t().to(y.dtype).unsqueeze(-1)).sum(0)
