"""Dynamic layers: the building blocks of ParameterNet. This package imports nothing else from parameternet
but its error type, so it can be read and reused on its own."""

from parameternet.layers.dynamic_conv import DynamicConv2d
from parameternet.layers.dynamic_linear import DynamicLinear
from parameternet.layers.experts import check_num_experts, init_experts_, mix_experts
from parameternet.layers.repconv import RepConv2d
from parameternet.layers.router import ROUTERS, LinearSigmoidRouter, MlpSoftmaxRouter, create_router

__all__ = [
    "ROUTERS",
    "DynamicConv2d",
    "DynamicLinear",
    "LinearSigmoidRouter",
    "MlpSoftmaxRouter",
    "RepConv2d",
    "check_num_experts",
    "create_router",
    "init_experts_",
    "mix_experts",
]
