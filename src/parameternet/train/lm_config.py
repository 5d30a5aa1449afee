"""Language-model recipes: :class:`LMTrainConfig` (sections ``model``, ``data``, ``optim``, ``schedule``) loaded
from YAML with dotted ``key=value`` overrides by the shared recipe loader (:mod:`parameternet.train.recipe`).

Its own module so that the trainer (:mod:`parameternet.train.lm`) and the evaluation of a saved model
(:mod:`parameternet.train.lm_eval`) both read recipes without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from parameternet.errors import ParameterNetError
from parameternet.train.recipe import PARALLEL, RunConfig, check_fields, load_recipe

__all__ = [
    "PARALLEL",
    "LMBranchConfig",
    "LMDataConfig",
    "LMModelConfig",
    "LMOptimConfig",
    "LMScheduleConfig",
    "LMTrainConfig",
    "load_lm_config",
]


@dataclass
class LMModelConfig:
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_experts: int = 8
    moe_projections: list[str] = field(default_factory=list)  # [] = dense LLaMA
    num_experts_per_tok: int = 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    expert_bias: bool = False


@dataclass
class LMDataConfig:
    dir: str | None = None  # prepared text directory; None = the data cache's one for these settings
    corpora: list[str] = field(default_factory=lambda: ["gutenberg", "sotu", "brown"])
    vocab_size: int = 4096
    val_fraction: float = 0.05
    eval_fraction: float = 0.05
    seq_len: int = 256
    order_seed: int = 0  # training-window order; the same for every model of an experiment

    def prepare(self):
        """The prepared text these settings name (:func:`~parameternet.data.text.prepare_text_data`: ``dir``, or
        the data cache's directory, made on first use)."""
        from parameternet.data.text import prepare_text_data

        return prepare_text_data(
            self.dir,
            corpora=self.corpora,
            vocab_size=self.vocab_size,
            val_fraction=self.val_fraction,
            eval_fraction=self.eval_fraction,
        )


@dataclass
class LMOptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float | None = 1.0


@dataclass
class LMScheduleConfig:
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine to 10% of the peak (paper section 5.4)


@dataclass
class LMBranchConfig:
    """Branch points of a run (the upcycling experiment; every key off by default): save the weights to
    ``snapshot/`` at ``snapshot_step``; end at ``stop_step`` of the schedule; start at ``start_step`` from a dense
    snapshot's weights with a fresh AdamW (``from_snapshot``: a model with experts is upcycled from it) or from
    another run's newest checkpoint, optimizer state included (``fork_from``: a run directory or a ``.state.pt``);
    ramp the learning rate back to the schedule over ``rewarmup_steps`` after ``start_step``."""

    snapshot_step: int | None = None
    stop_step: int | None = None
    start_step: int = 0
    from_snapshot: str | None = None
    fork_from: str | None = None
    rewarmup_steps: int | None = None

    @property
    def active(self) -> bool:
        return self != LMBranchConfig()


@dataclass
class LMTrainConfig(RunConfig):
    """``lm train``'s recipe: the model, data, optimizer, schedule and branch sections, with the keys every run
    shares (:class:`~parameternet.train.recipe.RunConfig`: ``max_steps`` overrides ``max_tokens``).
    ``parallel=fsdp`` shards per decoder layer; with ``amp=bf16`` the decoder layers' weights are gathered in bf16
    (routers and the root's embeddings / head in float32), gradients reduced in float32, and evaluation runs under
    bf16 autocast."""

    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    schedule: LMScheduleConfig = field(default_factory=LMScheduleConfig)
    branch: LMBranchConfig = field(default_factory=LMBranchConfig)
    batch_size: int = 32  # sequences per optimizer step, across all ranks
    grad_accum: int = 1
    max_tokens: int | None = None  # training tokens; steps = max_tokens // (batch_size * seq_len)
    eval_batch_size: int = 32
    eval_every_steps: int = 0  # 0 = at the end only
    eval_tokens: int | None = None  # validation tokens per evaluation; None = all
    zero_shot_items: int = 300  # items per zero-shot task at the end; 0 = skip
    heldout_loss: bool = False  # at the end of the schedule, the loss on the held-out split too
    router_windows: int = 0  # after each validation, router diagnostics on this many validation windows (MoE)
    ckpt_every_steps: int = 100
    output_dir: str = "runs/lm"
    log_every: int = 10
    amp: str = "none"  # none | bf16: training under bf16 autocast (evaluation stays float32; see parallel)
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass (less memory)

    def validate(self) -> LMTrainConfig:
        """Check the values one type annotation cannot (ranges, cross-field rules, the model config's own checks)
        and return the recipe; ParameterNetError names the first bad key, its value and what it must be."""
        from parameternet.data.text import check_corpus_names
        from parameternet.models.llama_moe import MOE_PROJECTIONS, ParameterNetLlamaConfig

        one_batch = self.batch_size * self.data.seq_len
        checks = [
            *self.run_checks(),
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.grad_accum > 0 and self.batch_size % self.grad_accum == 0, "grad_accum", "a divisor of batch_size"),
            (self.data.seq_len > 1, "data.seq_len", "at least 2"),
            (self.max_tokens is None or self.max_tokens > 0, "max_tokens", "a positive integer or null"),
            (self.max_steps is not None or self.max_tokens is not None, "max_tokens", "set (or set max_steps)"),
            (
                self.max_steps is not None or (self.max_tokens or 0) >= one_batch,
                "max_tokens",
                f"at least one batch, batch_size x data.seq_len = {one_batch} tokens (or set max_steps)",
            ),
            (self.eval_batch_size > 0, "eval_batch_size", "a positive integer"),
            (self.eval_every_steps >= 0, "eval_every_steps", "0 (at the end only) or more"),
            (
                self.eval_tokens is None or self.eval_tokens >= self.data.seq_len,
                "eval_tokens",
                f"null (the whole validation split) or at least data.seq_len={self.data.seq_len}",
            ),
            (self.zero_shot_items >= 0, "zero_shot_items", "0 (skip the zero-shot tasks) or more"),
            (self.router_windows >= 0, "router_windows", "0 (no router diagnostics) or more"),
            (self.branch.start_step >= 0, "branch.start_step", "0 or more"),
            (
                self.branch.rewarmup_steps is None or self.branch.rewarmup_steps >= 1,
                "branch.rewarmup_steps",
                "at least 1, or null",
            ),
            (
                not (self.branch.from_snapshot and self.branch.fork_from),
                "branch.fork_from",
                "null when branch.from_snapshot is set (weights with a fresh optimizer, or weights and optimizer "
                "state: one of them)",
            ),
            (self.ckpt_every_steps >= 0, "ckpt_every_steps", "0 (at the end only) or more"),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (len(self.optim.betas) == 2, "optim.betas", "two numbers"),
            (0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "between 0 and 1"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps", "0 or more"),
            (self.amp in ("none", "bf16"), "amp", "none or bf16"),
            (self.model.num_attention_heads > 0, "model.num_attention_heads", "a positive integer"),
            (self.model.hidden_size > 0, "model.hidden_size", "a positive integer"),
            (self.model.intermediate_size > 0, "model.intermediate_size", "a positive integer"),
            (self.model.num_hidden_layers > 0, "model.num_hidden_layers", "a positive integer"),
        ]
        check_fields(self, checks)
        check_corpus_names(self.data.corpora)
        if self.data.dir is not None and not Path(self.data.dir).expanduser().is_dir():
            raise ParameterNetError(
                f"data.dir={self.data.dir!r} does not exist; prepare it with `parameternet lm data --out "
                f"{self.data.dir}` or leave data.dir unset for the data cache"
            )
        heads, hidden = self.model.num_attention_heads, self.model.hidden_size
        if hidden % heads:
            near = min((h for h in range(1, hidden + 1) if hidden % h == 0), key=lambda h: (abs(h - heads), h))
            raise ParameterNetError(
                f"model.num_attention_heads={heads} does not divide model.hidden_size={hidden}; use a divisor of "
                f"it such as {near}"
            )
        kv = self.model.num_key_value_heads
        if kv is not None and (kv <= 0 or self.model.num_attention_heads % kv):
            raise ParameterNetError(
                f"model.num_key_value_heads={kv} does not divide model.num_attention_heads="
                f"{self.model.num_attention_heads}; use a divisor of it"
            )
        for name in self.model.moe_projections:
            if name not in MOE_PROJECTIONS:
                raise ParameterNetError(
                    f"unknown projection {name!r} in model.moe_projections; choose from {', '.join(MOE_PROJECTIONS)}."
                )
        if self.parallel != "ddp" and (self.branch.active or self.router_windows or self.heldout_loss):
            raise ParameterNetError(
                f"parallel={self.parallel!r} does not take branch points, router diagnostics or the held-out loss; "
                "drop the branch.* / router_windows / heldout_loss keys, or parallel"
            )
        ParameterNetLlamaConfig(**dataclasses.asdict(self.model))  # its own checks (experts per token, capacity)
        return self

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, self.max_tokens // (self.batch_size * self.data.seq_len))


def load_lm_config(path: str | Path | None, overrides: list[str] = ()) -> LMTrainConfig:
    """Load a YAML recipe (or the defaults), apply ``key=value`` overrides, validate."""
    return load_recipe(LMTrainConfig, path, overrides, example="configs/lm-small.yaml")
