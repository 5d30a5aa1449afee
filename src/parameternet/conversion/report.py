"""The report of :func:`parameternet.parameterize`: what was converted, what stayed static and why, parameters and
MACs before and after, and the recipe that :func:`parameternet.load` rebuilds the architecture from."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ParameterizeReport"]

# Why a layer stays static (the part before ":" is the kind the report counts).
REASON_CLASSIFIER = "classifier"
REASON_ONE_POSITION = "one position per sample"
REASON_GATE_NAME = "squeeze-excite / gate name"
REASON_NOT_INCLUDED = "not included"
REASON_LINEAR_REPCONV = "repconv converts convolutions only"
REASON_BYPASSED = "bypassed"
REASON_TIED = "weight tied"
REASON_BATCH = "batch dimension"
REASON_HEAD = "output head"
REASON_POSITIONS = "positions kept apart"


@dataclass
class ParameterizeReport:
    """What :func:`parameterize` did. ``static`` maps every convertible-looking layer left alone to the reason."""

    method: str
    num_experts: int
    init: str
    router: str
    router_temperature: float
    router_hidden: int | None
    include: list[str]
    exclude: list[str]
    converted: list[str]
    static: dict[str, str]
    rule: str
    params_before: int
    params_after: int
    converted_params_before: int
    converted_params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    input_shape: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)  # recipes of earlier conversions of this model
    batch_dims: dict[str, int] = field(default_factory=dict)  # converted linears whose batch is not dimension 0
    # converted linears that route every position on its own (a top-1 mixture of experts, TopKMoELinear), since
    # the model keeps positions apart (causal, masked or position-wise); ``positions`` says how the probe found it
    token_routed: list[str] = field(default_factory=list)
    positions: str | None = None

    def recipe(self) -> dict[str, Any]:
        """What :func:`load` needs to rebuild the architecture on the same base model."""
        return dict(
            method=self.method,
            num_experts=self.num_experts,
            router=self.router,
            router_temperature=self.router_temperature,
            router_hidden=self.router_hidden,
            include=self.include,
            exclude=self.exclude,
            modules=self.converted,
            batch_dims=self.batch_dims,
            token_routed=self.token_routed,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kinds = "dynamic layers" if self.method == "dynamic" else "RepConv layers"
        lines = [
            f"parameterize: method={self.method}, experts={self.num_experts}, init={self.init}"
            + (f", router={self.router}" if self.method == "dynamic" else ""),
            f"converted {len(self.converted)} layers to {kinds}; static layers are chosen by {self.rule}",
        ]
        if self.static:
            reasons = Counter(_reason_kind(r) for r in self.static.values())
            lines.append(
                f"left static {len(self.static)}: " + "; ".join(f"{r}: {n}" for r, n in sorted(reasons.items()))
            )
        growth = self.converted_params_after / max(self.converted_params_before, 1)
        lines.append(
            f"params    {_fmt(self.params_before)} -> {_fmt(self.params_after)}"
            f"  (converted layers {_fmt(self.converted_params_before)} -> {_fmt(self.converted_params_after)},"
            f" x{growth:.2f})"
        )
        if self.macs_before is not None and self.macs_after is not None:
            shape = "x".join(str(s) for s in self.input_shape or ())
            lines.append(f"MACs      {_fmt(self.macs_before)} -> {_fmt(self.macs_after)}  (input {shape})")
        else:
            lines.append("MACs      not counted")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0].split(" '", 1)[0]


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e9 else f"{n / 1e6:.3f}M"
