"""The run loop both trainers share: one run directory, one step loop, nothing lost (paper sec. 4 and 5.4).

A *task* (:class:`TrainTask`: image classification in :mod:`parameternet.train.trainer`, language modelling in
:mod:`parameternet.train.lm`) builds its model, optimizer and data and knows how to take one training step,
validate, checkpoint and summarise. The loop owns everything around that, the same for both:

- the run directory: resume discovery and the refusal to write over another run's checkpoints or to resume one
  with another recipe (both in :mod:`parameternet.train.resume`), ``config.yaml`` and ``metrics.jsonl`` (rows
  after the checkpoint resumed from are dropped, so a resumed file reads like an unbroken one);
- the steps: data wait and step time (:class:`Timing`), the train rows' window (:class:`Window`), the NaN
  guard, the progress bar, the cadence of rows, validations and checkpoints (:class:`Cadence`);
- stopping: SIGINT / SIGTERM on any rank finish the step, write a checkpoint and raise
  :class:`~parameternet.runs.RunInterrupted` on every rank at the same step; :func:`run_locked` holds
  ``output_dir/run.lock`` and the signal handlers for the run;
- the end: ``summary.json`` (a run already complete returns it without training).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from parameternet.errors import ParameterNetError
from parameternet.runs import RunInterrupted, RunLock, StopSignal, atomic_write, fs_error
from parameternet.toolkit import seed_all
from parameternet.train import distributed as D
from parameternet.train.checkpoint import CheckpointManager, recorded_metadata, sharded_dir
from parameternet.train.recipe import RunConfig
from parameternet.train.resume import check_resume_recipe, discover_resume

__all__ = [
    "Cadence",
    "Metrics",
    "RunLoop",
    "Timing",
    "TrainTask",
    "Window",
    "decay_groups",
    "peak_lr",
    "run_locked",
    "seed_all",
]

log = logging.getLogger(__name__)


def peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate of the optimizer's parameter groups (the one rows and logs report)."""
    return max(g["lr"] for g in optimizer.param_groups)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups: matrices, expert banks and embeddings (``dim >= 2``) decay by
    ``weight_decay``; norms and biases (``dim < 2``) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----- timing, the train rows' window, cadence -----------------------------------------------------------------


@dataclass
class Timing:
    """Seconds spent waiting for data and computing steps, and the steps timed, in this process."""

    data_wait: float = 0.0
    compute: float = 0.0
    steps: int = 0

    def add(self, data_wait: float, compute: float) -> None:
        """Count one step that waited ``data_wait`` and computed ``compute`` seconds."""
        self.data_wait += data_wait
        self.compute += compute
        self.steps += 1

    @property
    def busy(self) -> float:
        """Seconds waiting plus computing."""
        return self.data_wait + self.compute


@dataclass
class Window:
    """What the next train row averages: the per-step sums of the task's loss values (``names``, ``loss``
    first) and the steps summed, which checkpoints keep (:meth:`saved`) so a row straddling a resume is
    unchanged; and the :class:`Timing` of those steps in this process, which they do not."""

    names: tuple[str, ...] = ("loss",)
    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    timing: Timing = field(default_factory=Timing)

    def __post_init__(self) -> None:
        self.sums = {n: self.sums.get(n, 0.0) for n in self.names}

    def add(self, values: dict[str, float], data_wait: float, compute: float) -> None:
        """Add one step's loss values (a mapping with every name) and its timing in seconds."""
        for n in self.names:
            self.sums[n] += values[n]
        self.steps += 1
        self.timing.add(data_wait, compute)

    def mean(self, name: str) -> float:
        """The mean of ``name`` over the window's steps (the window must hold at least one)."""
        return self.sums[name] / self.steps

    def saved(self) -> list[float]:
        """``[sum of each name..., steps]``: the checkpoints' ``log_window``."""
        return [*self.sums.values(), self.steps]

    def restore(self, saved: list[float]) -> None:
        """Take the sums and steps back from a checkpoint's ``log_window`` (:meth:`saved`'s layout)."""
        *sums, self.steps = saved
        self.sums = dict(zip(self.names, sums, strict=True))

    def reset(self) -> None:
        """Empty the window after a train row."""
        self.sums = dict.fromkeys(self.names, 0.0)
        self.steps = 0
        self.timing = Timing()


def _every(count: int, interval: int | None) -> bool:
    return bool(interval) and count % interval == 0


@dataclass(frozen=True)
class Cadence:
    """When the loop writes a train row, validates and checkpoints: every ``log_every`` steps, every
    ``*_steps`` steps (0 or None: never), at the end of every ``*_epochs``-th epoch (0: never), and always
    after the last step."""

    log_every: int
    eval_steps: int | None = None
    ckpt_steps: int | None = None
    eval_epochs: int = 0
    ckpt_epochs: int = 0

    def log_due(self, step: int, finished: bool) -> bool:
        return finished or step % self.log_every == 0

    def eval_due(self, step: int, epoch: int, epoch_end: bool, finished: bool) -> bool:
        return finished or _every(step, self.eval_steps) or (epoch_end and _every(epoch, self.eval_epochs))

    def ckpt_due(self, step: int, epoch: int, epoch_end: bool, finished: bool) -> bool:
        return finished or _every(step, self.ckpt_steps) or (epoch_end and _every(epoch, self.ckpt_epochs))


# ----- the run directory ---------------------------------------------------------------------------------------


class Metrics:
    """``metrics.jsonl`` (and TensorBoard when asked and installed); written by the main rank only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.warning("tensorboard=true but the tensorboard package is not installed; writing metrics.jsonl only")

    def truncate(self, last_step: int) -> None:
        """Drop rows a killed run wrote after its last checkpoint, so a resumed file reads like an unbroken one."""
        if not (self.enabled and self.path.is_file()):
            return
        rows = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= last_step]
        atomic_write(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (a JSON object with ``step`` and ``split``); a full disk raises ParameterNetError."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise (fs_error(self.path, e) or e) from None
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(
                        f"{row['split']}{'_' + row['weights'] if 'weights' in row else ''}/{k}", v, row["step"]
                    )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----- the task ------------------------------------------------------------------------------------------------


class TrainTask:
    """One kind of training, driven by :class:`RunLoop`.

    ``__init__`` opens the run directory and calls the subclass's :meth:`build` (data, model, optimizer,
    ``total_steps``; ``step`` starts at 0), then :meth:`load_checkpoint` when the run resumes. The recipe
    ``cfg`` is a :class:`~parameternet.train.recipe.RunConfig` (its ``threads`` are set here). The loop reads
    ``step`` (optimizer steps done), :attr:`last_step`, ``epoch``, ``window``, ``cadence``, ``ddp`` (the module
    the steps run), ``optimizer`` and ``progress_desc``, and calls the methods below. ``window`` names the loss
    values :meth:`train_step` returns; ``cfg.tensorboard`` mirrors the rows to TensorBoard when it is installed.
    A recipe with ``parallel: fsdp`` makes :attr:`sharded` true: the task writes sharded checkpoints on every
    process (``CheckpointManager.save_sharded``) and resumes only those.
    Raises ParameterNetError (one sentence) for a resume that cannot be honoured (:func:`discover_resume`,
    :meth:`check_resume`) or that would change the run's recipe (:func:`check_resume_recipe`).
    """

    progress_desc = "train"
    nan_hint = "lower optim.lr or set optim.clip_grad"  # the end of the NaN guard's message: the recipe keys to change
    restart_hint = "start a new output_dir"  # the end of check_resume_recipe's refusal: how this task starts afresh
    epoch = 0  # tasks without epochs stay at 0; their Cadence has no epoch intervals

    def __init__(self, cfg: RunConfig, dist: D.DistInfo, stop: StopSignal | None, window: Window):
        self.cfg, self.dist, self.stop, self.device = cfg, dist, stop, dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        self.sharded = cfg.parallel == "fsdp"
        self.resume_source, self.saved_world = None, None  # the checkpoint's weights and its number of processes
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.keep_last)
        resume_from = discover_resume(cfg.resume, self.ckpt)
        self.resume_from = resume_from  # the .state.pt this run resumes from, None for a new run
        if resume_from is not None:
            self.check_resume(resume_from)
            check_resume_recipe(cfg, resume_from, self.restart_hint)
        self.window = window
        self.step = 0
        self.build()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.metrics = Metrics(self.out, dist.is_main, cfg.tensorboard)
        # rows after the checkpoint resumed from (or all rows, for a run that never completed a checkpoint)
        self.metrics.truncate(self.step)

    def run(self) -> dict[str, Any]:
        """Train to :attr:`last_step` (or return the summary of a complete run) and return the summary."""
        return RunLoop(self).run()

    @property
    def last_step(self) -> int:
        """The step this run ends at: ``total_steps`` (the length of its schedule), unless a task stops earlier on
        the same schedule (a run to a branch point)."""
        return self.total_steps

    # what a task supplies
    def check_resume(self, state_path: Path) -> None:
        """Refuse (ParameterNetError, one sentence) a checkpoint this task cannot continue from as it is set up,
        before the recipes are compared: an FSDP run continues only a sharded checkpoint and a DDP run only a whole
        one. Sets :attr:`resume_source` (the checkpoint's weights) and :attr:`saved_world` (its processes, when
        recorded)."""
        source, meta = recorded_metadata(state_path)
        sharded = sharded_dir(state_path).is_dir()
        if sharded != self.sharded:
            was, how = ("sharded", "fsdp") if sharded else ("whole", "ddp")
            now = "fsdp" if self.sharded else "ddp"
            raise ParameterNetError(
                f"checkpoint {str(source)!r} holds {was} weights written with parallel={how}, and this run has "
                f"parallel={now}; resume it with parallel={how}, or start a new output_dir"
            )
        self.resume_source, self.saved_world = source, meta.get("world_size")

    # what a task supplies

    def build(self) -> None:
        """Build the data, model and optimizer and set ``total_steps``, ``ddp`` and ``cadence``."""
        raise NotImplementedError

    def load_checkpoint(self, state_path: Path) -> None:
        """Restore the weights and training state of the checkpoint whose ``.state.pt`` is ``state_path``
        (``window`` via :meth:`Window.restore`); ParameterNetError when it belongs to another recipe."""
        raise NotImplementedError

    def save_checkpoint(self) -> None:
        """Write the step checkpoint of ``step`` (the main rank writes; the others return)."""
        raise NotImplementedError

    def next_batch(self) -> Any:
        """The next step's data (the loop times it as data wait); None for a task whose step reads its own."""
        return None

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on ``batch``; advances ``step`` and returns the step's loss values (every name of
        ``window``, averaged over ranks so every rank sees the same numbers)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each step has passed the NaN guard, before its row; nothing by default."""

    def end_step(self) -> bool:
        """Advance the data position after a step; True when an epoch ended (tasks without epochs: False)."""
        return False

    def validate(self) -> None:
        """Evaluate and write the validation rows."""
        raise NotImplementedError

    def train_row(self, window: Window) -> dict[str, Any]:
        """The train row of ``metrics.jsonl`` for a window of at least one step."""
        raise NotImplementedError

    def log_train(self, row: dict[str, Any], window: Window) -> None:
        """Log a train row (main rank, no progress bar)."""

    def postfix(self, values: dict[str, float], seconds: float) -> dict[str, str]:
        """The progress bar's fields after a step of ``seconds`` with loss ``values``."""
        return {"loss": f"{values['loss']:.4f}", "lr": f"{peak_lr(self.optimizer):.2e}"}

    def where(self) -> str:
        """Where the run stands, for the NaN guard's message after ``at step N`` (e.g. ``" (epoch 2)"``)."""
        return ""

    def log_start(self) -> None:
        """Log what is about to train."""

    def finish(self, wall: float, timing: Timing) -> dict[str, Any]:
        """Write the final outputs and return the summary of this session (``wall`` seconds of steps timed by
        ``timing``); the loop writes it to ``summary.json``."""
        raise NotImplementedError

    def log_done(self, summary: dict[str, Any]) -> None:
        """Log the summary (main rank)."""


# ----- the loop ------------------------------------------------------------------------------------------------


class RunLoop:
    """Runs a :class:`TrainTask` to its last step: see the module docstring for what it owns."""

    def __init__(self, task: TrainTask):
        self.task = task
        self.bar = None

    def run(self) -> dict[str, Any]:
        """The run's summary: read from ``summary.json`` when the run is already complete, else trained for and
        written. Raises RunInterrupted on SIGINT / SIGTERM (after a checkpoint), ParameterNetError on a
        non-finite loss."""
        t = self.task
        summary_path = t.out / "summary.json"
        if t.step >= t.last_step and summary_path.is_file():
            log.info("run in %s is already complete (%d steps)", t.out, t.step)
            t.metrics.close()
            return json.loads(summary_path.read_text())
        t.log_start()
        timing = Timing()
        start = time.perf_counter()
        try:
            self._open_bar()
            self._steps(timing)
        finally:
            if self.bar is not None:
                self.bar.close()
        wall = time.perf_counter() - start
        try:
            summary = t.finish(wall, timing)
            if t.dist.is_main:
                atomic_write(summary_path, json.dumps(summary, indent=1) + "\n")
        finally:
            t.metrics.close()
        if t.dist.is_main:
            t.log_done(summary)
        return summary

    def _open_bar(self) -> None:
        t = self.task
        if t.dist.is_main and t.cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=t.last_step, initial=t.step, unit="step", dynamic_ncols=True, desc=t.progress_desc)

    def _steps(self, timing: Timing) -> None:
        t, cadence = self.task, self.task.cadence
        t.ddp.train()
        while t.step < t.last_step:
            t0 = time.perf_counter()
            batch = self._fetch()
            t1 = time.perf_counter()
            values = t.train_step(batch)
            t2 = time.perf_counter()
            self._check_finite(values["loss"])
            t.after_step()
            t.window.add(values, t1 - t0, t2 - t1)
            timing.add(t1 - t0, t2 - t1)
            epoch_end = t.end_step()
            finished = t.step == t.last_step
            if self.bar is not None:
                self.bar.set_postfix(**t.postfix(values, t2 - t0), refresh=False)
                self.bar.update(1)
            if cadence.log_due(t.step, finished):
                self._write_train_row()
            if cadence.eval_due(t.step, t.epoch, epoch_end, finished):
                t.validate()
            saved = cadence.ckpt_due(t.step, t.epoch, epoch_end, finished)
            if saved:
                t.save_checkpoint()
            if not finished and self._stop_requested():
                self._interrupt(saved)

    def _fetch(self) -> Any:
        try:
            return self.task.next_batch()
        except Exception:
            if self._stop_requested():  # Ctrl-C also stops a loader's workers: save what the step has
                self._interrupt()
            raise

    def _check_finite(self, loss: float) -> None:
        """The NaN guard: stop at the first non-finite loss, naming the last good checkpoint."""
        if math.isfinite(loss):
            return
        t = self.task
        latest = t.ckpt.latest()
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written"
        raise ParameterNetError(
            f"training loss became {loss} at step {t.step}{t.where()}; stopped and {kept}; {t.nan_hint}"
        )

    def _write_train_row(self) -> None:
        t = self.task
        if t.window.steps == 0:
            return
        row = t.train_row(t.window)
        t.metrics.write(row)
        if self.bar is None and t.dist.is_main:
            t.log_train(row, t.window)
        t.window.reset()

    def _stop_requested(self) -> bool:
        """Whether SIGINT / SIGTERM arrived (on any rank: the ranks agree, so all of them stop at the same step)."""
        t = self.task
        flag = t.stop is not None and t.stop.requested
        if t.dist.distributed:
            flag = D.all_reduce_sum(torch.tensor([float(flag)], device=t.device)).item() > 0
        return flag

    def _interrupt(self, saved: bool = False) -> None:
        t = self.task
        if not saved:
            t.save_checkpoint()
        D.barrier()
        path = t.ckpt.written(t.step)
        raise RunInterrupted(t.stop.signum if t.stop and t.stop.signum else 2, t.step, path)


def run_locked(
    device: str, output_dir: str, make: Callable[[D.DistInfo, StopSignal], TrainTask], group: bool = False
) -> dict[str, Any]:
    """Set up the process (group) for ``device``, hold ``output_dir/run.lock`` (main rank) and the SIGINT /
    SIGTERM handlers, and run the task ``make(dist, stop)`` builds; returns its summary. ``group``: a process
    group even in one process (see :func:`parameternet.train.distributed.setup`).

    Raises ParameterNetError when another live process holds the lock, RunInterrupted after a signal (a second
    SIGINT exits at once).
    """
    dist = D.setup(device, group)
    try:
        lock = RunLock(output_dir) if dist.is_main else contextlib.nullcontext()
        with lock, StopSignal() as stop:
            return make(dist, stop).run()
    finally:
        D.cleanup()
