"""Routing diagnostics: how much a trained dynamic layer's kernel really changes from one input to the next.

A dynamic layer (paper section 3.2) computes ``W(x) = sum_i alpha_i(x) W_i``. If the router gives nearly the same
coefficients to every input, the M experts act as one fixed kernel and the extra parameters buy nothing that a
static layer of the same size could not. Two numbers per layer, over a set of inputs ``x_1 .. x_N``:

- ``coef_std``: the standard deviation of each coefficient ``alpha_i`` across the inputs, averaged over experts;
- ``kernel_dist``: ``mean_n ||W(x_n) - W_bar|| / ||W_bar||`` with ``W_bar = mean_n W(x_n)`` (Frobenius norms): the
  relative distance of the per-input kernel from the mean kernel; 0 for a static layer.

Both come from the coefficients alone: with ``G = W W^T`` the experts' ``(M, M)`` Gram matrix,
``||W(x) - W_bar||^2 = (alpha(x) - alpha_bar) G (alpha(x) - alpha_bar)^T``, so no per-input kernel is built.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from parameternet.layers import DynamicConv2d, DynamicLinear
from parameternet.toolkit import eval_mode

__all__ = ["routing_stats", "summarize_routing"]


@torch.no_grad()
def routing_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
    """Per dynamic layer of ``model``: ``{"layer", "experts", "coef_mean", "coef_std", "kernel_dist"}``.

    Args:
        model: any module holding :class:`DynamicConv2d` / :class:`DynamicLinear` layers; run in eval mode
            (its train/eval flags are restored afterwards).
        batches: model inputs, each a tensor whose first dimension is the batch.

    Returns one dict per dynamic layer in module order (an empty list for a model without one); ``coef_mean`` is
    the mean coefficient over inputs and experts.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (DynamicConv2d, DynamicLinear))}
    coefs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        layer.router.register_forward_hook(lambda _m, _inp, out, name=name: coefs[name].append(out.detach().float()))
        for name, layer in layers.items()
    ]
    try:
        with eval_mode(model):
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name, layer in layers.items():
        if not coefs[name]:
            continue
        alpha = torch.cat(coefs[name]).double()  # (N, M)
        bank = layer.weight.detach().double().flatten(1)  # (M, K)
        gram = bank @ bank.T  # (M, M)
        mean = alpha.mean(0)  # (M,)
        centred = alpha - mean
        dist_sq = ((centred @ gram) * centred).sum(1).clamp_min(0)  # (N,) ||W(x) - W_bar||^2
        norm = (mean @ gram @ mean).clamp_min(1e-30).sqrt()
        out.append(
            {
                "layer": name,
                "experts": int(layer.num_experts),
                "coef_mean": round(float(mean.mean()), 6),
                "coef_std": round(float(alpha.std(0, unbiased=False).mean()), 6),
                "kernel_dist": round(float(dist_sq.sqrt().mean() / norm), 6),
            }
        )
    return out


def summarize_routing(stats: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over layers: ``{"route_coef_std", "route_kernel_dist"}``, or ``{}`` for no layers.

    The median of an even number of layers is the mean of the two middle values (:func:`statistics.median`); every
    report of the routing diagnostics summarises a run with this function, so the kernel distance of a run is the
    same number wherever it is shown.
    """
    if not stats:
        return {}

    def median(key: str) -> float:
        return round(statistics.median(float(s[key]) for s in stats), 6)

    return {"route_coef_std": median("coef_std"), "route_kernel_dist": median("kernel_dist")}
