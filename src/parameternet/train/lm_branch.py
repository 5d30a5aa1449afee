"""What ``lm train`` adds for the language-model experiments (paper sec. 5.4), all set by recipe keys and off by
default: router diagnostics at every evaluation, a snapshot of the weights at a chosen step, runs that stop at a
branch point, branches from such a snapshot (upcycled, or dense with a fresh optimizer), forks that continue another
run's optimizer state, a re-warmup after a branch point and the loss on the held-out split at the end.

:func:`~parameternet.train.lm.train_lm` runs :class:`ExperimentLMTrainer` (:class:`~parameternet.train.lm.LMTrainer`
with these additions) when a recipe sets one of the keys:

- ``router_windows``: after every validation of a model with experts, the first ``router_windows`` validation
  windows go through the model once more and, per layer and converted projection, the mean top-1 router
  probability and each expert's share of the tokens (fractions summing to 1) are written to ``metrics.jsonl`` as a
  ``"split": "router"`` row.
- ``branch.snapshot_step``: the weights are saved with ``save_pretrained`` to ``<output_dir>/snapshot/``
  (atomically) at that step, and the validation loss is measured there even when the evaluation interval does
  not fall on it.
- ``branch.stop_step``: the run ends at that step of its schedule (the learning rate follows the recipe's whole
  schedule, the last checkpoint is at ``stop_step``): the trunk that branches start from.
- ``branch.from_snapshot`` (a dense snapshot directory) with ``branch.start_step``: training starts at
  ``start_step`` of the recipe's step count with a fresh AdamW state: it reads the same windows in the same order
  as the dense run from that step on, with the recipe's learning-rate schedule from there. A recipe with experts
  makes the model :meth:`~parameternet.models.llama_moe.ParameterNetLlamaForCausalLM.from_dense` of the snapshot
  (upcycling); a dense recipe takes the snapshot's weights as they are (the optimizer reset alone).
- ``branch.fork_from`` (a run directory, or a checkpoint's ``.state.pt``): a run without a checkpoint of its own
  starts from that run's newest checkpoint (weights, AdamW state, schedule position and step), as a resume does,
  so it continues that run exactly while writing to its own directory (``eval_every_steps`` and the other keys a
  resume may change can differ).
- ``branch.rewarmup_steps`` (with ``branch.start_step``): the learning rate after the branch point is the
  schedule's times ``min(1, (step - start_step + 1) / rewarmup_steps)``: a linear ramp back to the schedule.
- ``heldout_loss``: a run that reaches the end of its schedule measures the next-token loss on the held-out split
  (the documents neither training nor validation read; ``eval_tokens`` caps it as it caps validation), writes it
  to ``metrics.jsonl`` as a ``"split": "heldout"`` row and returns it in the summary as ``heldout``.

These keys need ``parallel=ddp`` (one process, or DDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from parameternet.errors import ParameterNetError
from parameternet.runs import StopSignal
from parameternet.train import distributed as D
from parameternet.train.lm import LMTrainConfig, LMTrainer

__all__ = ["ExperimentLMTrainer", "router_stats"]


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


class Rewarmup:
    """A learning-rate schedule ramped up again after a branch point: ``base``'s rate (a timm scheduler that sets
    each parameter group's ``lr`` from the step) times ``min(1, (step - start + 1) / steps)`` from step ``start``
    on. It keeps no state of its own (``state_dict`` is ``base``'s), so a resumed run gets the same rates."""

    def __init__(self, base, optimizer: torch.optim.Optimizer, start: int, steps: int):
        if steps < 1:
            raise ParameterNetError(f"rewarmup_steps={steps} must be at least 1; pass 1 or more, or leave it out")
        self.base, self.optimizer, self.start, self.steps = base, optimizer, start, steps

    def factor(self, step: int) -> float:
        """The share of the schedule's rate at ``step`` (1 before ``start`` and from ``start + steps - 1`` on)."""
        return 1.0 if step < self.start else min(1.0, (step - self.start + 1) / self.steps)

    def step_update(self, num_updates: int) -> None:
        self.base.step_update(num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] *= self.factor(num_updates)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state)


class ExperimentLMTrainer(LMTrainer):
    """:class:`LMTrainer` plus router diagnostics, a snapshot step, early stops, branches, forks, a re-warmup and
    the held-out loss (module docstring). Raises ParameterNetError for options that do not fit together or the
    recipe: a branch or fork source that holds no model or checkpoint, a snapshot with experts, a fork checkpoint
    at another step than ``start_step`` or of another recipe, steps outside the schedule."""

    def __init__(self, cfg: LMTrainConfig, dist: D.DistInfo, stop: StopSignal | None = None):
        b = cfg.branch
        self.router_windows = cfg.router_windows
        self.snapshot_step, self.stop_step, self.heldout = b.snapshot_step, b.stop_step, cfg.heldout_loss
        self.branch_from = Path(b.from_snapshot) if b.from_snapshot is not None else None
        self.start_step, self.rewarmup_steps = b.start_step, b.rewarmup_steps
        if self.branch_from is not None and not (self.branch_from / "config.json").is_file():
            raise ParameterNetError(
                f"branch.from_snapshot={str(self.branch_from)!r} holds no saved model; run the dense run past its "
                f"snapshot step first"
            )
        if not 0 <= b.start_step < cfg.total_steps:
            raise ParameterNetError(f"branch.start_step={b.start_step} must be in [0, {cfg.total_steps}); lower it")
        if b.stop_step is not None and not b.start_step < b.stop_step <= cfg.total_steps:
            raise ParameterNetError(
                f"branch.stop_step={b.stop_step} must be in ({b.start_step}, {cfg.total_steps}]; pass a step of the "
                f"schedule"
            )
        super().__init__(cfg, dist, stop)
        if self.step == 0 and self.resume_from is None:  # a fresh run (a resumed one has its own step)
            if b.fork_from is not None:
                self._fork(Path(b.fork_from))
            elif self.branch_from is not None:
                self.step = b.start_step
                self.scheduler.step_update(self.step)

    @property
    def last_step(self) -> int:
        return self.stop_step if self.stop_step is not None else self.total_steps

    def _fork(self, source: Path) -> None:
        from parameternet.train.checkpoint import CheckpointManager
        from parameternet.train.resume import check_resume_recipe

        found = source if source.is_file() else None
        if found is None and source.is_dir():
            found = CheckpointManager(source / "checkpoints" if (source / "checkpoints").is_dir() else source).latest()
        if found is None:
            raise ParameterNetError(
                f"branch.fork_from={str(source)!r} holds no complete checkpoint; run the source run to its stop step "
                "first"
            )
        check_resume_recipe(self.cfg, found, "fork from a run of the same recipe", skip=("branch.",))
        self.load_checkpoint(found)
        if self.step != self.start_step:
            raise ParameterNetError(
                f"branch.fork_from={str(source)!r} ends at step {self.step}, not at branch.start_step="
                f"{self.start_step}; fork from the checkpoint of the branch point"
            )

    def _build_optim(self) -> None:
        super()._build_optim()
        if self.rewarmup_steps is not None:
            self.scheduler = Rewarmup(self.scheduler, self.optimizer, self.start_step, self.rewarmup_steps)
            self.scheduler.step_update(0)

    def _build_model(self):
        if self.branch_from is None:
            return super()._build_model()
        from parameternet.models.llama_moe import ParameterNetLlamaForCausalLM

        m = self.cfg.model
        dense = ParameterNetLlamaForCausalLM.from_pretrained(self.branch_from, dtype=torch.float32)
        if getattr(dense.config, "moe_projections", None):
            raise ParameterNetError(
                f"branch.from_snapshot={str(self.branch_from)!r} holds a model with experts; branch from a dense run's "
                "snapshot"
            )
        if len(self.tokenizer) > dense.config.vocab_size:
            raise ParameterNetError(
                f"the snapshot in {self.branch_from} has a {dense.config.vocab_size}-token vocabulary and the data "
                f"{len(self.tokenizer)}; branch from a run of the same recipe"
            )
        if not m.moe_projections:  # the dense weights as they are: only the optimizer starts afresh
            return dense.train()
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
            if self.step < self.last_step and not (every and self.step % every == 0):
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

    def finish(self, wall: float, timing) -> dict[str, Any]:
        summary = super().finish(wall, timing)
        if self.heldout and self.step == self.total_steps:
            from parameternet.train.lm_eval import validation_loss

            cfg = self.cfg
            v = validation_loss(
                self.model, self.data.tokens("eval"), cfg.data.seq_len, cfg.eval_batch_size, cfg.eval_tokens,
                self.device,
            )  # fmt: skip
            self.metrics.write({"step": self.step, "split": "heldout", **{k: round(x, 6) for k, x in v.items()}})
            summary["heldout"] = v
        return summary
