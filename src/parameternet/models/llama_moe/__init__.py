"""ParameterNet for language models (paper section 5.4, Tables 7 and 8): a Hugging Face LLaMA whose FFN
projections can be top-k mixtures of experts.

Importing this package registers ``ParameterNetLlamaConfig`` (``model_type="parameternet_llama"``) with
``AutoConfig``, and the models with ``AutoModel`` and ``AutoModelForCausalLM``, so a saved model loads with
``AutoModelForCausalLM.from_pretrained(path)`` like any other.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from parameternet.models.llama_moe.configuration import MOE_PROJECTIONS, ParameterNetLlamaConfig, llama_1b_config
from parameternet.models.llama_moe.modeling import (
    ParameterNetCausalLMOutput,
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaModel,
    ParameterNetLlamaPreTrainedModel,
    router_losses,
)

__all__ = [
    "MOE_PROJECTIONS",
    "ParameterNetCausalLMOutput",
    "ParameterNetLlamaConfig",
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaPreTrainedModel",
    "llama_1b_config",
    "router_losses",
]

AutoConfig.register(ParameterNetLlamaConfig.model_type, ParameterNetLlamaConfig, exist_ok=True)
AutoModel.register(ParameterNetLlamaConfig, ParameterNetLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, exist_ok=True)
