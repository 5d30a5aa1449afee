"""Image classification: one recipe, one CPU to torchrun DDP or FSDP, never losing a run (paper Table 1, sec. 4).

The pieces come from timm (transforms, RandAugment, random erasing, Mixup / CutMix, label-smoothing losses,
``create_optimizer_v2`` with layer decay, ``create_scheduler_v2`` stepped every update, ``ModelEmaV3``); what is
written here is the image-classification task that the shared run loop (:mod:`parameternet.train.loop`) drives:
data order and randomness that depend only on (seed, epoch, step), so a run killed at any point and resumed
from its last checkpoint ends with the same weights and metrics on CPU; validation with the best checkpoint;
and the pretrain -> fine-tune hand-over.

Randomness: before each step the python, numpy and torch generators are reseeded from (seed, rank, epoch,
step), and PIL augmentation is seeded per image (see ``parameternet.data.pipeline``), so neither worker
scheduling nor a restart changes what a step sees. After each step every process takes the main process's buffers
(BatchNorm statistics), which are what a checkpoint keeps.

``parallel: fsdp`` shards the model with FSDP2 per stage (``train.distributed.shard_units`` /
``fully_shard_model``: the dynamic layers' expert banks are split along the experts like any parameter; with
``amp=bf16`` the stages' weights are gathered in bf16, routers in float32), shards the EMA the same way (timm's
``ModelEmaV3`` updating the local shards), writes step checkpoints with ``torch.distributed.checkpoint``
(``CheckpointManager.save_sharded``: model, optimizer and EMA shards) that resume on any number of processes, and
gathers ``best`` / ``final`` into ordinary safetensors files, which ``parameternet.load`` reads. Validation runs
in lockstep (every process as many forward passes as the one with the most batches).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from parameternet.data.images import build_dataset
from parameternet.data.pipeline import LoaderDataset, collate
from parameternet.errors import ParameterNetError
from parameternet.runs import StopSignal, atomic_write
from parameternet.train import distributed as D
from parameternet.train.checkpoint import (
    gathered_state_dict,
    load_into,
    load_state,
    load_weights,
    recorded_metadata,
    restore_rng_state,
    restore_sharded,
    rng_state,
    sharded_dir,
    sharded_state,
)
from parameternet.train.config import TrainConfig
from parameternet.train.image_build import (
    AMP,
    build_loss,
    build_optimizer,
    build_transforms,
    create_model,
    init_from_checkpoint,
)
from parameternet.train.image_eval import evaluate
from parameternet.train.loop import Cadence, Timing, TrainTask, Window, peak_lr, run_locked, seed_all

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)


def _divisors(n: int) -> str:
    """``"1, 2, 4 or 8"``: the numbers of processes ``n`` images (or sequences) split over evenly."""
    fits = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, fits[:-1])) + f" or {fits[-1]}" if len(fits) > 1 else str(fits[0])


class Trainer(TrainTask):
    """Image classification as a :class:`~parameternet.train.loop.TrainTask`: builds everything a recipe names;
    ``run()`` trains and returns the summary dict."""

    restart_hint = "start a new output_dir (init_from= starts from its weights)"

    def __init__(self, cfg: TrainConfig, dist: D.DistInfo, stop: StopSignal | None = None):
        super().__init__(cfg, dist, stop, Window(("loss",)))

    # ----- setup -----
    def build(self) -> None:
        cfg = self.cfg
        seed_all(cfg.seed)
        self._build_data()
        self._build_model()
        self._build_optim()
        self.best, self.best_step = -math.inf, None
        self.epoch = self.pos = 0
        self.last_val: dict[str, dict] = {}
        self.progress_desc = cfg.model
        self.cadence = Cadence(
            cfg.log_every, cfg.eval_every_steps, cfg.ckpt_every_steps, cfg.eval_every_epochs, cfg.ckpt_every_epochs
        )
        self._batches = None  # the training loader's iterator over the rest of this epoch

    def _build_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.batch_size % dist.world_size:
            if self.resume_from is None:
                raise ParameterNetError(
                    f"batch_size={cfg.batch_size} does not divide over {dist.world_size} processes; use a multiple "
                    f"of {dist.world_size}"
                )
            raise ParameterNetError(
                f"checkpoint {str(self.resume_source)!r} was written{self._written_on()} with "
                f"batch_size={cfg.batch_size}, which does not divide over {dist.world_size} processes; resume it on "
                f"{_divisors(cfg.batch_size)} process(es) (resuming keeps batch_size), or start a new output_dir"
            )
        self.local_batch = cfg.batch_size // dist.world_size
        self.train_ds = build_dataset(cfg.data.train)
        self.num_classes = cfg.num_classes or self.train_ds.num_classes
        self._check_exact_epochs()
        self.steps_per_epoch = len(self.train_ds) // dist.world_size // self.local_batch
        if self.steps_per_epoch == 0:
            raise ParameterNetError(
                f"data.train={cfg.data.train!r} has {len(self.train_ds)} images, fewer than one batch of "
                f"{cfg.batch_size}; lower batch_size"
            )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and self.local_batch % 2:
            raise ParameterNetError(f"mixup / cutmix need an even batch per process, got {self.local_batch}")
        self.train_tf, self.pipeline = build_transforms(cfg, self.train_ds, True, self.device)
        self.sampler = D.ResumableSampler(self.train_ds, dist.world_size, dist.rank, seed=cfg.seed)
        self.train_loader = self._loader(LoaderDataset(self.train_ds, self.train_tf[0]), self.local_batch, self.sampler)
        self.val_loader = None
        if cfg.data.val:
            self.val_ds = build_dataset(cfg.data.val)
            if self.val_ds.num_classes > self.num_classes:
                raise ParameterNetError(
                    f"data.val={cfg.data.val!r} has {self.val_ds.num_classes} classes but the model predicts "
                    f"{self.num_classes}; evaluate on a dataset with the training classes"
                )
            self.val_tf, _ = build_transforms(cfg, self.val_ds, False, self.device)
            batch = (cfg.eval_batch_size or cfg.batch_size) // dist.world_size or 1
            sampler = D.ShardSampler(len(self.val_ds), dist.world_size, dist.rank)
            self.val_loader = self._loader(LoaderDataset(self.val_ds, self.val_tf[0]), batch, sampler, drop_last=False)

    def _check_exact_epochs(self) -> None:
        """A dataset whose epochs take every sample once (``exact_epochs``: tar shards) must split into whole steps
        of ``batch_size`` over the processes; else one sentence with the batch sizes and the ``limit=`` that fit."""
        ds, batch, world = self.train_ds, self.cfg.batch_size, self.dist.world_size
        n = len(ds)
        if not getattr(ds, "exact_epochs", False) or n < batch or n % batch == 0:  # n < batch: said below
            return
        fits = [b for b in range(world, 2 * batch + 1, world) if n % b == 0]
        near = sorted(fits, key=lambda b: (abs(b - batch), b))[:3]
        sizes = f"a batch_size that divides {n} ({' or '.join(map(str, sorted(near)))} fit), or " if near else ""
        shards = f" in {len(ds.shards)} shards" if hasattr(ds, "shards") else ""
        raise ParameterNetError(
            f"data.train={self.cfg.data.train!r} holds {n} samples{shards}, which do not split into steps of "
            f"batch_size={batch} ({world} process(es) x {batch // world}) without leaving {n % batch} out of every "
            f"epoch; use {sizes}add ':limit={n - n % batch}' to the spec to train on that many"
        )

    def _loader(self, dataset, batch_size: int, sampler, drop_last: bool = True):
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=workers > 0,
        )

    def _build_model(self) -> None:
        cfg = self.cfg
        model = create_model(cfg, self.num_classes)
        if cfg.init_from:
            init_from_checkpoint(model, cfg.init_from, self.num_classes, strict=cfg.init_strict)
        if cfg.sync_bn and self.dist.distributed:
            if self.device.type != "cuda":
                raise ParameterNetError("sync_bn=true needs CUDA devices; set sync_bn=false for CPU runs")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.params = sum(p.numel() for p in model.parameters())
        self.amp = AMP(cfg.amp, self.device)
        self.ema = None
        if cfg.ema is not None:
            from timm.utils import ModelEmaV3

            # a copy of the whole model; under FSDP it is sharded like the model, and its update lerps the local
            # shards pairwise (foreach kernels take no mix of DTensors and plain buffers)
            self.ema = ModelEmaV3(model, decay=cfg.ema, foreach=not self.sharded)
        if self.sharded:
            self.ddp = self._fully_shard(model)
            if self.ema is not None:
                self._fully_shard(self.ema.module)
        else:
            self.ddp = D.data_parallel(model, self.dist)

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        """``model`` sharded with FSDP2 per stage (:func:`~parameternet.train.distributed.shard_units`); with
        amp=bf16 the stages' weights are gathered in bf16 and the dynamic layers' routers in float32."""
        from parameternet.layers import DynamicConv2d, DynamicLinear

        if self.amp.mode == "fp16":
            raise ParameterNetError(
                "amp=auto chose fp16 on this GPU, which parallel=fsdp does not take (fp16 needs a gradient scaler over "
                "sharded gradients); set amp=bf16 or amp=none"
            )
        routers = tuple({type(m.router) for m in model.modules() if isinstance(m, (DynamicConv2d, DynamicLinear))})
        low = self.amp.dtype if self.amp.mode == "bf16" else None
        return D.fully_shard_model(model, D.shard_units(model), self.dist, low, routers)

    def _build_optim(self) -> None:
        self.optimizer, self.scheduler = build_optimizer(self.cfg, self.model, self.steps_per_epoch, self.total_steps)
        self.mixup, self.criterion = build_loss(self.cfg, self.num_classes)

    # ----- checkpoints -----
    def _metadata(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "model": cfg.model,
            "model_kwargs": cfg.model_kwargs,
            "num_classes": self.num_classes,
            "in_chans": cfg.in_chans,
            "img_size": cfg.img_size,
            "classes": list(self.train_ds.classes) if len(self.train_ds.classes) == self.num_classes else None,
            "step": self.step,
            "world_size": self.dist.world_size,
            "config": cfg.to_dict(),
        }

    def _written_on(self) -> str:
        return f" on {self.saved_world} process(es)" if self.saved_world else ""

    def _whole_weights(self) -> tuple[dict | None, dict | None]:
        """The model's and the EMA's (or None) whole state dicts; under FSDP every process calls it and gets
        them gathered on the main process (empty dicts elsewhere)."""
        if not self.sharded:
            return self.model.state_dict(), self.ema.module.state_dict() if self.ema is not None else None
        ema = gathered_state_dict(self.ema.module) if self.ema is not None else None
        return gathered_state_dict(self.model), ema

    def save_checkpoint(self, tag: str | None = None) -> None:
        """The step checkpoint (weights, EMA, training state); with ``tag`` (``best`` / ``final``) weights only.
        Under FSDP every process calls it: step checkpoints are sharded (``step_N.dcp/``: model, optimizer and EMA
        shards), ``best`` / ``final`` are the weights gathered whole, ordinary ``.safetensors`` files."""
        if not (self.dist.is_main or self.sharded):
            return
        meta = self._metadata()
        if tag is not None:  # best / final: weights only
            weights, ema = self._whole_weights()
            if self.dist.is_main:
                self.ckpt.save(tag, weights, ema, None, meta)
            return
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "pos": self.pos,
            "sampler_seed": self.cfg.seed,
            "batch_size": self.cfg.batch_size,
            "world_size": self.dist.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
            "rng": rng_state(self.device),
            "best": self.best,
            "best_step": self.best_step,
            "last_val": self.last_val,
            "log_window": self.window.saved(),
        }
        if self.sharded:
            others = {"ema": self.ema.module} if self.ema is not None else None
            shards = sharded_state(self.model, self.optimizer, others)
            path = self.ckpt.save_sharded_step(self.step, shards, state, meta)
        else:
            state["optimizer"] = self.optimizer.state_dict()
            ema = self.ema.module.state_dict() if self.ema is not None else None
            path = self.ckpt.save_step(self.step, self.model.state_dict(), ema, state, meta)
        log.debug("checkpoint %s", path)

    def load_checkpoint(self, state_path: Path) -> None:
        state = load_state(state_path)
        source, meta = recorded_metadata(state_path)
        if meta.get("model") != self.cfg.model:
            raise ParameterNetError(
                f"checkpoint {str(source)!r} was written for model {meta.get('model')!r}, the recipe says "
                f"{self.cfg.model!r}; resume with the same model or start a new output_dir"
            )
        if (state["batch_size"], state["steps_per_epoch"]) != (self.cfg.batch_size, self.steps_per_epoch):
            raise ParameterNetError(
                f"checkpoint {str(state_path)!r} ran batch_size={state['batch_size']} with "
                f"{state['steps_per_epoch']} steps per epoch; resume with the same batch_size and data.train"
            )
        if self.sharded:
            others = {"ema": self.ema.module} if self.ema is not None else None
            restore_sharded(self.model, self.optimizer, sharded_dir(state_path), others)
        else:
            load_into(self.model, load_weights(source)[0], str(source), strict=True)
            if self.ema is not None:
                ema_path = source.with_name(source.name.replace(".safetensors", ".ema.safetensors"))
                if ema_path.is_file():
                    load_into(self.ema.module, load_weights(ema_path)[0], str(ema_path), strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.amp.scaler is not None and state.get("scaler") is not None:
            self.amp.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"], self.device)
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.best, self.best_step, self.last_val = state["best"], state["best_step"], state.get("last_val", {})
        self.window.restore(state.get("log_window", [0.0, 0]))
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", state_path, self.step, self.epoch, self.pos)

    # ----- the steps -----
    def validate(self) -> None:
        if self.val_loader is None:
            return
        targets = [("model", self.model)] + ([("ema", self.ema.module)] if self.ema is not None else [])
        for name, net in targets:
            m = evaluate(net, self.val_loader, self.val_tf[1], self.device, self.amp, lockstep=self.sharded)
            self.last_val[name] = m
            row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "split": "val"}
            self.metrics.write({**row, "weights": name, **{k: round(v, 6) for k, v in m.items()}})
        score = self.last_val["ema" if self.ema is not None else "model"]["top1"]
        if score > self.best:
            self.best, self.best_step = score, self.step
            self.save_checkpoint("best")
            if self.dist.is_main:
                atomic_write(
                    self.out / "checkpoints" / "best.json",
                    json.dumps({"step": self.step, "val": self.last_val}, indent=1) + "\n",
                )
        self.model.train()

    def log_start(self) -> None:
        cfg = self.cfg
        log.info(
            "training %s (%.2fM params, %d classes) on %s: %d images, %d steps/epoch, %d steps, batch %d x %d "
            "process(es), %s pipeline, %s",
            cfg.model, self.params / 1e6, self.num_classes, cfg.data.train, len(self.train_ds),
            self.steps_per_epoch, self.total_steps, self.local_batch, self.dist.world_size, self.pipeline,
            self.device,
        )  # fmt: skip

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(images, labels)`` of this rank's share of the epoch, on the device."""
        if self._batches is None:
            self.sampler.set_position(self.epoch, self.pos * self.local_batch)
            self._batches = iter(self.train_loader)
        x, y = next(self._batches)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return {"loss": self._train_step(*batch)}

    def end_step(self) -> bool:
        self.pos += 1
        if self.pos < self.steps_per_epoch:
            return False
        self.epoch, self.pos, self._batches = self.epoch + 1, 0, None
        return True

    def where(self) -> str:
        return f" (epoch {self.epoch})"

    def postfix(self, values: dict[str, float], seconds: float) -> dict[str, str]:
        ips = self.local_batch * self.dist.world_size / max(seconds, 1e-9)
        return {**super().postfix(values, seconds), "img_s": f"{ips:.0f}"}

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch of ``(B, C, H, W)`` images and ``(B,)`` labels; the loss, averaged
        over ranks."""
        cfg = self.cfg
        seed_all(D.mix_seed(cfg.seed, self.dist.rank, self.epoch, self.step))
        x = self.train_tf[1](x)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with self.amp():
            out = self.ddp(x)
            loss = self.criterion(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.amp.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        if self.dist.distributed:  # every process holds the main one's BatchNorm statistics, as checkpoints do
            D.broadcast_buffers(self.model)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        value = loss.detach().float().reshape(1)
        if self.dist.distributed:  # every rank sees the same mean loss, so all stop together on NaN
            value = D.all_reduce_sum(value) / self.dist.world_size
        return value.item()

    def train_row(self, window: Window) -> dict[str, Any]:
        timed, t = window.timing.steps, window.timing
        return {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "split": "train",
            "loss": round(window.mean("loss"), 6),
            "lr": peak_lr(self.optimizer),
            "images_per_s": round(timed * self.local_batch * self.dist.world_size / max(t.busy, 1e-9), 1),
            "data_wait_s": round(t.data_wait / max(timed, 1), 6),
            "step_s": round(t.compute / max(timed, 1), 6),
        }

    def log_train(self, row: dict[str, Any], window: Window) -> None:
        log.info(
            "step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.0f img/s  data wait %.1f%%",
            self.step, self.total_steps, row["epoch"], row["loss"], row["lr"], row["images_per_s"],
            100 * window.timing.data_wait / max(window.timing.busy, 1e-9),
        )  # fmt: skip

    # ----- the end -----
    def finish(self, wall: float, timing: Timing) -> dict[str, Any]:
        self.save_checkpoint("final")
        steps, wait, compute = timing.steps, timing.data_wait, timing.compute
        return {
            "output_dir": str(self.out),
            "model": self.cfg.model,
            "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4),
            "session_steps": steps,
            "wall_s": round(wall, 3),
            "images_per_s": round(steps * self.local_batch * self.dist.world_size / max(wall, 1e-9), 1),
            "data_wait_s_per_step": round(wait / max(steps, 1), 6),
            "step_s_per_step": round(compute / max(steps, 1), 6),
            "data_wait_fraction": round(wait / max(wait + compute, 1e-9), 4),
            "val": self.last_val,
            "best_top1": None if self.best_step is None else round(self.best, 4),
            "best_step": self.best_step,
        }

    def log_done(self, summary: dict[str, Any]) -> None:
        if not summary["session_steps"]:
            return
        log.info(
            "done: %d steps in %.1f s (%.0f img/s); data wait %.4f s/step vs step %.4f s/step (%.1f%% waiting)",
            summary["session_steps"], summary["wall_s"], summary["images_per_s"], summary["data_wait_s_per_step"],
            summary["step_s_per_step"], 100 * summary["data_wait_fraction"],
        )  # fmt: skip
        val = self.last_val.get("ema") or self.last_val.get("model")
        if val:
            log.info("val top1 %.2f  top5 %.2f  loss %.4f  (%d images)", val["top1"], val["top5"], val["loss"],
                     val["images"])  # fmt: skip
        log.info("outputs in %s (metrics.jsonl, checkpoints/)", self.out)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a validated recipe (single process or one rank of torchrun) and return its summary.

    The main rank holds ``output_dir/run.lock`` for the whole run (ParameterNetError when another live process
    holds it). SIGINT / SIGTERM finish the step, write a checkpoint and raise
    :class:`~parameternet.runs.RunInterrupted`; a second SIGINT exits at once. ``parallel=fsdp`` makes a process
    group even in one process (FSDP and ``torch.distributed.checkpoint`` need one).
    """
    fsdp = cfg.parallel == "fsdp"
    return run_locked(cfg.device, cfg.output_dir, lambda dist, stop: Trainer(cfg, dist, stop), group=fsdp)
