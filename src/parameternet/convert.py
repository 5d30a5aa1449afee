"""``parameternet convert``: build a model from a timm name or a checkpoint, :func:`parameternet.parameterize` it
and :func:`parameternet.save` it, naming the registered timm model that loads the file when there is one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from parameternet.conversion import ParameterizeReport, parameterize
from parameternet.errors import ParameterNetError
from parameternet.io import load_source_model, save
from parameternet.layers import check_num_experts

__all__ = ["convert", "timm_twin"]


def timm_twin(model: nn.Module, model_name: str, model_kwargs: dict[str, Any] | None = None) -> str | None:
    """The registered ParameterNet whose weights have exactly ``model``'s names and shapes, if the conversion of
    ``model_name`` produced one (``ghostnet_300m`` -> ``parameternet_300m``), so timm can load the saved file."""
    import timm

    import parameternet.models  # noqa: F401  (registers the paper's models in timm)

    report = getattr(model, "parameterize_report", None)
    if not isinstance(report, ParameterizeReport) or report.method != "dynamic" or report.history:
        return None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kwargs = dict(model_kwargs or {}, num_experts=report.num_experts, router=report.router)
    kwargs.update(router_temperature=report.router_temperature, router_hidden=report.router_hidden)
    for twin in dict.fromkeys([model_name.replace("ghostnet", "parameternet", 1), f"parameternet_{model_name}"]):
        if twin == model_name or not timm.is_model(twin):
            continue
        try:
            candidate = timm.create_model(twin, pretrained=False, **kwargs)
        except (TypeError, ValueError):
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return twin
    return None


def convert(
    source: str,
    num_experts: int,
    output: str | Path,
    *,
    method: str = "dynamic",
    init: str = "upcycle",
    router: str = "linear-sigmoid",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    arch: str | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
) -> tuple[nn.Module, str | None]:
    """Build ``source`` (a timm name or checkpoint), :func:`parameterize` it and :func:`save` it to ``output``.

    Returns the converted model (its report in ``parameterize_report``) and, when a registered timm model has
    exactly its layout, the ``timm.create_model(...)`` call that loads ``output`` through ``pretrained_cfg_overlay``.
    """
    if Path(output).suffix != ".safetensors":
        raise ParameterNetError(f"the output must be a .safetensors file, got {str(output)!r}.")
    check_num_experts(num_experts)
    model, name, kwargs = load_source_model(source, arch=arch, pretrained=pretrained)
    example = None
    if img_size is not None:
        if img_size < 1:
            raise ParameterNetError(f"img_size must be a positive integer, got {img_size}.")
        example = (1, int(getattr(model, "in_chans", 3)), img_size, img_size)
    model = parameterize(
        model,
        num_experts,
        method=method,
        init=init,
        router=router,
        include=include,
        exclude=exclude,
        example_input=example,
    )
    save(model, output, model_name=name, model_kwargs=kwargs)
    twin = timm_twin(model, name, kwargs)
    if twin is None:
        return model, None
    from timm.models import get_pretrained_cfg_value

    args = [repr(twin), "pretrained=True"]
    overlay = f"file={str(output)!r}"
    if model.parameterize_report.num_experts != 4:
        args.append(f"num_experts={model.parameterize_report.num_experts}")
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes != get_pretrained_cfg_value(twin, "num_classes"):
        args.append(f"num_classes={num_classes}")
        overlay += f", num_classes={num_classes}"  # else timm drops a head whose size differs from the cfg's
    return model, f"timm.create_model({', '.join(args)}, pretrained_cfg_overlay=dict({overlay}))"
