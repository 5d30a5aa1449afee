"""The wall time of an ``lm experiment`` preset before it runs (``--estimate``): one-thread training and evaluation
throughput measured here (:func:`measure_tokens_per_s`) times the preset's tokens (:func:`estimate_wall_s`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from parameternet.errors import ParameterNetError
from parameternet.experiments.lm_grid import DENSE, Variant, check_inputs, check_jobs, hardware

if TYPE_CHECKING:
    from parameternet.experiments.lm import Preset

__all__ = ["estimate_text", "estimate_wall_s", "measure_tokens_per_s"]


def measure_tokens_per_s(recipe: str = "configs/lm-small.yaml", overrides: Sequence[str] = (), steps: int = 6):
    """Training tokens per second of one torch thread for dense and 8 experts on ``down_proj`` (``dense``,
    ``moe``: the recipe's size, batch, sequence length and ``amp``), timed over ``steps`` steps after two warm-up
    steps, and evaluation tokens per second (``dense_eval``, ``moe_eval``: forward passes of ``eval_batch_size``
    windows in float32 without gradients, as validation runs); the median step, random tokens."""
    import torch

    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
    from parameternet.train.lm import load_lm_config

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, variant in (("dense", Variant(None)), ("moe", Variant("down_proj", 8))):
            cfg = load_lm_config(recipe, [*overrides, *variant.overrides()])
            m, d = cfg.model, cfg.data
            config = ParameterNetLlamaConfig(
                vocab_size=d.vocab_size, max_position_embeddings=d.seq_len, **dataclasses.asdict(m)
            )
            torch.manual_seed(0)
            model = ParameterNetLlamaForCausalLM(config).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(3, d.vocab_size, (cfg.batch_size, d.seq_len))
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.float().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            times.sort()
            out[name] = cfg.batch_size * d.seq_len / times[len(times) // 2]
            model.eval()
            ids = torch.randint(3, d.vocab_size, (cfg.eval_batch_size, d.seq_len))
            times = []
            with torch.no_grad():
                for i in range(steps + 2):
                    t0 = time.perf_counter()
                    model(input_ids=ids)
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
            times.sort()
            out[f"{name}_eval"] = cfg.eval_batch_size * d.seq_len / times[len(times) // 2]
    finally:
        torch.set_num_threads(prev)
    return out


def estimate_wall_s(
    preset: Preset, tokens_per_s: dict[str, float], train_tokens: int, val_tokens: int, per_step: int, jobs: int = 2
) -> dict[str, float]:
    """Wall seconds of ``preset`` with ``jobs`` one-thread runs side by side at ``tokens_per_s`` (``dense``,
    ``moe``): training tokens at that speed, evaluations (forward only) at three times it, classifier steps at it.
    Returns the total and the part of each kind; a lower bound when runs cannot pair up at the end."""
    p = preset
    val_tokens = min(val_tokens, p.eval_tokens) if p.eval_tokens else val_tokens
    tokens = p.main_tokens or int(train_tokens * p.corpus_fraction) // per_step * per_step
    steps = tokens // per_step
    evals = steps // p.eval_every + 1
    parts = {"lr": 0.0, "main": 0.0, "upcycle": 0.0, "cls": 0.0}
    for v in p.lr_variants:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["lr"] += len(p.lrs) * (p.lr_tokens + val_tokens / 3) / speed
    for v, seeds in p.main:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["main"] += len(seeds) * (tokens + evals * val_tokens / 3) / speed
    parts["upcycle"] = len(p.upcycle_seeds) * (tokens / 2 + (evals / 2 + 1) * val_tokens / 3) / tokens_per_s["moe"]
    cls_tokens = p.cls.get("steps", 300) * p.cls.get("batch_size", 16) * p.cls.get("max_len", 128)
    for v in p.cls_variants:
        speed = tokens_per_s["dense" if v == DENSE else "moe"]
        parts["cls"] += len(p.cls_seeds) * cls_tokens / speed
    total = sum(parts.values()) / jobs
    return {"total": total, **{k: x / jobs for k, x in parts.items()}, "main_tokens": tokens}


def estimate_text(recipe: str, preset: Preset, overrides: Sequence[str] = (), jobs: int = 2) -> str:
    """Measure 1-thread tokens/s here and estimate the preset's wall time with ``jobs`` one-thread runs side by side,
    at its corpus share and at the whole. Raises ParameterNetError for ``jobs`` below 1 or a bad override (as
    :func:`run_lm_experiment` does), or a recipe that trains on a GPU (the measurement is of CPU steps)."""
    from parameternet.data.text import prepare_text_data

    check_jobs(jobs)
    cfg = check_inputs(preset, recipe, overrides)
    if hardware(cfg.device)["device"] != "cpu":
        raise ParameterNetError(
            f"--estimate times one-thread CPU steps, and preset {preset.name!r} trains on a GPU (device="
            f"{cfg.device}); run it without --estimate"
        )
    d = cfg.data
    data = prepare_text_data(
        d.dir, corpora=d.corpora, vocab_size=d.vocab_size, val_fraction=d.val_fraction, eval_fraction=d.eval_fraction
    )
    train, val = int(data.manifest["tokens"]["train"]), int(data.manifest["tokens"]["val"])
    speed = measure_tokens_per_s(recipe, [*preset.overrides, *overrides])
    per_step = cfg.batch_size * d.seq_len
    lines = [
        f"measured training throughput, one torch thread: dense {speed['dense']:.0f} tokens/s, "
        f"MoE-8 down {speed['moe']:.0f} tokens/s (recipe {recipe}, batch {cfg.batch_size} x {d.seq_len})"
    ]
    variants = [(preset, preset.main_tokens is None and preset.corpus_fraction)]
    if preset.main_tokens is None and preset.corpus_fraction != 1.0:
        variants.append((dataclasses.replace(preset, corpus_fraction=1.0), 1.0))
    cores = (
        "1 core (one one-thread run at a time)" if jobs == 1 else f"{jobs} cores ({jobs} one-thread runs side by side)"
    )
    for p, fraction in variants:
        est = estimate_wall_s(p, speed, train, val, per_step, jobs)
        share = f"{fraction:g} of the training split" if fraction else "fixed token budget"
        lines.append(
            f"preset {preset.name} with {share} ({est['main_tokens']:,} tokens per main run): about "
            f"{est['total'] / 3600:.1f} h on {cores}: lr check "
            f"{est['lr'] / 3600:.1f} h, main {est['main'] / 3600:.1f} h, upcycling {est['upcycle'] / 3600:.1f} h, "
            f"classifier {est['cls'] / 3600:.1f} h"
        )
    return "\n".join(lines)
