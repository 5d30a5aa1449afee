"""Configuration of the ParameterNet LLaMA: LLaMA with top-k mixture-of-experts FFN projections (paper Table 7).

``ParameterNetLlamaConfig`` is a ``LlamaConfig`` plus the mixture-of-experts fields; it has its own
``model_type`` (``"parameternet_llama"``) so ``AutoConfig`` / ``AutoModelForCausalLM`` pick the right classes once
``parameternet.models.llama_moe`` is imported. :func:`llama_1b_config` is the paper's LLaMA-1B (Table 8).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from parameternet.errors import ParameterNetError

__all__ = ["MOE_PROJECTIONS", "ParameterNetLlamaConfig", "llama_1b_config"]

MOE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@strict
class ParameterNetLlamaConfig(LlamaConfig):
    r"""LLaMA whose FFN projections named in ``moe_projections`` are top-k mixtures of ``num_experts`` experts.

    Args (beyond ``LlamaConfig``):
        num_experts: experts per converted projection (the paper: 4 or 8).
        moe_projections: any subset of ``gate_proj``, ``up_proj``, ``down_proj`` (the paper converts one); empty
            gives plain LLaMA.
        num_experts_per_tok: experts per token, ``k`` (1 = Switch routing, the paper's).
        router_aux_loss_coef: weight of the Switch load-balancing loss in the training loss (0.01 as released).
        router_z_loss_coef: weight of the ST-MoE router z-loss (0 = off).
        capacity_factor: expert capacity in units of ``tokens * k / num_experts``; None drops no token (the paper).
        expert_bias: whether every expert has a bias. LLaMA's linears have none, so the default is False; the
            release's experts had one (``nn.Linear``), which is where the paper's parameter counts come from.
        output_router_logits: return the router logits of every converted projection by default.

    The losses are averaged over the converted projections, so the coefficients do not depend on the depth.
    """

    model_type = "parameternet_llama"
    # Tensor parallelism plan for the attention only: a sharded nn.Linear plan does not fit the expert banks.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }

    num_experts: int = 8
    moe_projections: list[str] | tuple[str, ...] | str = ("down_proj",)
    num_experts_per_tok: int = 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    expert_bias: bool = False
    output_router_logits: bool = False

    def __post_init__(self, **kwargs: Any):
        projections = [self.moe_projections] if isinstance(self.moe_projections, str) else self.moe_projections
        for name in projections:
            if name not in MOE_PROJECTIONS:
                raise ParameterNetError(
                    f"unknown projection {name!r} in moe_projections; choose from {', '.join(MOE_PROJECTIONS)}."
                )
        # One canonical order, so two configs naming the same projections compare and save alike.
        self.moe_projections = [name for name in MOE_PROJECTIONS if name in projections]
        if self.num_experts < 1:
            raise ParameterNetError(f"num_experts must be at least 1, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ParameterNetError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_experts={self.num_experts}; lower it or raise num_experts."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ParameterNetError(
                f"capacity_factor must be positive or None (no token dropped), got {self.capacity_factor}."
            )
        super().__post_init__(**kwargs)


def llama_1b_config(**overrides: Any) -> ParameterNetLlamaConfig:
    """The paper's LLaMA-1B (Table 8): hidden 2048, intermediate 8192 (the paper's "8191" is a typo), 16 heads,
    12 layers, vocabulary 32000, RMSNorm eps 1e-6, untied embeddings, 2048-token context."""
    base: dict[str, Any] = dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=16,
        num_hidden_layers=12,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return ParameterNetLlamaConfig(**{**base, **overrides})
