"""transformers' ``Trainer`` for ParameterNet's language models, with FSDP2 (paper section 5.4 at scale).

:class:`RouterLossTrainer` is ``transformers.Trainer`` with two things an MoE needs:

- the router losses weighted as the model weights them, whatever the number of processes and gradient-accumulation
  steps. With ``average_tokens_across_devices`` (the default) the Trainer multiplies the model's whole loss by the
  number of processes, to undo the averaging of gradients over processes for a next-token loss normalised by the
  global token count; the router losses the model adds are per-process means already, so they would weigh N times
  their ``router_aux_loss_coef`` on N processes, and once per accumulated micro-batch (transformers issue 48690).
  :meth:`RouterLossTrainer.compute_loss` takes the excess back out, so the loss optimised is the next-token loss
  plus ``router_aux_loss_coef`` times the mean load-balancing loss (plus the z-loss), as in one process;
- the router losses logged beside ``loss``: ``aux_loss`` and ``z_loss``, unweighted, means over the micro-batches
  since the last log and over the processes.

:data:`FSDP_CONFIG` is the ``fsdp_config`` that shards the model with FSDP2 per decoder layer and saves one
ordinary directory (``save_model`` gathers the weights). Use them as::

    args = TrainingArguments(out, fsdp=True, fsdp_config=FSDP_CONFIG, ...)
    RouterLossTrainer(model=model, args=args, train_dataset=token_windows(tokens, seq_len)).train()

and run the script with ``torchrun --nproc_per_node=N``. ``examples/trainer_fsdp.py`` is a whole one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Trainer

__all__ = ["FSDP_CONFIG", "RouterLossTrainer", "token_windows"]

# FSDP2 units: the decoder layers (the model's _no_split_modules); the experts are sharded like any parameter.
# FULL_STATE_DICT: save_model writes the gathered weights, which from_pretrained loads on any number of processes.
FSDP_CONFIG: dict[str, Any] = {
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "state_dict_type": "FULL_STATE_DICT",
}


class _Windows(torch.utils.data.Dataset):
    def __init__(self, tokens: np.ndarray, seq_len: int, count: int):
        self.tokens, self.seq_len, self.count = tokens, seq_len, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.tokens[i * self.seq_len : (i + 1) * self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def token_windows(tokens: np.ndarray, seq_len: int, limit: int | None = None) -> torch.utils.data.Dataset:
    """The non-overlapping ``seq_len`` windows of a token array (``TextData.tokens("train")``) as a dataset of
    ``{"input_ids": (seq_len,), "labels": (seq_len,)}`` (the model shifts the labels); the first ``limit`` only,
    when given."""
    count = len(tokens) // seq_len
    return _Windows(tokens, seq_len, count if limit is None else min(limit, count))


class RouterLossTrainer(Trainer):
    """``transformers.Trainer`` for a model whose loss includes router losses (``ParameterNetLlamaForCausalLM``,
    or any model whose output has ``aux_loss`` / ``z_loss`` and whose config has ``router_aux_loss_coef`` /
    ``router_z_loss_coef``): those losses keep their weight on any number of processes and accumulation steps, and
    are logged as ``aux_loss`` and ``z_loss`` (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._router_sums = torch.zeros(3, dtype=torch.float64)  # aux, z, micro-batches since the last log

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = getattr(outputs, "aux_loss", None)
        if aux is not None:
            config = self.accelerator.unwrap_model(model).config
            z = getattr(outputs, "z_loss", None)
            router = config.router_aux_loss_coef * aux
            if z is not None:
                router = router + getattr(config, "router_z_loss_coef", 0.0) * z
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None and self.compute_loss_func is None:
                # the Trainer scaled the model's loss by `scale` (token averaging across processes) and will not
                # divide it by the accumulation steps: the router term is to count once, over the steps
                scale = 1
                if self.args.average_tokens_across_devices:
                    n_gpu = self.args.n_gpu
                    scale = n_gpu if n_gpu > 1 else self.accelerator.num_processes // self.get_tp_size()
                loss = loss - (scale - 1 / self.current_gradient_accumulation_steps) * router
            if model.training:
                one = torch.ones((), dtype=torch.float64)
                z_value = z.detach().double().cpu() if z is not None else 0 * one
                self._router_sums += torch.stack([aux.detach().double().cpu(), z_value, one])
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """transformers' ``log``, with ``aux_loss`` and ``z_loss`` beside a training ``loss`` (every process calls
        it there, so the means are reduced over them)."""
        if "loss" in logs:
            sums = self._router_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            if sums[2] > 0:
                logs["aux_loss"] = round((sums[0] / sums[2]).item(), 6)
                logs["z_loss"] = round((sums[1] / sums[2]).item(), 6)
            self._router_sums.zero_()
        super().log(logs, start_time)
