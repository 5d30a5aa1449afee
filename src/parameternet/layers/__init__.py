"""Dynamic layers: the building blocks of ParameterNet. This package imports nothing else from parameternet
but its error type, so it can be read and reused on its own."""

from torch import nn

from parameternet.layers.dynamic_conv import DynamicConv2d
from parameternet.layers.dynamic_linear import DynamicLinear
from parameternet.layers.experts import check_num_experts, init_experts_, mix_experts
from parameternet.layers.moe import MoERouter, TopKMoELinear, load_balancing_loss, router_z_loss
from parameternet.layers.repconv import RepConv2d
from parameternet.layers.router import ROUTERS, LinearSigmoidRouter, MlpSoftmaxRouter, create_router

__all__ = [
    "ROUTERS",
    "DynamicConv2d",
    "DynamicLinear",
    "LinearSigmoidRouter",
    "MlpSoftmaxRouter",
    "MoERouter",
    "RepConv2d",
    "TopKMoELinear",
    "check_num_experts",
    "create_router",
    "init_experts_",
    "is_parameternet_layer",
    "load_balancing_loss",
    "mix_experts",
    "router_z_loss",
    "set_implementation",
]


def is_parameternet_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of this package's layers (a subclass defined elsewhere too). Such layers are
    opaque to model rewriting (``parameterize``, ``deploy``): their routers and branches are never converted or
    folded on their own."""
    return isinstance(module, (DynamicConv2d, DynamicLinear, RepConv2d)) or type(module).__module__.startswith(
        "parameternet.layers"
    )


def set_implementation(model: nn.Module, implementation: str = "auto") -> int:
    """Set how every :class:`DynamicConv2d` in ``model`` computes its formula: ``"auto"`` (the functional core's
    table, chosen per runtime, device and geometry by measurement) or a name from
    :data:`parameternet.layers.functional.NAMES` (``"grouped"``, ``"bmm"``, ``"triton"``, ...), which each layer then
    uses wherever it computes that layer (an inapplicable name raises ``ParameterNetError`` at the layer's forward).
    Returns how many layers were set; raises ``ParameterNetError`` for an unknown name."""
    from parameternet.errors import ParameterNetError
    from parameternet.layers.functional import NAMES

    if implementation != "auto" and implementation not in NAMES:
        raise ParameterNetError(
            f"unknown dynamic-conv implementation {implementation!r}; choose 'auto' or one of {', '.join(NAMES)}."
        )
    layers = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    for layer in layers:
        layer.implementation = implementation
    return len(layers)
