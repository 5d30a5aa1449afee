"""ParameterNet for language models (paper section 5.4, Tables 7 and 8): a Hugging Face LLaMA whose FFN
projections can be top-k mixtures of experts.

Importing this package registers ``ParameterNetLlamaConfig`` (``model_type="parameternet_llama"``) with
``AutoConfig``, and the models with ``AutoModel``, ``AutoModelForCausalLM`` and
``AutoModelForSequenceClassification``, so a saved model loads with ``AutoModelForCausalLM.from_pretrained(path)``
(or, with a new classification head, ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=K)``)
like any other.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from parameternet.models.llama_moe.configuration import MOE_PROJECTIONS, ParameterNetLlamaConfig, llama_1b_config
from parameternet.models.llama_moe.modeling import (
    ParameterNetCausalLMOutput,
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaForSequenceClassification,
    ParameterNetLlamaModel,
    ParameterNetLlamaPreTrainedModel,
    ParameterNetSequenceClassifierOutput,
    router_losses,
)

__all__ = [
    "MOE_PROJECTIONS",
    "ParameterNetCausalLMOutput",
    "ParameterNetLlamaConfig",
    "ParameterNetLlamaForCausalLM",
    "ParameterNetLlamaForSequenceClassification",
    "ParameterNetLlamaModel",
    "ParameterNetLlamaPreTrainedModel",
    "ParameterNetSequenceClassifierOutput",
    "llama_1b_config",
    "router_losses",
]

AutoConfig.register(ParameterNetLlamaConfig.model_type, ParameterNetLlamaConfig, exist_ok=True)
AutoModel.register(ParameterNetLlamaConfig, ParameterNetLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    ParameterNetLlamaConfig, ParameterNetLlamaForSequenceClassification, exist_ok=True
)
