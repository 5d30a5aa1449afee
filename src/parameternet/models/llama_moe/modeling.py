"""ParameterNet LLaMA: transformers' LLaMA with top-k mixture-of-experts FFN projections (paper section 5.4, Table 7).

Everything but the converted projections is transformers' own LLaMA: the classes here subclass it and replace
``mlp.<name>`` by a :class:`~parameternet.layers.moe.TopKMoELinear` for every name in
``config.moe_projections``. Router logits reach the output through transformers' output capture (a forward hook
on every :class:`~parameternet.layers.moe.MoERouter`), never through module attributes; the causal-LM head turns
them into the Switch load-balancing loss and the router z-loss and adds both, weighted, to the training loss.

:meth:`ParameterNetLlamaForCausalLM.from_dense` upcycles a trained ``LlamaForCausalLM`` without changing its
logits (see :meth:`~parameternet.layers.moe.TopKMoELinear.from_linear`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
)
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder

from parameternet.errors import ParameterNetError
from parameternet.layers.moe import MoERouter, TopKMoELinear, load_balancing_loss, padding_mask, router_z_loss
from parameternet.models.llama_moe.configuration import ParameterNetLlamaConfig
from parameternet.toolkit import unwrap_model

__all__ = [
    "ParameterNetCausalLMOutput",
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaForSequenceClassification",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaPreTrainedModel",
    "ParameterNetSequenceClassifierOutput",
    "router_losses",
]


@dataclass
class ParameterNetCausalLMOutput(MoeCausalLMOutputWithPast):
    """Mixtral's output plus ``z_loss``. ``aux_loss`` and ``z_loss`` are unweighted; ``loss`` includes both,
    weighted by ``router_aux_loss_coef`` and ``router_z_loss_coef``."""

    z_loss: torch.Tensor | None = None


def router_losses(
    router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss), each averaged over the routers; padding (mask 0) is left out.

    Each router is balanced on its own: pooling the counts of all layers, as Mixtral does, would call two layers
    that favour different experts balanced.
    """
    mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        tokens = router_logits[0].shape[0] // attention_mask.shape[0]
        mask = attention_mask[:, -tokens:]  # with a cache the mask also covers the past tokens
    aux = torch.stack([load_balancing_loss(logits, top_k, mask) for logits in router_logits]).mean()
    z = torch.stack([router_z_loss(logits, mask) for logits in router_logits]).mean()
    return aux, z


def _convert_mlp(mlp: nn.Module, config: ParameterNetLlamaConfig) -> None:
    for name in config.moe_projections:
        dense: nn.Linear = getattr(mlp, name)
        moe = TopKMoELinear(
            dense.in_features,
            dense.out_features,
            bias=config.expert_bias,
            device=dense.weight.device,
            dtype=dense.weight.dtype,
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            capacity_factor=config.capacity_factor,
        )
        setattr(mlp, name, moe)


REMOTE_MODULE = "parameternet_llama"
AUTO_MAP = {
    "AutoConfig": f"{REMOTE_MODULE}.ParameterNetLlamaConfig",
    "AutoModel": f"{REMOTE_MODULE}.ParameterNetLlamaModel",
    "AutoModelForCausalLM": f"{REMOTE_MODULE}.ParameterNetLlamaForCausalLM",
    "AutoModelForSequenceClassification": f"{REMOTE_MODULE}.ParameterNetLlamaForSequenceClassification",
}
_REMOTE_CODE = f'''"""Lets transformers' Auto classes load this directory without `import parameternet`.

Written by parameternet's save_pretrained; the classes come from the installed package (pip install parameternet).
"""

from parameternet.models.llama_moe import (  # noqa: F401
    {", ".join(name.split(".")[1] for name in AUTO_MAP.values())},
)
'''


class ParameterNetLlamaPreTrainedModel(LlamaPreTrainedModel):
    config: ParameterNetLlamaConfig
    config_class = ParameterNetLlamaConfig
    # The dispatch sizes its blocks from the routing (data-dependent shapes): no full-graph compile.
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "router_logits": OutputRecorder(MoERouter, index=0),
        "hidden_states": LlamaDecoderLayer,
        "attentions": LlamaAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``, plus an ``auto_map`` in ``config.json`` and the small module it names
        (:data:`REMOTE_MODULE`), so that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
        loads the model in a program that never imported ``parameternet`` (the package must be installed), and
        without ``trust_remote_code`` transformers says that the directory needs it instead of "update
        Transformers"."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from parameternet.runs import atomic_write

            atomic_write(Path(save_directory) / f"{REMOTE_MODULE}.py", _REMOTE_CODE)

    def _routed_model(
        self, labels: torch.LongTensor | None, output_router_logits: bool | None, **inputs
    ) -> tuple[MoeModelOutputWithPast, bool, bool]:
        """``self.model(**inputs)`` with the router logits captured whenever the router losses are due: there are
        labels, the model is training or ``output_router_logits`` (default: the config's) is set. Returns the output,
        whether the logits were captured, and ``output_router_logits`` resolved."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        collect = bool(self.config.moe_projections) and (output_router_logits or labels is not None or self.training)
        return self.model(output_router_logits=collect, **inputs), collect, output_router_logits

    def _plus_router_losses(
        self, loss: torch.Tensor | None, aux_loss: torch.Tensor | None, z_loss: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The task ``loss`` (None without labels) plus the router losses weighted by the config's coefficients."""
        if loss is None or aux_loss is None:
            return loss
        return loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # nn.Linear (the routers too): normal(0, initializer_range)
        if isinstance(module, TopKMoELinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)


class ParameterNetLlamaModel(ParameterNetLlamaPreTrainedModel, LlamaModel):
    """``LlamaModel`` with the projections of ``config.moe_projections`` as mixtures of experts."""

    def __init__(self, config: ParameterNetLlamaConfig):
        LlamaModel.__init__(self, config)
        for layer in self.layers:
            _convert_mlp(layer.mlp, config)
        self.post_init()  # initialises the new modules only: the others are marked initialised

    def forward(self, *args, **kwargs) -> MoeModelOutputWithPast:
        # With a capacity, padding must not take experts' slots from real tokens: the MoE layers see the mask.
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = mask if self.config.capacity_factor is not None and isinstance(mask, torch.Tensor) else None
        with padding_mask(self, mask if mask is not None and mask.dim() == 2 else None):
            out = super().forward(*args, **kwargs)  # LLaMA's, with router logits captured when asked
        return MoeModelOutputWithPast(**out) if isinstance(out, dict) else out  # a tuple for return_dict=False


class ParameterNetLlamaForCausalLM(ParameterNetLlamaPreTrainedModel, LlamaForCausalLM):
    """``LlamaForCausalLM`` over :class:`ParameterNetLlamaModel`; the loss includes the router losses."""

    def __init__(self, config: ParameterNetLlamaConfig):
        ParameterNetLlamaPreTrainedModel.__init__(self, config)
        self.model = ParameterNetLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ParameterNetCausalLMOutput:
        """LLaMA's causal-LM forward. The router losses are computed whenever there are labels, the model is
        training or ``output_router_logits`` is set; ``router_logits`` are returned only in the last case."""
        config = self.config
        outputs, collect, output_router_logits = self._routed_model(
            labels,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)  # (B, T, vocab)

        aux_loss = z_loss = None
        if collect:
            aux_loss, z_loss = router_losses(outputs.router_logits, config.num_experts_per_tok, attention_mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs)
        loss = self._plus_router_losses(loss, aux_loss, z_loss)

        return ParameterNetCausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    @classmethod
    def from_dense(
        cls,
        model: LlamaForCausalLM,
        num_experts: int,
        moe_projections: list[str] | tuple[str, ...] | str = ("down_proj",),
        *,
        seed: int = 0,
        router_init_std: float = 1e-12,
        **config_overrides,
    ) -> ParameterNetLlamaForCausalLM:
        """Upcycle a dense ``LlamaForCausalLM`` (or a ParameterNet LLaMA without those projections converted).

        Every weight is copied; each converted projection becomes ``num_experts`` experts computing, at
        conversion, exactly the dense projection (float32: to rounding, about 1e-7 relative), and a router with
        random weights far below float32 softmax resolution, so tokens already spread over the experts and the
        experts diverge once trained (see :meth:`TopKMoELinear.from_linear`). ``config_overrides`` set the other
        mixture-of-experts fields (``num_experts_per_tok``, ``router_aux_loss_coef``, ``capacity_factor``, ...);
        ``expert_bias`` follows the dense model's ``mlp_bias`` unless given. ``seed`` fixes the router noise. A
        wrapped model (``torch.compile``'s output, DDP) is upcycled from the model inside it.

        Raises ParameterNetError for anything but a loaded LLaMA causal LM (a path, a string, another
        architecture) and for a model that already has experts.
        """
        model = unwrap_model(model) if isinstance(model, nn.Module) else model
        dense_config = getattr(model, "config", None) if isinstance(model, nn.Module) else None
        if dense_config is None:
            raise ParameterNetError(
                f"from_dense takes a loaded model, not {type(model).__name__} {str(model)[:80]!r}; load it first, e.g. "
                f"ParameterNetLlamaForCausalLM.from_dense(LlamaForCausalLM.from_pretrained(path), num_experts=8)"
            )
        if getattr(dense_config, "model_type", None) not in ("llama", "parameternet_llama"):
            raise ParameterNetError(
                f"from_dense needs a LLaMA causal LM, not a {type(model).__name__} (model_type "
                f"{getattr(dense_config, 'model_type', None)!r}); pass a LlamaForCausalLM or a dense ParameterNet LLaMA"
            )
        if getattr(dense_config, "moe_projections", None):
            raise ParameterNetError(
                f"from_dense needs a dense model, but this one already has experts on {dense_config.moe_projections}."
            )
        fields = dense_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(key, None)
        fields.update(
            num_experts=num_experts,
            moe_projections=moe_projections,
            expert_bias=config_overrides.pop("expert_bias", dense_config.mlp_bias),
        )
        fields.update(config_overrides)
        config = ParameterNetLlamaConfig(**fields)
        config._attn_implementation = dense_config._attn_implementation

        first = next(model.parameters())
        new = cls(config).to(device=first.device, dtype=first.dtype)
        # Everything but the converted projections has the same names and shapes.
        skip = tuple(f".mlp.{name}." for name in config.moe_projections)
        state = {k: v for k, v in model.state_dict().items() if not any(s in k for s in skip)}
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected:
            raise ParameterNetError(f"from_dense cannot place the dense weights {unexpected[:3]}; pass a LLaMA model.")

        generator = torch.Generator().manual_seed(seed)
        for dense_layer, layer in zip(model.model.layers, new.model.layers):
            for name in config.moe_projections:
                upcycled = TopKMoELinear.from_linear(
                    getattr(dense_layer.mlp, name),
                    num_experts=config.num_experts,
                    top_k=config.num_experts_per_tok,
                    capacity_factor=config.capacity_factor,
                    bias=config.expert_bias,
                    router_init_std=router_init_std,
                    generator=generator,
                )
                getattr(layer.mlp, name).load_state_dict(upcycled.state_dict())
        new.train(model.training)
        return new


@dataclass
class ParameterNetSequenceClassifierOutput(SequenceClassifierOutputWithPast):
    """LLaMA's sequence-classification output plus the router losses (unweighted; ``loss`` includes them weighted,
    as in :class:`ParameterNetCausalLMOutput`) and, when asked, the router logits."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


class ParameterNetLlamaForSequenceClassification(ParameterNetLlamaPreTrainedModel, LlamaForSequenceClassification):
    """``LlamaForSequenceClassification`` over :class:`ParameterNetLlamaModel`: the paper's fine-tuned classifier
    (Table 7's SST-2 column, sec. 5.4) on the mixture-of-experts LLaMA.

    transformers' head: ``score = Linear(hidden, num_labels, bias=False)`` on the hidden state of each sequence's
    last non-padding token (``config.pad_token_id``). The loss is transformers' (cross-entropy for single-label
    integer labels) plus the weighted router losses, computed over the non-padding tokens, exactly as the causal
    LM adds them. ``from_pretrained`` on a causal LM's ``model/`` directory keeps every transformer weight and
    initialises the new ``score`` head.
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ParameterNetSequenceClassifierOutput:
        """``input_ids`` ``(B, T)`` -> ``logits`` ``(B, num_labels)``; ``labels`` ``(B,)``. Router losses as in
        :meth:`ParameterNetLlamaForCausalLM.forward`."""
        config = self.config
        outputs, collect, output_router_logits = self._routed_model(
            labels,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch_size = logits.shape[0]
        pad = config.pad_token_id
        if pad is None and batch_size != 1:
            raise ParameterNetError(
                "the model's config has no pad_token_id, so a batch of several sequences cannot be pooled; "
                "set config.pad_token_id to the tokenizer's padding id"
            )
        if pad is None or input_ids is None:
            last = torch.full((batch_size,), -1, device=logits.device, dtype=torch.long)
        else:  # the rightmost token that is not padding (right or left padding)
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = logits[torch.arange(batch_size, device=logits.device), last]  # (B, num_labels)

        aux_loss = z_loss = None
        if collect:
            mask = attention_mask if attention_mask is not None else None
            if mask is None and input_ids is not None and pad is not None:
                mask = (input_ids != pad).long()
            aux_loss, z_loss = router_losses(outputs.router_logits, config.num_experts_per_tok, mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=config)
        loss = self._plus_router_losses(loss, aux_loss, z_loss)
        return ParameterNetSequenceClassifierOutput(
            loss=loss,
            logits=pooled,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_logits=outputs.router_logits if output_router_logits else None,
        )
