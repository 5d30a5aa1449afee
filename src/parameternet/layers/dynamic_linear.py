"""Dynamic linear layer: M expert matrices mixed per sample by a router (ParameterNet, sec. 3.2 and Table 5).

For an input ``(B, ..., C)`` one sample gets one mixture, as in the dynamic conv: the router sees the mean over
all dimensions but the batch and the channels, and every token of sample ``b`` goes through
``sum_i alpha_bi W_i``.

In eager PyTorch one sample is one ``F.linear`` with the mixed matrix, a batch a per-sample matmul in chunks whose
mixed matrices are rebuilt in backward (:func:`~parameternet.layers.kernels.per_sample_matmul`). Traced, compiled or
exported, it is the batched matmul of mixed matrices, which holds no batch size in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers.experts import check_num_experts, init_experts_
from parameternet.layers.kernels import per_sample_matmul, route_mean
from parameternet.layers.router import create_router

__all__ = ["DynamicLinear"]


class DynamicLinear(nn.Module):
    """A drop-in ``nn.Linear`` with ``num_experts`` matrices mixed per sample.

    ``weight`` is ``(M, out, in)`` and ``bias`` ``(M, out)``; router options as in :class:`DynamicConv2d`.
    ``batch_dim`` (default 0) is the input dimension that holds the samples: 1 for a sequence-first
    ``(T, B, C)`` input, as in ``nn.TransformerEncoder(batch_first=False)``. Input ``(..., in)`` of any float dtype
    (or under ``torch.autocast``), output ``(..., out)``; a wrong last dimension raises ``ParameterNetError``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_experts: int = 4,
        router: str = "linear-sigmoid",
        router_temperature: float = 1.0,
        router_hidden: int | None = None,
        batch_dim: int = 0,
    ):
        super().__init__()
        if not isinstance(batch_dim, int) or isinstance(batch_dim, bool) or batch_dim < 0:
            raise ParameterNetError(f"batch_dim must be an integer >= 0, got {batch_dim!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = check_num_experts(num_experts)
        self.batch_dim = batch_dim
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **kw)) if bias else None
        self.router = create_router(
            router, in_features, num_experts, temperature=router_temperature, hidden_features=router_hidden, **kw
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_experts_(self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}" + (f", batch_dim={self.batch_dim}" if self.batch_dim else "")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is not torch.Tensor and isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing
            return self._batch_first(self._forward_plain, x)
        if x.dim() < 2 + self.batch_dim or x.shape[-1] != self.in_features:
            raise ParameterNetError(
                f"{type(self).__name__} expects an input (B, ..., {self.in_features}) with the batch in dimension "
                f"{self.batch_dim}, got shape {tuple(x.shape)}."
            )
        if torch.compiler.is_compiling() or torch.jit.is_tracing():  # ONNX export sets one of them
            return self._batch_first(self._forward_plain, x)
        return self._batch_first(self._forward_eager, x)

    def _batch_first(self, forward, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_dim:
            return forward(x)
        return forward(x.movedim(self.batch_dim, 0)).movedim(0, self.batch_dim)

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # no sample or no token: an empty output, as nn.Linear's (no mean over nothing)
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        B = x.shape[0]
        dims = tuple(range(1, x.dim() - 1))
        alpha = route_mean(self.router, x, dims)  # (B, M)
        bias = None if self.bias is None else alpha @ self.bias  # (B, O)
        if B == 1:
            weight = (alpha @ self.weight.view(self.num_experts, -1)).view(self.out_features, self.in_features)
            return F.linear(x, weight, None if bias is None else bias[0])
        y = per_sample_matmul(x.reshape(B, -1, self.in_features), alpha, self.weight, bias, channels_first=False)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        # Sizes are read from the input (never Python ints of it), so traces and fx graphs hold no batch size.
        xs = x.reshape(x.shape[0], -1, self.in_features)  # (B, T, I); T = 1 for a 2-d input
        alpha = self.router(xs.mean(1))  # (B, M)
        M, n_out, n_in = self.num_experts, self.out_features, self.in_features
        wt = (alpha @ self.weight.view(M, n_out * n_in)).view(-1, n_out, n_in).transpose(1, 2)  # (B, I, O)
        y = torch.bmm(xs, wt)
        if self.bias is not None:
            # A separate add, not baddbmm: torchprofile's baddbmm handler refuses a bias that broadcasts over T.
            y = y + (alpha @ self.bias).unsqueeze(1)
        return y.reshape(x.shape[:-1] + (self.out_features,))
