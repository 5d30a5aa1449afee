"""Language-model training: ``parameternet lm-train RECIPE.yaml [key=value ...]`` (paper section 5.4, Table 7).

The recipe is a YAML file loaded into :class:`LMTrainConfig` (sections ``model``, ``data``, ``optim``,
``schedule``), with dotted ``key=value`` overrides checked like the vision recipes. The loop is small and shares
the vision trainer's machinery: torchrun process groups and metric reduction (``train.distributed``), atomic
safetensors checkpoints with a separate training state (``train.checkpoint``), and ``metrics.jsonl``.

What the paper fixes: AdamW, learning rate 3e-4, cosine decay to 10% of the peak after a linear warmup, every
token seen once (training windows are a seeded permutation of non-overlapping ``seq_len`` windows, the same
for every model of an experiment). Gradient accumulation splits a step's ``batch_size`` sequences into
``grad_accum`` micro-batches. The loss is the model's: next-token cross-entropy plus the weighted router losses.

A run killed at any point resumes (``resume=auto``) from its last checkpoint with the same data order and
ends with the same weights on CPU. The output directory holds ``metrics.jsonl``, ``checkpoints/``,
``summary.json`` and ``model/``: ``save_pretrained`` output with the tokenizer, which loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` after ``import parameternet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from parameternet.errors import ParameterNetError
from parameternet.runs import RunInterrupted, RunLock, StopSignal, atomic_write, fs_error
from parameternet.toolkit import seed_all as _seed_all
from parameternet.train import distributed as D
from parameternet.train.checkpoint import CheckpointManager, load_into, load_state, load_weights
from parameternet.train.config import _coerce, apply_overrides
from parameternet.train.trainer import _Metrics

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
class LMTrainConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: LMDataConfig = field(default_factory=LMDataConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    schedule: LMScheduleConfig = field(default_factory=LMScheduleConfig)
    seed: int = 0  # weight initialisation
    batch_size: int = 32  # sequences per optimizer step, across all ranks
    grad_accum: int = 1
    max_tokens: int | None = None  # training tokens; steps = max_tokens // (batch_size * seq_len)
    max_steps: int | None = None  # overrides max_tokens
    eval_batch_size: int = 32
    eval_every_steps: int = 0  # 0 = at the end only
    eval_tokens: int | None = None  # validation tokens per evaluation; None = all
    zero_shot_items: int = 300  # items per zero-shot task at the end; 0 = skip
    log_every: int = 10
    ckpt_every_steps: int = 100
    keep_last: int = 2
    output_dir: str = "runs/lm"
    resume: str | None = None  # auto = the last checkpoint in output_dir
    device: str = "auto"
    amp: str = "none"  # none | bf16: training under bf16 autocast (evaluation stays float32)
    threads: int | None = None  # torch intra-op threads; None = torch's default
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> LMTrainConfig:
        from parameternet.models.llama_moe import MOE_PROJECTIONS, ParameterNetLlamaConfig

        checks = [
            (self.batch_size > 0, "batch_size", "a positive integer"),
            (self.grad_accum > 0 and self.batch_size % self.grad_accum == 0, "grad_accum", "a divisor of batch_size"),
            ((self.max_steps or 0) > 0 or (self.max_tokens or 0) > 0, "max_tokens", "positive (or set max_steps)"),
            (self.data.seq_len > 1, "data.seq_len", "at least 2"),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (len(self.optim.betas) == 2, "optim.betas", "two numbers"),
            (0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "between 0 and 1"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps", "0 or more"),
            (self.log_every >= 1, "log_every", "at least 1"),
            (self.amp in ("none", "bf16"), "amp", "none or bf16"),
            (self.keep_last >= 1, "keep_last", "at least 1"),
            (self.model.num_attention_heads > 0, "model.num_attention_heads", "a positive integer"),
            (self.model.hidden_size > 0, "model.hidden_size", "a positive integer"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ParameterNetError(f"{key}={_get(self, key)!r} is invalid; it must be {what}")
        if self.data.dir is not None and not Path(self.data.dir).expanduser().is_dir():
            raise ParameterNetError(
                f"data.dir={self.data.dir!r} does not exist; prepare it with `parameternet lm-data --out "
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
                    f"Unknown projection {name!r} in model.moe_projections; choose from {', '.join(MOE_PROJECTIONS)}."
                )
        ParameterNetLlamaConfig(**dataclasses.asdict(self.model))  # its own checks (experts per token, capacity)
        return self

    @property
    def total_steps(self) -> int:
        if self.max_steps:
            return self.max_steps
        return max(1, self.max_tokens // (self.batch_size * self.data.seq_len))


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out += (
            _keys(hints[f.name], f"{prefix}{f.name}.") if dataclasses.is_dataclass(hints[f.name]) else [prefix + f.name]
        )
    return out


def _check_key(key: str, where: str) -> None:
    valid = _keys(LMTrainConfig)
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
    raise ParameterNetError(f"unknown recipe key {key!r}{where}; {hint}")


def _flatten(data: Any, prefix: str, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ParameterNetError(f"recipe section {prefix.rstrip('.') or 'top level'}{where} must be a mapping")
    hints = typing.get_type_hints(LMTrainConfig)
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix and k in sections:
            out.update(_flatten(v, key + ".", where))
        else:
            out[key] = v
    return out


def load_lm_config(path: str | Path | None, overrides: list[str] = ()) -> LMTrainConfig:
    """Load a YAML recipe (or the defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ParameterNetError(f"recipe {str(path)!r} {what}; pass a YAML file such as configs/lm-small.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raise ParameterNetError(f"recipe {str(path)!r} is not valid YAML; fix the syntax") from None
        where = f" in {path}"
    cfg = LMTrainConfig()
    for key, value in _flatten(data, "", where).items():
        _check_key(key, where)
        *parents, leaf = key.split(".")
        obj = _get(cfg, ".".join(parents)) if parents else cfg
        setattr(obj, leaf, _coerce(value, typing.get_type_hints(type(obj))[leaf], key))
    for item in overrides:
        _check_key(item.split("=", 1)[0].strip(), " in the overrides")
    apply_overrides(cfg, list(overrides))
    return cfg.validate()


# --- the loop --------------------------------------------------------------------------------------------------


class LMTrainer:
    """Builds the data, tokenizer and model a recipe names and trains; ``run()`` returns the summary."""

    def __init__(self, cfg: LMTrainConfig, dist: D.DistInfo, stop: StopSignal | None = None):
        from parameternet.data.text import prepare_text_data

        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.stop = stop
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % (dist.world_size * cfg.grad_accum):
            raise ParameterNetError(
                f"batch_size={cfg.batch_size} does not split into {dist.world_size} process(es) x "
                f"grad_accum={cfg.grad_accum} micro-batches; use a multiple of {dist.world_size * cfg.grad_accum}"
            )
        self.micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)
        self.out = Path(cfg.output_dir)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.keep_last)
        resume_from = self._find_resume()
        if resume_from is None and self.ckpt.steps() and cfg.resume == "auto":
            skipped = "; ".join(f"{t}: {r}" for t, r in self.ckpt.skipped)
            raise ParameterNetError(
                f"output_dir {str(self.out)!r} holds no complete checkpoint ({skipped}); choose another output_dir "
                f"or delete {str(self.ckpt.dir)!r} to start over"
            )
        if resume_from is None and self.ckpt.steps():
            raise ParameterNetError(
                f"output_dir {str(self.out)!r} already holds checkpoints; pass resume=auto to continue that run "
                f"or choose another output_dir"
            )
        d = cfg.data
        prep = dict(
            corpora=d.corpora, vocab_size=d.vocab_size, val_fraction=d.val_fraction, eval_fraction=d.eval_fraction
        )
        if dist.is_main:  # one process trains the tokenizer; the others wait and load it
            self.data = prepare_text_data(d.dir, **prep)
        D.barrier()
        if not dist.is_main:
            self.data = prepare_text_data(d.dir, **prep)
        self.tokenizer = self.data.tokenizer()
        self.train_tokens = self.data.tokens("train")
        self.n_windows = len(self.train_tokens) // d.seq_len

        _seed_all(cfg.seed)
        self.model = self._build_model().to(self.device)
        self.params = self.model.num_parameters()
        self.ddp = self.model
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._build_optim()
        self.step = 0
        # since the last train row: loss, lm loss, aux loss sums and steps (saved in checkpoints, so rows straddling
        # a resume are unchanged); seconds and steps timed in this process
        self.window = [0.0, 0.0, 0.0, 0, 0.0, 0]
        self.last_val: dict[str, float] = {}
        if resume_from is not None:
            self._resume(resume_from)
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.metrics = _Metrics(self.out, dist.is_main, False)
        # rows after the checkpoint resumed from (or all rows, for a run that never completed a checkpoint)
        self.metrics.truncate(self.step)

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
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # matrices, expert banks, embeddings
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]  # norms, biases
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.total_steps = self.cfg.total_steps
        warmup = min(s.warmup_steps, self.total_steps - 1)
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=self.total_steps - warmup,
            lr_min=o.lr * s.min_lr_ratio,
            warmup_t=warmup,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
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
    def _find_resume(self) -> Path | None:
        r = self.cfg.resume
        if r is None:
            return None
        if r == "auto":
            return self.ckpt.latest()
        p = Path(r)
        if not p.is_file():
            raise ParameterNetError(f"resume={r!r} does not exist; use resume=auto or a checkpoint's .state.pt")
        reason = CheckpointManager(p.parent).verify(p.name.removesuffix(".state.pt"))
        if reason is not None:
            raise ParameterNetError(
                f"resume={r!r} is incomplete ({reason}); use resume=auto, which takes the newest complete checkpoint"
            )
        return p

    def _save_step(self) -> None:
        if not self.dist.is_main:
            return
        state = {
            "step": self.step,
            "batch_size": self.cfg.batch_size,
            "seq_len": self.cfg.data.seq_len,
            "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "log_window": self.window[:4],
            "last_val": self.last_val,
        }
        meta = {"kind": "parameternet-lm", "step": self.step, "config": self.cfg.to_dict()}
        self.ckpt.save_step(self.step, self.model.state_dict(), None, state, meta)

    def _resume(self, state_path: Path) -> None:
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
        weights = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
        load_into(self.model, load_weights(weights)[0], str(weights), strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.window[:4] = state["log_window"]
        self.last_val = state.get("last_val", {})
        self.scheduler.step_update(self.step)
        log.info("resumed from %s at step %d", state_path, self.step)

    def _save_final(self, name: str = "model", extra: dict[str, str] | None = None) -> Path:
        """``<out>/<name>/``: save_pretrained output plus the tokenizer (and ``extra`` text files), written to a
        temporary directory and renamed over the old one."""
        final = self.out / name
        if self.dist.is_main:
            try:
                with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=self.out) as tmp:
                    staged = Path(tmp) / name
                    self.model.save_pretrained(staged)
                    self.tokenizer.save_pretrained(staged)
                    for file, text in (extra or {}).items():
                        (staged / file).write_text(text)
                    if final.exists():
                        final.rename(Path(tmp) / "old")
                    staged.rename(final)
            except OSError as e:
                raise (fs_error(final, e) or e) from None
        D.barrier()
        return final

    # ----- the loop -----
    def _autocast(self):
        enabled = self.cfg.amp == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _train_step(self) -> tuple[float, float, float]:
        cfg = self.cfg
        _seed_all(D.mix_seed(cfg.seed, self.dist.rank, self.step))
        ids = self._batch(self._windows(self.step))  # (micro * grad_accum, L)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64)
        coef, zcoef = cfg.model.router_aux_loss_coef, cfg.model.router_z_loss_coef
        for j, micro in enumerate(ids.split(self.micro)):
            last = j == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.distributed else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    out = self.ddp(input_ids=micro, labels=micro)
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
        loss, lm, aux = sums.tolist()
        if not math.isfinite(loss):
            latest = self.ckpt.latest()
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written"
            raise ParameterNetError(
                f"training loss became {loss} at step {self.step}; stopped and {kept}; "
                f"lower optim.lr or set optim.clip_grad"
            )
        return loss, lm, aux

    def _validate(self) -> None:
        v = self._validation_loss()  # float32 whatever amp says: comparable across runs
        self.last_val = v
        self.metrics.write({"step": self.step, "split": "val", **{k: round(x, 6) for k, x in v.items()}})
        if self.dist.is_main:
            log.info("step %d  val loss %.4f  ppl %.2f  (%d tokens)", self.step, v["loss"], v["ppl"], v["tokens"])

    def _validation_loss(self) -> dict[str, float]:
        from parameternet.train.lm_eval import validation_loss

        return validation_loss(
            self.model,
            self.data.tokens("val"),
            self.cfg.data.seq_len,
            self.cfg.eval_batch_size,
            self.cfg.eval_tokens,
            self.device,
            self.dist.rank,
            self.dist.world_size,
        )

    def _log_train(self, bar) -> None:
        loss, lm, aux, n, seconds, timed = self.window
        if n == 0:
            return
        tokens = self.cfg.batch_size * self.cfg.data.seq_len
        row = {
            "step": self.step,
            "split": "train",
            "loss": round(loss / n, 6),
            "lm_loss": round(lm / n, 6),
            "aux_loss": round(aux / n, 6),
            "lr": self._lr(),
            "tokens": self.step * tokens,
            "tokens_per_s": round(timed * tokens / seconds, 1) if seconds else None,
        }
        self.metrics.write(row)
        if bar is None and self.dist.is_main:
            log.info(
                "step %d/%d  loss %.4f  lm %.4f  aux %.4f  lr %.2e  %s tokens/s",
                self.step, self.total_steps, row["loss"], row["lm_loss"], row["aux_loss"], row["lr"],
                row["tokens_per_s"],
            )  # fmt: skip
        self.window[:] = [0.0, 0.0, 0.0, 0, 0.0, 0]

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.step >= self.total_steps and (self.out / "summary.json").is_file():
            log.info("run in %s is already complete (%d steps)", self.out, self.step)
            return json.loads((self.out / "summary.json").read_text())
        if self.dist.is_main:
            log.info(
                "training %.2fM-parameter LLaMA (experts on %s) for %d steps of %d x %d tokens on %s",
                self.params / 1e6, cfg.model.moe_projections or "nothing", self.total_steps, cfg.batch_size,
                cfg.data.seq_len, self.device,
            )  # fmt: skip
        bar = None
        if self.dist.is_main and cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="lm")
        start, steps = time.perf_counter(), 0
        self.ddp.train()
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss, lm, aux = self._train_step()
                dt = time.perf_counter() - t0
                for i, value in enumerate((loss, lm, aux, 1, dt, 1)):
                    self.window[i] += value
                steps += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}", refresh=False)
                    bar.update(1)
                finished = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or finished:
                    self._log_train(bar)
                if finished or (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0):
                    self._validate()
                saved = finished or self.step % cfg.ckpt_every_steps == 0
                if saved:
                    self._save_step()
                if not finished and self._stop_requested():
                    if not saved:
                        self._save_step()
                    D.barrier()
                    path = self.ckpt.dir / f"step_{self.step:07d}.safetensors"
                    raise RunInterrupted(self.stop.signum or 2, self.step, path)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - start
        final = self._save_final()
        zero_shot = self._zero_shot() if cfg.zero_shot_items else {}
        summary = {
            "output_dir": str(self.out),
            "params": self.params,
            "moe_projections": cfg.model.moe_projections,
            "num_experts": cfg.model.num_experts if cfg.model.moe_projections else 0,
            "seed": cfg.seed,
            "steps": self.step,
            "tokens": self.step * cfg.batch_size * cfg.data.seq_len,
            "session_steps": steps,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(steps * cfg.batch_size * cfg.data.seq_len / max(wall, 1e-9), 1),
            "val": self.last_val,
            "zero_shot": zero_shot,
            "model_dir": str(final),
        }
        if self.dist.is_main:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
            self.metrics.close()
            log.info("done: val loss %.4f (ppl %.2f); model in %s", self.last_val["loss"], self.last_val["ppl"], final)
        return summary

    def _stop_requested(self) -> bool:
        """Whether SIGINT / SIGTERM arrived on any rank (the ranks agree, so all stop at the same step)."""
        flag = self.stop is not None and self.stop.requested
        if self.dist.distributed:
            flag = D.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0
        return flag

    def _zero_shot(self) -> dict[str, dict]:
        from parameternet.data.zero_shot import build_tasks
        from parameternet.train.lm_eval import score_choices

        if not self.dist.is_main:
            return {}
        tasks = build_tasks(self.data.documents("eval"), self.cfg.zero_shot_items)
        out = {}
        for name, items in tasks.items():
            out[name] = score_choices(
                self.model, self.tokenizer, items, self.cfg.data.seq_len, self.cfg.eval_batch_size, self.device
            )
            self.metrics.write({"step": self.step, "split": f"zero_shot/{name}", **out[name]})
            log.info("zero-shot %s: acc %.4f  acc_norm %.4f  (%d items)", name, out[name]["acc"], out[name]["acc_norm"],
                     out[name]["items"])  # fmt: skip
        return out


def train_lm(cfg: LMTrainConfig) -> dict[str, Any]:
    """Run a validated LM recipe (one process or one rank of torchrun) and return its summary.

    Like :func:`parameternet.train.trainer.train`: ``output_dir/run.lock`` held for the run (ParameterNetError
    when another live process holds it), SIGINT / SIGTERM save a checkpoint and raise ``RunInterrupted``.
    """
    dist = D.setup(cfg.device)
    try:
        lock = RunLock(cfg.output_dir) if dist.is_main else contextlib.nullcontext()
        with lock, StopSignal() as stop:
            return LMTrainer(cfg, dist, stop).run()
    finally:
        D.cleanup()
