"""An ``lm-train`` run with what the Table 7 experiment needs on top (paper sec. 5.4): router diagnostics at every
evaluation, a snapshot of the weights at a chosen step, and branches upcycled from such a snapshot.

:class:`ExperimentLMTrainer` is :class:`~parameternet.train.lm.LMTrainer` with three additions, all optional:

- *Router diagnostics.* After every validation of a model with experts, the first ``router_windows`` validation
  windows go through the model once more and, per layer and converted projection, the mean top-1 router
  probability and each expert's share of the tokens (fractions summing to 1) are written to ``metrics.jsonl`` as a
  ``"split": "router"`` row.
- *Snapshot.* At step ``snapshot_step`` the weights are saved with ``save_pretrained`` to ``<output_dir>/snapshot/``
  (atomically) and the validation loss is measured there even when the evaluation interval does not fall on it.
- *Upcycled branch.* With ``upcycle_from`` (a dense snapshot directory) and ``start_step``, the model is
  :meth:`~parameternet.models.llama_moe.ParameterNetLlamaForCausalLM.from_dense` of that snapshot with the recipe's
  experts, and training starts at ``start_step`` of the recipe's step count: it reads the same windows in the same
  order as the dense run from that step on, with the dense run's learning-rate schedule from there, and a fresh
  AdamW state (the experts are new parameters).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parameternet.errors import ParameterNetError
from parameternet.runs import StopSignal
from parameternet.train import distributed as D
from parameternet.train.lm import LMTrainConfig, LMTrainer
from parameternet.train.loop import run_locked

__all__ = ["ExperimentLMTrainer", "router_stats", "train_experiment_lm"]


@torch.no_grad()
def router_stats(model, tokens: np.ndarray, seq_len: int, windows: int, batch_size: int = 16) -> list[dict[str, Any]]:
    """Per converted projection, in layer order: ``{"layer", "projection", "top1_prob", "share"}``.

    ``top1_prob`` is the mean over tokens of the chosen expert's router probability (1/M = uniform, 1 = certain);
    ``share`` lists each expert's fraction of the top-1 assignments. Computed on the first ``windows`` windows of
    ``seq_len`` tokens of ``tokens`` (float32, eval mode).
    """
    config = model.config
    if not config.moe_projections:
        return []
    was_training = model.training
    model.eval()
    n = max(1, min(windows, len(tokens) // seq_len))
    m = config.num_experts
    per_router: list[list[torch.Tensor]] = []
    for start in range(0, n, batch_size):
        rows = [tokens[w * seq_len : (w + 1) * seq_len] for w in range(start, min(n, start + batch_size))]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64)).to(next(model.parameters()).device)  # (B, L)
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # one (B*L, M) per router
        for i, r in enumerate(logits):
            probs = torch.softmax(r.float(), dim=-1)
            top_p, top_e = probs.max(-1)
            counts = torch.bincount(r.argmax(-1), minlength=m).double()
            entry = torch.cat([top_p.double().sum()[None], counts, torch.tensor([float(len(top_e))])]).cpu()
            if len(per_router) <= i:
                per_router.append([])
            per_router[i].append(entry)
    model.train(was_training)
    names = [p for p in ("gate_proj", "up_proj", "down_proj") if p in config.moe_projections]  # call order
    out = []
    for i, entries in enumerate(per_router):
        total = torch.stack(entries).sum(0)
        tokens_seen = total[-1].item()
        out.append(
            {
                "layer": i // len(names),
                "projection": names[i % len(names)],
                "top1_prob": round(total[0].item() / tokens_seen, 5),
                "share": [round(c / tokens_seen, 5) for c in total[1:-1].tolist()],
            }
        )
    return out


class ExperimentLMTrainer(LMTrainer):
    """:class:`LMTrainer` plus router diagnostics, a snapshot step and upcycled branches (module docstring)."""

    def __init__(
        self,
        cfg: LMTrainConfig,
        dist: D.DistInfo,
        stop: StopSignal | None = None,
        *,
        router_windows: int = 64,
        snapshot_step: int | None = None,
        upcycle_from: str | Path | None = None,
        start_step: int = 0,
    ):
        self.router_windows = router_windows
        self.snapshot_step = snapshot_step
        self.upcycle_from = Path(upcycle_from) if upcycle_from is not None else None
        if self.upcycle_from is not None:
            if not (self.upcycle_from / "config.json").is_file():
                raise ParameterNetError(
                    f"upcycle_from={str(self.upcycle_from)!r} holds no saved model; run the dense run past its "
                    f"snapshot step first"
                )
            if not cfg.model.moe_projections:
                raise ParameterNetError(
                    "an upcycled branch needs model.moe_projections; name the projection to convert"
                )
        if cfg.parallel != "ddp":
            raise ParameterNetError(
                f"parallel={cfg.parallel!r} is for lm-train; the experiment's runs are single-process, drop it"
            )
        if not 0 <= start_step < cfg.total_steps:
            raise ParameterNetError(f"start_step={start_step} must be in [0, {cfg.total_steps}); lower it")
        super().__init__(cfg, dist, stop)
        if self.upcycle_from is not None and self.step == 0:  # a fresh branch (a resumed one has its own step)
            self.step = start_step
            self.scheduler.step_update(self.step)

    def _build_model(self):
        if self.upcycle_from is None:
            return super()._build_model()
        from parameternet.models.llama_moe import ParameterNetLlamaForCausalLM

        m = self.cfg.model
        dense = ParameterNetLlamaForCausalLM.from_pretrained(self.upcycle_from, dtype=torch.float32)
        if len(self.tokenizer) > dense.config.vocab_size:
            raise ParameterNetError(
                f"the snapshot in {self.upcycle_from} has a {dense.config.vocab_size}-token vocabulary and the data "
                f"{len(self.tokenizer)}; branch from a run of the same recipe"
            )
        return ParameterNetLlamaForCausalLM.from_dense(
            dense,
            num_experts=m.num_experts,
            moe_projections=m.moe_projections,
            seed=self.cfg.seed,
            num_experts_per_tok=m.num_experts_per_tok,
            router_aux_loss_coef=m.router_aux_loss_coef,
            router_z_loss_coef=m.router_z_loss_coef,
            capacity_factor=m.capacity_factor,
            expert_bias=m.expert_bias,
        ).train()

    def after_step(self) -> None:
        if self.snapshot_step is not None and self.step == self.snapshot_step:
            self._save_snapshot()
            every = self.cfg.eval_every_steps
            if self.step < self.total_steps and not (every and self.step % every == 0):
                self.validate()  # the loss at the branch point, whatever the evaluation interval

    def _save_snapshot(self) -> None:
        self._save_final("snapshot", {"step.txt": f"{self.step}\n"})

    def validate(self) -> None:
        super().validate()
        if not (self.dist.is_main and self.cfg.model.moe_projections and self.router_windows):
            return
        stats = router_stats(
            self.model, self.data.tokens("val"), self.cfg.data.seq_len, self.router_windows, self.cfg.eval_batch_size
        )
        tokens = self.step * self.cfg.batch_size * self.cfg.data.seq_len
        self.metrics.write({"step": self.step, "split": "router", "tokens": tokens, "routers": stats})


def train_experiment_lm(cfg: LMTrainConfig, **options: Any) -> dict[str, Any]:
    """Run :class:`ExperimentLMTrainer` like :func:`~parameternet.train.lm.train_lm` (the run lock held, SIGINT /
    SIGTERM save a checkpoint and raise ``RunInterrupted``) and return its summary plus ``threads`` (torch's)."""
    summary = run_locked(cfg.device, cfg.output_dir, lambda dist, stop: ExperimentLMTrainer(cfg, dist, stop, **options))
    return {**summary, "threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg)}
