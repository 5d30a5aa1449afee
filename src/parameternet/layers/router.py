"""Routers: the tiny networks that turn a pooled input into per-sample expert coefficients (paper section 3.2).

Two are offered. ``linear-sigmoid`` is what the authors' release uses and what the paper's parameter counts
imply: ``sigmoid(Linear(C_in, M))``, so coefficients are independent gates that need not sum to one.
``mlp-softmax`` is what the paper's text describes: a two-layer MLP followed by a softmax with a temperature.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from parameternet.errors import ParameterNetError

__all__ = ["ROUTERS", "LinearSigmoidRouter", "MlpSoftmaxRouter", "create_router", "router_precision"]


class _Precision:
    """What ``with router_precision(x) as p`` gives: ``p.active`` (autocast was on, and is off inside) and
    ``p.cast(t)``, ``t`` in the router's compute dtype (float32 when active, else ``t`` itself)."""

    __slots__ = ("active",)

    def __init__(self, active: bool):
        self.active = active

    def cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not self.active or t.dtype == torch.float64:
            return t
        return t.float()

    def __enter__(self) -> _Precision:
        return self

    def __exit__(self, *exc) -> None:
        return None


_AS_IS = _Precision(False)


@contextlib.contextmanager
def _autocast_off(device: str):
    # A ``with torch.autocast`` statement in a generator: what dynamo traces (``torch.compile(fullgraph=True)``
    # refuses an autocast object entered by hand, ``setattr() on unsupported type``).
    with torch.autocast(device, enabled=False):
        yield _Precision(True)


def router_precision(x: torch.Tensor):
    """``with router_precision(x) as p:`` inside, autocast off on the input's device, and the input cast to float32
    when autocast was on there.

    Routers decide which experts a sample (or token) gets; computed in bf16 / fp16 their logits round, near-ties
    flip and exact ties go to the first expert. As Switch Transformer's "selective precision", under
    ``torch.autocast`` every router runs in float32 (its weights are float32 unless the model itself was cast);
    without autocast it runs in its own dtype. ``p.cast(t)`` gives a tensor in the router's compute dtype,
    ``p.active`` says whether autocast was on. Traceable by ``torch.compile(fullgraph=True)``, ``torch.export``,
    ``torch.jit.trace`` and ``torch.fx`` (a Proxy holds no device: a symbolic graph records the router's own ops)."""
    device = x.device.type if isinstance(x, torch.Tensor) else None
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return _autocast_off(device)
    return _AS_IS


class LinearSigmoidRouter(nn.Module):
    """``alpha = sigmoid(W p + b)`` on the pooled input ``p`` of shape ``(B, C)``; returns ``(B, M)``."""

    def __init__(self, in_features: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.fc = nn.Linear(in_features, num_experts, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        with router_precision(pooled) as p:
            return torch.sigmoid(F.linear(p.cast(pooled), p.cast(self.fc.weight), p.cast(self.fc.bias)))


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
        with router_precision(pooled) as p:
            h = self.act(F.linear(p.cast(pooled), p.cast(self.fc1.weight), p.cast(self.fc1.bias)))
            logits = F.linear(h, p.cast(self.fc2.weight), p.cast(self.fc2.bias))
            return torch.softmax(logits / self.temperature, dim=-1)

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
