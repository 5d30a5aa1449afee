"""Routers: the tiny networks that turn a pooled input into per-sample expert coefficients (paper section 3.2).

Two are offered. ``linear-sigmoid`` is what the authors' release uses and what the paper's parameter counts
imply: ``sigmoid(Linear(C_in, M))``, so coefficients are independent gates that need not sum to one.
``mlp-softmax`` is what the paper's text describes: a two-layer MLP followed by a softmax with a temperature.
"""

from __future__ import annotations

import torch
from torch import nn

from parameternet.errors import ParameterNetError

__all__ = ["ROUTERS", "LinearSigmoidRouter", "MlpSoftmaxRouter", "create_router"]


class LinearSigmoidRouter(nn.Module):
    """``alpha = sigmoid(W p + b)`` on the pooled input ``p`` of shape ``(B, C)``; returns ``(B, M)``."""

    def __init__(self, in_features: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(in_features, num_experts, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(pooled))


class MlpSoftmaxRouter(nn.Module):
    """``alpha = softmax(fc2(relu(fc1(p))) / temperature)``; the hidden width defaults to ``max(8, C // 4)``."""

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        hidden_features: int | None = None,
        temperature: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if temperature <= 0:
            raise ParameterNetError(f"router temperature must be positive, got {temperature}.")
        hidden_features = hidden_features or max(8, in_features // 4)
        self.temperature = float(temperature)
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_features, num_experts, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(self.act(self.fc1(pooled))) / self.temperature, dim=-1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


ROUTERS = ("linear-sigmoid", "mlp-softmax")


def create_router(
    name: str,
    in_features: int,
    num_experts: int,
    *,
    temperature: float = 1.0,
    hidden_features: int | None = None,
    device=None,
    dtype=None,
) -> nn.Module:
    """Build the router called ``name`` (one of :data:`ROUTERS`)."""
    if name == "linear-sigmoid":
        return LinearSigmoidRouter(in_features, num_experts, device=device, dtype=dtype)
    if name == "mlp-softmax":
        return MlpSoftmaxRouter(in_features, num_experts, hidden_features, temperature, device=device, dtype=dtype)
    raise ParameterNetError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}.")
