"""Checkpoints that never lose a run: safetensors weights plus a torch file of the training state.

A checkpoint at step S in ``OUTPUT_DIR/checkpoints/`` is

- ``step_000S.safetensors``: the model weights, with the one metadata schema of :mod:`parameternet.io` (model
  name, build arguments, class count, input channels and size, conversion steps, the resolved recipe) so
  ``parameternet eval`` / ``export`` / ``convert``, ``parameternet.load`` and ``init_from`` need nothing else;
- ``step_000S.ema.safetensors``: the EMA weights, when the recipe keeps an EMA;
- ``step_000S.state.pt``: optimizer, scheduler, EMA, RNG and data-order state;
- ``step_000S.manifest.json``: the size and sha256 of each file above, written last: the commit point.

A *sharded* checkpoint (an FSDP run, :meth:`CheckpointManager.save_sharded`) has ``step_000S.dcp/`` in place of
the weights: model and optimizer state written by every process with ``torch.distributed.checkpoint`` (DCP),
into a staging directory renamed into place once all have written, which reads back on any number of processes
(:func:`restore_sharded`); ``step_000S.state.pt`` holds the rest of the training state and the metadata the
weights file would (:func:`recorded_metadata`), and the manifest lists every file of both.

Every file goes through :func:`parameternet.runs.atomic_write` (temporary name in the same directory, fsync,
rename). ``latest()`` returns the newest checkpoint whose files all match their manifest and says which newer
ones it skipped (truncated, bit-flipped, half-written); a checkpoint written before manifests existed counts
when its state and weights load. The last ``keep_last`` step checkpoints are kept, plus ``best.*`` (best
validation top-1) and ``final.*``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parameternet.errors import ParameterNetError
from parameternet.io import load_weights, read_metadata, save_weights
from parameternet.runs import atomic_write, fs_error
from parameternet.toolkit import strip_wrapper_prefixes

__all__ = [
    "CheckpointManager",
    "gathered_state_dict",
    "load_state",
    "load_weights",
    "load_into",
    "match_fraction",
    "read_metadata",
    "recorded_metadata",
    "resolve_weights",
    "restore_rng_state",
    "restore_sharded",
    "rng_state",
    "save_weights",
    "sharded_dir",
    "sharded_state",
    "state_path_for",
]

log = logging.getLogger(__name__)

FORMAT = "parameternet-checkpoint-1"  # of the training state and the manifest (the weights' is parameternet.io's)
_STEP = re.compile(r"^step_(\d+)\.(?:state\.pt|manifest\.json)$")
MIN_MATCH = 0.9  # init_from / --checkpoint: the share of the model's tensors a checkpoint must fit


def _record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def match_fraction(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> float:
    """The share of ``model``'s tensors (names under ``skip`` aside) that ``state_dict`` has with the same shape."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    if not own:
        return 1.0
    return sum(1 for k, v in own.items() if k in state_dict and state_dict[k].shape == v.shape) / len(own)


def save_state(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    return _record(data)


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ParameterNetError(
            f"checkpoint state {str(path)!r} is corrupt or unreadable ({type(e).__name__}); "
            f"resume with resume=auto, which takes the newest complete checkpoint"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ParameterNetError(f"{str(path)!r} is not a parameternet training state; point resume at a run directory")
    return state


def sharded_dir(state_path: Path) -> Path:
    """The DCP directory of the checkpoint whose state file is ``state_path`` (it exists for a sharded one)."""
    return state_path.with_name(state_path.name.replace(".state.pt", ".dcp"))


def recorded_metadata(state_path: Path) -> tuple[Path, dict[str, Any]]:
    """``(source, metadata)`` of the checkpoint whose state file is ``state_path``: the weights file and its
    metadata (:func:`read_metadata`) for a full checkpoint, the DCP directory and the metadata its state file keeps
    for a sharded one."""
    shards = sharded_dir(state_path)
    if shards.is_dir():
        return shards, load_state(state_path).get("metadata", {})
    weights = state_path.with_name(state_path.name.replace(".state.pt", ".safetensors"))
    return weights, read_metadata(weights)


def sharded_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, others: dict[str, torch.nn.Module] | None = None
) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: the sharded (DTensor) state dicts of an FSDP2 model and its optimizer
    under their parameters' names (``torch.distributed.checkpoint.state_dict.get_state_dict``), what DCP writes
    and reads in place, plus one entry per module of ``others`` (another FSDP2 model without optimizer, e.g. an
    EMA of the weights: ``{"ema": module}``). Every process calls it (an optimizer without state yet gets one, with
    zeros)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    for name, module in (others or {}).items():
        state[name] = get_model_state_dict(module)
    return state


def restore_sharded(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    others: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Load a sharded checkpoint's DCP ``directory`` into an FSDP2 ``model``, its ``optimizer`` and the modules of
    ``others`` (:func:`sharded_state`'s), resharded to this run's processes whatever their number when it was
    written. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = sharded_state(model, optimizer, others)
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as e:  # DCP wraps every rank's failure in one CheckpointException
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ParameterNetError(
            f"sharded checkpoint {str(directory)!r} does not fit this model and optimizer ({first}); resume with the "
            f"recipe that wrote it, or start a new output_dir"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, module in (others or {}).items():
        set_model_state_dict(module, state[name])


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP2 model's whole state dict (parameters and buffers, plain CPU tensors) on the main process, ``{}`` on
    the others: what :meth:`CheckpointManager.save` and ``save_pretrained`` write. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rng_state(device: torch.device) -> dict[str, Any]:
    """The python, numpy, torch and (on a CUDA ``device``) CUDA generators' states, for a step checkpoint's
    training state; :func:`restore_rng_state` sets them back."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def restore_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    """Set the generators to a :func:`rng_state` (the CUDA ones only when it has them and ``device`` is CUDA)."""
    random.setstate(rng["python"])
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])


def _hash_file(path: Path) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def state_path_for(weights: Path) -> Path:
    name = weights.name.replace(".ema.safetensors", ".safetensors")
    return weights.with_name(name.replace(".safetensors", ".state.pt"))


def _sharded_weights_error(shards: Path) -> ParameterNetError:
    """The sentence for a sharded (FSDP) step checkpoint given where whole weights are read."""
    best = shards.parent / "best.safetensors"
    instead = f"use {str(best)!r} (the best weights, gathered whole), or " if best.is_file() else ""
    return ParameterNetError(
        f"checkpoint {str(shards)!r} is sharded by FSDP (a step checkpoint of a parallel=fsdp run), which only that "
        f"run's resume reads; {instead}finish the run with resume=auto parallel=fsdp, which writes "
        f"final.safetensors"
    )


def resolve_weights(path: str | Path) -> Path:
    """A weights file from a .safetensors path, a state .pt, a ``checkpoints/`` directory or a run directory.

    A directory resolves to its ``final`` weights, else the latest step checkpoint. Raises ParameterNetError for a
    path that does not exist, a directory without checkpoints, and a sharded (FSDP) step checkpoint (its
    ``step_N.dcp`` directory, its state file, or a run whose newest checkpoint it is): whole weights only.
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.name.endswith(".state.pt"):
            if sharded_dir(p).is_dir():
                raise _sharded_weights_error(sharded_dir(p))
            return p.with_name(p.name.replace(".state.pt", ".safetensors"))
        return p
    if p.is_dir() and p.name.endswith(".dcp"):
        raise _sharded_weights_error(p)
    if p.is_dir():
        ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if (ckdir / "final.safetensors").is_file():
            return ckdir / "final.safetensors"
        latest = CheckpointManager(ckdir).latest()
        if latest is not None:
            if sharded_dir(latest).is_dir():
                raise _sharded_weights_error(sharded_dir(latest))
            return latest.with_name(latest.name.replace(".state.pt", ".safetensors"))
        raise ParameterNetError(f"{str(p)!r} holds no checkpoint; train first or pass a .safetensors file")
    raise ParameterNetError(f"checkpoint {str(p)!r} does not exist; pass a .safetensors file or a run directory")


def load_into(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, strict: bool, min_match: float = 0.0
) -> None:
    """Load weights; shape mismatches always fail, missing / unexpected keys fail when ``strict``, else are logged.
    Keys saved from a wrapped model (``module.``, ``_orig_mod.``: DDP, torch.compile) are unwrapped first.

    With ``min_match`` > 0 a checkpoint that fits fewer than that share of the model's tensors (another
    architecture) raises ParameterNetError instead of leaving the model mostly as initialised.
    """
    own = model.state_dict()
    state_dict = strip_wrapper_prefixes(state_dict, own, f"checkpoint {source}")
    if min_match > 0:
        share = match_fraction(model, state_dict)
        if share < min_match:
            raise ParameterNetError(
                f"checkpoint {source} fits only {100 * share:.0f}% of the model's tensors (another architecture?); "
                f"use a checkpoint of the same model, or pass init_strict=false (train) to load what fits"
            )
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

    SUFFIXES = (".safetensors", ".ema.safetensors", ".state.pt")

    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.skipped: list[tuple[str, str]] = []  # (tag, reason) of the incomplete checkpoints latest() passed over

    def steps(self) -> list[int]:
        """Steps with a checkpoint on disk (complete or not)."""
        if not self.dir.is_dir():
            return []
        return sorted({int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP.match(p.name))})

    def verify(self, tag: str) -> str | None:
        """``None`` when checkpoint ``tag`` is complete, else why not (a missing, truncated or altered file)."""
        manifest = self.dir / f"{tag}.manifest.json"
        if manifest.is_file():
            try:
                files = json.loads(manifest.read_text())["files"]
            except (OSError, ValueError, KeyError, TypeError):
                return f"{manifest.name} is unreadable"
            for name, rec in files.items():
                p = self.dir / name
                if not p.is_file():
                    return f"{name} is missing"
                size = p.stat().st_size
                if size != rec["bytes"]:
                    return f"{name} has {size} bytes, {rec['bytes']} were written"
                if _hash_file(p)["sha256"] != rec["sha256"]:
                    return f"{name} does not match the checksum written with it"
            return None
        state = self.dir / f"{tag}.state.pt"  # written before manifests: the state was the commit point
        if not state.is_file() or (self.dir / f"{tag}.dcp").is_dir():  # sharded ones always had manifests
            return f"{tag} was never completed (no manifest)"
        try:
            load_state(state)
            load_weights(self.dir / f"{tag}.safetensors")
        except ParameterNetError as e:
            return str(e).split(";")[0]
        return None

    def latest(self) -> Path | None:
        """The state file of the newest complete step checkpoint; incomplete newer ones are logged and listed
        in :attr:`skipped`."""
        self.skipped = []
        for step in reversed(self.steps()):
            tag = f"step_{step:07d}"
            reason = self.verify(tag)
            if reason is None:
                if self.skipped:
                    log.warning(
                        "resume: skipped %s; using %s",
                        "; ".join(f"{t} ({r})" for t, r in self.skipped),
                        tag,
                    )
                return self.dir / f"{tag}.state.pt"
            self.skipped.append((tag, reason))
        if self.skipped:
            log.warning("resume: no complete checkpoint; skipped %s", "; ".join(f"{t} ({r})" for t, r in self.skipped))
        return None

    def save(self, tag: str, weights: dict, ema: dict | None, state: dict | None, metadata: dict) -> Path:
        """Write ``<tag>.safetensors`` (+ ``.ema``, + the state), then the manifest (the commit point); prune old
        steps. A full disk or unwritable directory raises ParameterNetError and leaves older checkpoints intact."""
        path = self.dir / f"{tag}.safetensors"
        # the manifest goes first, so a rewritten tag is never taken for complete half-way through
        (self.dir / f"{tag}.manifest.json").unlink(missing_ok=True)
        files = {path.name: save_weights(path, weights, metadata)}
        if ema is not None:
            ema_path = self.dir / f"{tag}.ema.safetensors"
            files[ema_path.name] = save_weights(ema_path, ema, {**metadata, "weights": "ema"})
        if state is not None:
            state_path = self.dir / f"{tag}.state.pt"
            files[state_path.name] = save_state(state_path, {"format": FORMAT, **state})
        atomic_write(self.dir / f"{tag}.manifest.json", json.dumps({"format": FORMAT, "files": files}, indent=1))
        if state is not None:
            self._prune()
        return path

    def save_step(self, step: int, weights: dict, ema: dict | None, state: dict, metadata: dict) -> Path:
        return self.save(f"step_{step:07d}", weights, ema, state, metadata)

    def save_sharded(self, tag: str, sharded: dict[str, Any], state: dict, metadata: dict) -> Path:
        """Write the sharded checkpoint ``tag``: every process calls it with its shards (:func:`sharded_state`).

        The old manifest goes first; all processes write ``sharded`` with DCP into ``.<tag>.dcp.partial/``, which
        the main process renames to ``<tag>.dcp/``; the processes hash a share of its files each; the main process
        writes ``<tag>.state.pt`` (``state`` plus ``metadata``) and, last, the manifest listing them all (the commit
        point), then prunes old steps. The directory must be one every process sees (DCP's rule). Returns the DCP
        directory; a full disk or unwritable directory raises ParameterNetError and leaves older checkpoints intact.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        rank, world = dist.get_rank(), dist.get_world_size()
        final, staging = self.dir / f"{tag}.dcp", self.dir / f".{tag}.dcp.partial"
        try:
            if rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / f"{tag}.manifest.json").unlink(missing_ok=True)
                for old in self.dir.glob(".step_*.dcp.*"):  # left by a killed run (one writer per directory)
                    shutil.rmtree(old, ignore_errors=True)
            dist.barrier()
            dcp.save(sharded, checkpoint_id=str(staging))
            dist.barrier()
            if rank == 0:
                if final.exists():
                    final.rename(self.dir / f".{tag}.dcp.old")
                staging.rename(final)
                shutil.rmtree(self.dir / f".{tag}.dcp.old", ignore_errors=True)
            dist.barrier()
            names = sorted(p.name for p in final.iterdir())
            mine = {f"{final.name}/{n}": _hash_file(final / n) for n in names[rank::world]}
        except OSError as e:
            raise (fs_error(final, e) or e) from None
        records: list[dict[str, Any] | None] = [None] * world
        dist.all_gather_object(records, mine)
        if rank == 0:
            files = {name: rec for part in records for name, rec in sorted(part.items())}
            state_path = self.dir / f"{tag}.state.pt"
            files[state_path.name] = save_state(state_path, {"format": FORMAT, **state, "metadata": metadata})
            atomic_write(self.dir / f"{tag}.manifest.json", json.dumps({"format": FORMAT, "files": files}, indent=1))
            self._prune()
        dist.barrier()
        return final

    def save_sharded_step(self, step: int, sharded: dict[str, Any], state: dict, metadata: dict) -> Path:
        return self.save_sharded(f"step_{step:07d}", sharded, state, metadata)

    def written(self, step: int) -> Path:
        """What step ``step``'s checkpoint holds the weights in: ``step_N.safetensors``, or ``step_N.dcp/`` for a
        sharded one."""
        tag = f"step_{step:07d}"
        shards = self.dir / f"{tag}.dcp"
        return shards if shards.is_dir() else self.dir / f"{tag}.safetensors"

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            tag = f"step_{step:07d}"
            # the manifest and state go first, so a half-pruned checkpoint is already invisible
            for suffix in (".manifest.json", ".state.pt", ".safetensors", ".ema.safetensors"):
                (self.dir / f"{tag}{suffix}").unlink(missing_ok=True)
            shutil.rmtree(self.dir / f"{tag}.dcp", ignore_errors=True)
