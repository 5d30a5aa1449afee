"""Checkpoints that never lose a run: safetensors weights plus a torch file of the training state.

A checkpoint at step S in ``OUTPUT_DIR/checkpoints/`` is

- ``step_000S.safetensors``: the model weights, with the model name, class count and the resolved recipe in
  the safetensors metadata, so ``parameternet eval`` and ``init_from`` need nothing else;
- ``step_000S.ema.safetensors``: the EMA weights, when the recipe keeps an EMA;
- ``step_000S.state.pt``: optimizer, scheduler, EMA, RNG and data-order state, written last, so a checkpoint
  without it is incomplete and ignored.

Every file is written to a temporary name in the same directory and moved into place with ``os.replace``;
the last ``keep_last`` step checkpoints are kept, plus ``best.*`` (best validation top-1) and ``final.*``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from parameternet.errors import ParameterNetError

__all__ = [
    "CheckpointManager",
    "load_state",
    "load_weights",
    "load_into",
    "resolve_weights",
    "save_weights",
    "state_path_for",
]

log = logging.getLogger(__name__)

FORMAT = "parameternet-checkpoint-1"
_STEP = re.compile(r"^step_(\d+)\.state\.pt$")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a state dict as safetensors, atomically; metadata values are stored as JSON strings."""
    # clone: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors checkpoint and its metadata; a damaged file raises ParameterNetError."""
    path = Path(path)
    if not path.is_file():
        raise ParameterNetError(f"checkpoint {str(path)!r} does not exist; pass a .safetensors file or a run directory")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ParameterNetError(f"checkpoint {str(path)!r} is corrupt or not safetensors ({e}); delete it") from None
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return tensors, meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ParameterNetError(
            f"checkpoint state {str(path)!r} is corrupt or unreadable ({type(e).__name__}); "
            f"delete it to resume from the checkpoint before"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ParameterNetError(f"{str(path)!r} is not a parameternet training state; point resume at a run directory")
    return state


def state_path_for(weights: Path) -> Path:
    name = weights.name.replace(".ema.safetensors", ".safetensors")
    return weights.with_name(name.replace(".safetensors", ".state.pt"))


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a .safetensors path, a state .pt, a ``checkpoints/`` directory or a run directory.

    A directory resolves to its ``final`` weights, else the latest step checkpoint.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.name.endswith(".state.pt"):
            return p.with_name(p.name.replace(".state.pt", ".safetensors"))
        return p
    if p.is_dir():
        ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if (ckdir / "final.safetensors").is_file():
            return ckdir / "final.safetensors"
        latest = CheckpointManager(ckdir).latest()
        if latest is not None:
            return latest.with_name(latest.name.replace(".state.pt", ".safetensors"))
        raise ParameterNetError(f"{str(p)!r} holds no checkpoint; train first or pass a .safetensors file")
    raise ParameterNetError(f"checkpoint {str(p)!r} does not exist; pass a .safetensors file or a run directory")


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool) -> None:
    """Load weights; shape mismatches always fail, missing / unexpected keys fail when ``strict``, else are logged."""
    own = model.state_dict()
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            raise ParameterNetError(
                f"checkpoint {source} has {k} of shape {tuple(v.shape)} but the model has {tuple(own[k].shape)}; "
                f"use the same model and model_kwargs as the run that wrote it"
            )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        first = (missing or unexpected)[0]
        raise ParameterNetError(
            f"checkpoint {source} does not match the model ({len(missing)} missing keys, {len(unexpected)} unexpected, "
            f"first {first!r}); use the model the run was trained with"
        )
    if missing:
        log.warning("init from %s: %d missing keys (left as initialised): %s", source, len(missing), missing[:8])
    if unexpected:
        log.warning("init from %s: %d unexpected keys (ignored): %s", source, len(unexpected), unexpected[:8])


class CheckpointManager:
    """Writes and finds the checkpoints of one run directory (only the main rank writes)."""

    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.dir = Path(directory)
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP.match(p.name)))

    def latest(self) -> Path | None:
        """The state file of the newest complete step checkpoint."""
        steps = self.steps()
        return self.dir / f"step_{steps[-1]:07d}.state.pt" if steps else None

    def save(self, tag: str, weights: dict, ema: dict | None, state: dict | None, metadata: dict) -> Path:
        """Write ``<tag>.safetensors`` (+ ``.ema``), then the state (the commit point); prune old steps."""
        path = self.dir / f"{tag}.safetensors"
        save_weights(path, weights, metadata)
        if ema is not None:
            save_weights(self.dir / f"{tag}.ema.safetensors", ema, {**metadata, "weights": "ema"})
        if state is not None:
            save_state(self.dir / f"{tag}.state.pt", {"format": FORMAT, **state})
            self._prune()
        return path

    def save_step(self, step: int, weights: dict, ema: dict | None, state: dict, metadata: dict) -> Path:
        return self.save(f"step_{step:07d}", weights, ema, state, metadata)

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            tag = f"step_{step:07d}"
            # the state goes first, so a half-pruned checkpoint is already invisible
            for suffix in (".state.pt", ".safetensors", ".ema.safetensors"):
                (self.dir / f"{tag}{suffix}").unlink(missing_ok=True)
