"""Language-model training: ``parameternet lm train RECIPE.yaml [key=value ...]`` (paper section 5.4, Table 7).

The recipe is a YAML file loaded into :class:`LMTrainConfig` (:mod:`parameternet.train.lm_config`: sections
``model``, ``data``, ``optim``, ``schedule``), with dotted ``key=value`` overrides checked like the vision
recipes. :class:`LMTrainer` is the language-modelling task of the run loop both trainers share
(:mod:`parameternet.train.loop`: resume, cadence, NaN guard, interrupts, ``metrics.jsonl``), with torchrun process
groups and metric reduction (``train.distributed``) and atomic safetensors checkpoints with a separate training
state (``train.checkpoint``).

What the paper fixes: AdamW, learning rate 3e-4, cosine decay to 10% of the peak after a linear warmup, every
token seen once (training windows are a seeded permutation of non-overlapping ``seq_len`` windows, the same
for every model of an experiment). Gradient accumulation splits a step's ``batch_size`` sequences into
``grad_accum`` micro-batches. The loss is the model's: next-token cross-entropy plus the weighted router losses.

``parallel: fsdp`` shards the model with FSDP2 per decoder layer (``train.distributed.fully_shard_model``; with
``amp=bf16`` the layers' weights are gathered in bf16), accumulates gradients unreduced with
``set_requires_gradient_sync`` as DDP does with ``no_sync``, writes sharded checkpoints
(``torch.distributed.checkpoint``, ``CheckpointManager.save_sharded``) that resume on any number of processes,
and gathers the whole model for ``model/``. ``activation_checkpointing`` recomputes each decoder layer in the
backward pass (transformers' activation checkpointing), under either.

A run killed at any point resumes (``resume=auto``) from its last checkpoint with the same data order and
ends with the same weights on CPU. The output directory holds ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` and ``model/``: ``save_pretrained`` output with the tokenizer, which loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` after
``import parameternet.models.llama_moe``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parameternet.errors import ParameterNetError
from parameternet.runs import StopSignal, fs_error
from parameternet.train import distributed as D
from parameternet.train.checkpoint import (
    gathered_state_dict,
    load_into,
    load_state,
    load_weights,
    restore_sharded,
    sharded_dir,
    sharded_state,
)
from parameternet.train.lm_config import (
    LMDataConfig,
    LMModelConfig,
    LMOptimConfig,
    LMScheduleConfig,
    LMTrainConfig,
    load_lm_config,
)
from parameternet.train.loop import Cadence, Timing, TrainTask, Window, decay_groups, peak_lr, run_locked, seed_all

__all__ = [
    "LMDataConfig",
    "LMModelConfig",
    "LMOptimConfig",
    "LMScheduleConfig",
    "LMTrainConfig",
    "LMTrainer",
    "load_lm_config",
    "train_lm",
]

log = logging.getLogger(__name__)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


class LMTrainer(TrainTask):
    """Language modelling as a :class:`~parameternet.train.loop.TrainTask`: builds the data, tokenizer and model
    a recipe names; ``run()`` trains and returns the summary."""

    progress_desc = "lm"

    def __init__(self, cfg: LMTrainConfig, dist: D.DistInfo, stop: StopSignal | None = None):
        # since the last train row: the loss, the next-token loss and the router loss
        super().__init__(cfg, dist, stop, Window(("loss", "lm_loss", "aux_loss")))

    def _check_split(self) -> None:
        """The step's batch_size sequences split into world_size x grad_accum micro-batches, or one sentence."""
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % (world * cfg.grad_accum) == 0:
            return
        if self.resume_from is None:
            raise ParameterNetError(
                f"batch_size={cfg.batch_size} does not split into {world} process(es) x "
                f"grad_accum={cfg.grad_accum} micro-batches; use a multiple of {world * cfg.grad_accum}"
            )
        per = cfg.batch_size // cfg.grad_accum
        fits = [n for n in range(1, per + 1) if per % n == 0]
        fits = ", ".join(map(str, fits[:-1])) + f" or {fits[-1]}" if len(fits) > 1 else str(fits[0])
        written = f" on {self.saved_world} process(es)" if self.saved_world else ""
        raise ParameterNetError(
            f"checkpoint {str(self.resume_source)!r} was written{written} with "
            f"batch_size={cfg.batch_size} and grad_accum={cfg.grad_accum}, which do not split over {world} "
            f"processes; resume it on {fits} process(es) (resuming keeps batch_size and grad_accum), or start a new "
            f"output_dir"
        )

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        self._check_split()
        self.micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
        d = cfg.data
        if dist.is_main:  # one process trains the tokenizer; the others wait and load it
            self.data = d.prepare()
        D.barrier()
        if not dist.is_main:
            self.data = d.prepare()
        self.tokenizer = self.data.tokenizer()
        self.train_tokens = self.data.tokens("train")
        self.n_windows = len(self.train_tokens) // d.seq_len

        seed_all(cfg.seed)
        self.model = self._build_model().to(self.device)
        self.params = self.model.num_parameters()
        if cfg.activation_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        if self.sharded:
            from parameternet.layers.moe import MoERouter

            low = torch.bfloat16 if cfg.amp == "bf16" else None
            self.ddp = D.fully_shard_model(self.model, list(self.model.model.layers), dist, low, (MoERouter,))
        else:
            self.ddp = D.data_parallel(self.model, dist)
        self.eval_model = self.model  # zero-shot scoring: under FSDP, the gathered model _save_final builds
        self._build_optim()
        self.last_val: dict[str, float] = {}
        self.cadence = Cadence(cfg.log_every, cfg.eval_every_steps, cfg.ckpt_every_steps)

    def _build_model(self):
        from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM

        m, tok = self.cfg.model, self.tokenizer
        config = ParameterNetLlamaConfig(
            vocab_size=len(tok),
            max_position_embeddings=self.cfg.data.seq_len,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **dataclasses.asdict(m),
        )
        return ParameterNetLlamaForCausalLM(config)

    def _build_optim(self) -> None:
        from timm.scheduler import CosineLRScheduler

        o, s = self.cfg.optim, self.cfg.schedule
        groups = decay_groups(self.model, o.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.total_steps = self.cfg.total_steps
        # the cosine needs one step of its own, so the warmup ends a step before the run does
        warmup = min(s.warmup_steps, self.total_steps - 1)
        if warmup < s.warmup_steps and self.dist.is_main:
            log.warning(
                "schedule.warmup_steps=%d does not fit in this run's %d steps: warming up over %d steps instead, "
                "so that the cosine still ends at %g of the peak learning rate",
                s.warmup_steps, self.total_steps, warmup, s.min_lr_ratio,
            )  # fmt: skip
        # With a single cosine step timm warns that the cosine "will have no effect"; the schedule still ends at
        # lr_min as asked (the line above says why the warmup is short), so timm's warning is dropped, not shown.
        quiet = _DropRecords()
        timm_log = logging.getLogger(CosineLRScheduler.__module__)
        timm_log.addFilter(quiet)
        try:
            self.scheduler = CosineLRScheduler(
                self.optimizer,
                t_initial=self.total_steps - warmup,
                lr_min=o.lr * s.min_lr_ratio,
                warmup_t=warmup,
                warmup_lr_init=0.0,
                warmup_prefix=True,
                t_in_epochs=False,
            )
        finally:
            timm_log.removeFilter(quiet)
        self.scheduler.step_update(0)

    # ----- data order -----
    def _windows(self, step: int) -> np.ndarray:
        """Window indices of this rank's share of global step ``step``: every token once per pass, in an order
        that depends only on ``data.order_seed``."""
        b = self.cfg.batch_size
        first = step * b
        out = []
        while len(out) < b:
            epoch, pos = divmod(first + len(out), self.n_windows)
            perm = np.random.default_rng([self.cfg.data.order_seed, epoch]).permutation(self.n_windows)
            out.extend(perm[pos : pos + b - len(out)].tolist())
        share = b // self.dist.world_size
        return np.asarray(out[self.dist.rank * share : (self.dist.rank + 1) * share])

    def _batch(self, windows: np.ndarray) -> torch.Tensor:
        L = self.cfg.data.seq_len
        rows = [self.train_tokens[w * L : (w + 1) * L] for w in windows]
        return torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.device)  # (B, L)

    # ----- checkpoints -----
    def save_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "batch_size": self.cfg.batch_size,
            "seq_len": self.cfg.data.seq_len,
            "total_steps": self.total_steps,
            "scheduler": self.scheduler.state_dict(),
            "log_window": self.window.saved(),
            "last_val": self.last_val,
        }
        meta = {
            "kind": "lm",
            "step": self.step,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
        }
        if self.sharded:  # every process writes its shards
            self.ckpt.save_sharded_step(self.step, sharded_state(self.model, self.optimizer), state, meta)
            return
        if not self.dist.is_main:
            return
        state["optimizer"] = self.optimizer.state_dict()
        self.ckpt.save_step(self.step, self.model.state_dict(), None, state, meta)

    def load_checkpoint(self, state_path: Path) -> None:
        state = load_state(state_path)
        if (state["batch_size"], state["seq_len"], state["total_steps"]) != (
            self.cfg.batch_size,
            self.cfg.data.seq_len,
            self.total_steps,
        ):
            raise ParameterNetError(
                f"checkpoint {str(state_path)!r} ran batch_size={state['batch_size']}, seq_len={state['seq_len']} "
                f"for {state['total_steps']} steps; resume with the same recipe or start a new output_dir"
            )
        if self.sharded:
            restore_sharded(self.model, self.optimizer, sharded_dir(state_path))
        else:
            weights = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
            load_into(self.model, load_weights(weights)[0], str(weights), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.window.restore(state["log_window"])
        self.last_val = state.get("last_val", {})
        self.scheduler.step_update(self.step)
        log.info("resumed from %s at step %d", state_path, self.step)

    def _save_final(self, name: str = "model", extra: dict[str, str] | None = None) -> Path:
        """``<out>/<name>/``: save_pretrained output plus the tokenizer (and ``extra`` text files), written to a
        temporary directory and renamed over the old one. Under FSDP every process calls it: the shards are
        gathered into a whole model on the main process (:meth:`_gathered`), which writes it."""
        final = self.out / name
        model = self._gathered() if self.sharded else self.model
        if self.dist.is_main:
            save_pretrained_dir(final, model, self.tokenizer, extra)
        D.barrier()
        return final

    def _gathered(self):
        """The FSDP model's weights gathered whole (every process calls it) into an ordinary
        ParameterNetLlamaForCausalLM on the main process, float32, on this run's device (None elsewhere); it
        becomes :attr:`eval_model`."""
        full = gathered_state_dict(self.model)
        if not self.dist.is_main:
            return None
        from parameternet.models.llama_moe import ParameterNetLlamaForCausalLM

        with torch.device("meta"):  # no initialisation: every weight comes from the shards
            plain = ParameterNetLlamaForCausalLM(self.model.config)
        plain.load_state_dict(full, assign=True)
        buffers = dict(self.model.named_buffers())  # not sharded: rotary frequencies
        for name, buf in plain.named_buffers():
            if buf.is_meta:
                owner, _, leaf = name.rpartition(".")
                plain.get_submodule(owner)._buffers[leaf] = buffers[name].detach().cpu().clone()
        plain.to(self.device).train(self.model.training)
        self.eval_model = plain
        return plain

    # ----- the steps -----
    def _autocast(self):
        enabled = self.cfg.amp == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _grad_sync(self, last: bool):
        """Reduce the gradients after this micro-batch only when it is the step's ``last``: FSDP2's
        ``set_requires_gradient_sync``, DDP's ``no_sync``."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last or not self.dist.distributed else self.ddp.no_sync()

    def train_step(self, batch: None = None) -> dict[str, float]:
        """One optimizer step over this rank's share of the step's windows (read here, ``batch`` is None):
        ``loss`` (the model's), ``lm_loss`` (next-token) and ``aux_loss`` (router), averaged over ranks."""
        cfg = self.cfg
        seed_all(D.mix_seed(cfg.seed, self.dist.rank, self.step))
        ids = self._batch(self._windows(self.step))  # (micro * grad_accum, L)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64)
        coef, zcoef = cfg.model.router_aux_loss_coef, cfg.model.router_z_loss_coef
        for j, micro in enumerate(ids.split(self.micro)):
            last = j == cfg.grad_accum - 1
            with self._grad_sync(last):
                with self._autocast():
                    out = self.ddp(input_ids=micro, labels=micro, use_cache=False)
                (out.loss.float() / cfg.grad_accum).backward()
            loss = out.loss.detach().double().cpu()
            aux = (
                out.aux_loss.detach().double().cpu()
                if out.aux_loss is not None
                else torch.zeros((), dtype=torch.float64)
            )
            z = out.z_loss.detach().double().cpu() if out.z_loss is not None else torch.zeros((), dtype=torch.float64)
            sums += torch.stack([loss, loss - coef * aux - zcoef * z, aux]) / cfg.grad_accum
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        self.optimizer.step()
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.dist.distributed:
            sums = D.all_reduce_sum(sums.to(self.device)).cpu() / self.dist.world_size
        return dict(zip(self.window.names, sums.tolist(), strict=True))

    def validate(self) -> None:
        v = self._validation_loss()  # float32 whatever amp says (but FSDP's bf16 weights): comparable across runs
        self.last_val = v
        self.metrics.write({"step": self.step, "split": "val", **{k: round(x, 6) for k, x in v.items()}})
        if self.dist.is_main:
            log.info("step %d  val loss %.4f  ppl %.2f  (%d tokens)", self.step, v["loss"], v["ppl"], v["tokens"])

    def _validation_loss(self) -> dict[str, float]:
        from parameternet.train.lm_eval import validation_loss

        # FSDP with amp=bf16 gathers bf16 weights, which only autocast multiplies with float32 activations
        low = self.sharded and self.cfg.amp == "bf16"
        with self._autocast() if low else contextlib.nullcontext():
            return validation_loss(
                self.model,
                self.data.tokens("val"),
                self.cfg.data.seq_len,
                self.cfg.eval_batch_size,
                self.cfg.eval_tokens,
                self.device,
                self.dist.rank,
                self.dist.world_size,
                lockstep=self.sharded,
            )

    def train_row(self, window: Window) -> dict[str, Any]:
        tokens = self.cfg.batch_size * self.cfg.data.seq_len
        busy = window.timing.busy
        return {
            "step": self.step,
            "split": "train",
            **{name: round(window.mean(name), 6) for name in window.names},
            "lr": peak_lr(self.optimizer),
            "tokens": self.step * tokens,
            "tokens_per_s": round(window.timing.steps * tokens / busy, 1) if busy else None,
        }

    def log_train(self, row: dict[str, Any], window: Window) -> None:
        log.info(
            "step %d/%d  loss %.4f  lm %.4f  aux %.4f  lr %.2e  %s tokens/s",
            self.step, self.total_steps, row["loss"], row["lm_loss"], row["aux_loss"], row["lr"],
            row["tokens_per_s"],
        )  # fmt: skip

    def log_start(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        kind = f"{m.num_experts} experts on {', '.join(m.moe_projections)}" if m.moe_projections else "dense"
        if self.dist.is_main:
            log.info(
                "training %.2fM-parameter LLaMA (%s) for %d steps of %d x %d tokens on %s",
                self.params / 1e6, kind, self.total_steps, cfg.batch_size, cfg.data.seq_len, self.device,
            )  # fmt: skip

    # ----- the end -----
    def finish(self, wall: float, timing: Timing) -> dict[str, Any]:
        """Save ``model/``, score the zero-shot tasks and return the summary."""
        cfg, steps = self.cfg, timing.steps
        final = self._save_final()
        zero_shot = self._zero_shot() if cfg.zero_shot_items else {}
        return {
            "output_dir": str(self.out),
            "params": self.params,
            "moe_projections": cfg.model.moe_projections,
            "num_experts": cfg.model.num_experts if cfg.model.moe_projections else 0,
            "seed": cfg.seed,
            "steps": self.step,
            "tokens": self.step * cfg.batch_size * cfg.data.seq_len,
            "session_steps": steps,
            "wall_s": round(wall, 2),
            "threads": torch.get_num_threads(),
            "tokens_per_s": round(steps * cfg.batch_size * cfg.data.seq_len / max(wall, 1e-9), 1),
            "val": self.last_val,
            "zero_shot": zero_shot,
            "model_dir": str(final),
        }

    def log_done(self, summary: dict[str, Any]) -> None:
        v = self.last_val
        log.info("done: val loss %.4f (ppl %.2f); model in %s", v["loss"], v["ppl"], summary["model_dir"])

    def _zero_shot(self) -> dict[str, dict]:
        from parameternet.data.zero_shot import build_tasks
        from parameternet.train.lm_eval import score_choices

        if not self.dist.is_main:
            return {}
        tasks = build_tasks(self.data.documents("eval"), self.cfg.zero_shot_items)
        out = {}
        for name, items in tasks.items():
            out[name] = score_choices(
                self.eval_model, self.tokenizer, items, self.cfg.data.seq_len, self.cfg.eval_batch_size, self.device
            )
            self.metrics.write({"step": self.step, "split": f"zero_shot/{name}", **out[name]})
            log.info("zero-shot %s: acc %.4f  acc_norm %.4f  (%d items)", name, out[name]["acc"], out[name]["acc_norm"],
                     out[name]["items"])  # fmt: skip
        return out


def save_pretrained_dir(final: Path, model, tokenizer, extra: dict[str, str] | None = None) -> None:
    """``model.save_pretrained`` plus the tokenizer (and ``extra`` text files) in directory ``final``, written to a
    temporary directory beside it and renamed over the old one; a filesystem fault is one ParameterNetError."""
    try:
        with tempfile.TemporaryDirectory(prefix=f".{final.name}-", dir=final.parent) as tmp:
            staged = Path(tmp) / final.name
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            for file, text in (extra or {}).items():
                (staged / file).write_text(text)
            if final.exists():
                final.rename(Path(tmp) / "old")
            staged.rename(final)
    except OSError as e:
        raise (fs_error(final, e) or e) from None


def train_lm(cfg: LMTrainConfig) -> dict[str, Any]:
    """Run a validated LM recipe (one process or one rank of torchrun) and return its summary.

    Like :func:`parameternet.train.trainer.train`: ``output_dir/run.lock`` held for the run (ParameterNetError
    when another live process holds it), SIGINT / SIGTERM save a checkpoint and raise ``RunInterrupted``.
    """
    fsdp = cfg.parallel == "fsdp"  # FSDP and DCP need a process group, of one process too
    trainer = LMTrainer
    if cfg.branch.active or cfg.router_windows or cfg.heldout_loss:
        from parameternet.train.lm_branch import ExperimentLMTrainer as trainer
    return run_locked(cfg.device, cfg.output_dir, lambda dist, stop: trainer(cfg, dist, stop), group=fsdp)
