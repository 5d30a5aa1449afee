"""Expert banks: the stacked weights of a dynamic layer, their initialisation and their per-sample mixing.

A bank holds M experts stacked on a leading dimension, ``(M, *weight_shape)``. Mixing is one matmul,
``alpha (B, M) @ bank (M, numel)``, which also makes the paper's FLOPs convention count it (M * numel MACs per
sample, section 3.2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from parameternet.errors import ParameterNetError

__all__ = ["check_num_experts", "init_experts_", "mix_experts"]


def check_num_experts(num_experts: int) -> int:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ParameterNetError(f"num_experts must be an integer >= 1, got {num_experts!r}.")
    return num_experts


def init_experts_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Initialise every expert the way ``nn.Conv2d`` / ``nn.Linear`` initialise their single weight."""
    fan_in = weight[0, 0].numel()
    with torch.no_grad():
        for expert in weight:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if bias is not None:
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound)


def mix_experts(alpha: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``sum_i alpha[b, i] * bank[i]`` for every sample: ``(B, M) x (M, *S) -> (B, *S)``."""
    return (alpha @ bank.flatten(1)).view(alpha.shape[0], *bank.shape[1:])
