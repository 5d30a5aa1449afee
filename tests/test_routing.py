"""Routing diagnostics (`parameternet.profiling.routing`): zero for a layer that mixes one fixed kernel, and equal to
the distance computed from explicitly built per-input kernels otherwise."""

import torch
from torch import nn

from parameternet.layers import DynamicConv2d, DynamicLinear
from parameternet.profiling.routing import routing_stats, summarize_routing


def test_kernel_distance_matches_explicit_per_input_kernels():
    torch.manual_seed(0)
    layer = DynamicConv2d(3, 5, 3, padding=1, num_experts=4)
    batches = [torch.randn(6, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    (stats,) = routing_stats(nn.Sequential(layer), batches)
    with torch.no_grad():
        alpha = torch.cat([layer.router(x.mean((2, 3))) for x in batches]).double()
        kernels = alpha @ layer.weight.double().flatten(1)  # (N, K)
        mean = kernels.mean(0)
        dist = ((kernels - mean).norm(dim=1) / mean.norm()).mean()
    assert abs(stats["kernel_dist"] - dist.item()) < 1e-5
    assert abs(stats["coef_std"] - alpha.std(0, unbiased=False).mean().item()) < 1e-5
    assert stats["layer"] == "0" and stats["experts"] == 4


def test_a_constant_router_or_identical_experts_mean_a_static_layer():
    torch.manual_seed(0)
    conv = DynamicConv2d(3, 5, 3, num_experts=4)
    nn.init.zeros_(conv.router.fc.weight)  # every input gets the same coefficients
    # every expert the same matrix, mixed by coefficients that sum to one (a sigmoid router could still rescale it)
    lin = DynamicLinear(6, 2, num_experts=3, router="mlp-softmax")
    with torch.no_grad():
        lin.weight.copy_(lin.weight[:1].expand_as(lin.weight))
    model = nn.ModuleDict({"conv": conv, "lin": lin}).train()
    stats = routing_stats(conv, [torch.randn(5, 3, 6, 6)]) + routing_stats(lin, [torch.randn(5, 6)])
    assert [s["kernel_dist"] for s in stats] == [0.0, 0.0]
    assert stats[0]["coef_std"] == 0.0 and stats[1]["coef_std"] > 0
    assert model.training and conv.training  # flags restored
    assert summarize_routing(stats)["route_kernel_dist"] == 0.0 and summarize_routing([]) == {}


def test_summary_over_an_even_number_of_layers_is_the_mean_of_the_middle_two():
    stats = [{"coef_std": c, "kernel_dist": d} for c, d in ((0.1, 0.01), (0.4, 0.04), (0.2, 0.02), (0.3, 0.03))]
    assert summarize_routing(stats) == {"route_coef_std": 0.25, "route_kernel_dist": 0.025}
    assert summarize_routing(stats[:3])["route_kernel_dist"] == 0.02
