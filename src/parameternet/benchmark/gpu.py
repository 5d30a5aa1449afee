"""``parameternet benchmark gpu``: ParameterNet-600M against GhostNet-600M, and a LLaMA with 8 experts on one FFN
projection against the dense LLaMA, side by side on one GPU (ParameterNet, arXiv 2306.14525: sec. 3.2's claim that
the extra parameters cost no FLOPs, here in GPU time).

Every row runs the two models of a pair interleaved in one process: a warm-up, then ``rounds`` rounds, each timing
``steps`` steps of the first model and then of the second (CUDA synchronised around each). A row reports each model's
median over the rounds and the median of the per-round ratios (the two timings of a round share the machine's state).
Peak memory is measured for one model at a time (``torch.cuda.max_memory_allocated`` above what was allocated before
the model was built). The rows:

- ``train_fp32`` / ``train_bf16`` / ``train_bf16_cl``: a training step (forward, cross-entropy, backward, AdamW) at
  batch 128, 224 px, in fp32, under ``torch.autocast(bfloat16)``, and the same with the model and the batch in
  channels_last (timm's ``--channels-last``); images per second.
- ``memory_fp32``: the fp32 training step's peak memory in GiB.
- ``infer_b1_eager``: batch 1, fp32, eager, the ``deploy()``ed models; milliseconds.
- ``infer_b1_graphs``: the same under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); milliseconds.
- ``infer_b256_bf16``: batch 256, bf16 autocast, ``deploy()``ed; images per second.
- ``moe_h512`` / ``moe_h2048``: LLaMA training tokens per second, bf16 autocast, dense against 8 experts on
  ``down_proj`` (hidden 512, 8 layers, 16 x 512 tokens; hidden 2048, intermediate 8192, 2 layers, 8 x 1024 tokens).

``smoke=True`` runs the same code on a CPU at tiny sizes (64 px, batch 2, tiny LLaMAs; ``torch.compile`` with the
eager backend, since CUDA graphs need a GPU), in seconds: a test of the code, not a measurement.
"""

from __future__ import annotations

import csv
import gc
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from parameternet.errors import ParameterNetError

__all__ = ["GpuRow", "format_gpu_table", "run_gpu_benchmark", "write_gpu_csv"]

PAIR = ("ghostnet_600m", "parameternet_600m")


@dataclass
class GpuRow:
    """One row: the baseline's and the candidate's median (``unit``), and candidate / baseline in time (``ratio``:
    above 1 is slower; for memory, the ratio of the peaks)."""

    row: str
    baseline: str
    candidate: str
    unit: str
    baseline_value: float
    candidate_value: float
    ratio: float
    rounds: int
    steps: int


@dataclass
class _Sizes:
    img: int
    batch: int
    batch_infer: int
    rounds: int
    steps: int
    warmup: int
    llama: tuple[dict, dict]


_FULL = _Sizes(
    img=224, batch=128, batch_infer=256, rounds=7, steps=3, warmup=3,
    llama=(
        dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, batch=16, seq=512),
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16, batch=8, seq=1024),
    ),
)  # fmt: skip
_SMOKE = _Sizes(
    img=64, batch=2, batch_infer=2, rounds=2, steps=1, warmup=1,
    llama=(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, batch=2, seq=16),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, batch=2, seq=16),
    ),
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleave(fns: tuple[Callable[[], None], Callable[[], None]], sizes: _Sizes, device) -> tuple[list, list]:
    """Seconds per step of each function, one value per round, the two run alternately."""
    for _ in range(sizes.warmup):
        for fn in fns:
            fn()
    _sync(device)
    times: tuple[list, list] = ([], [])
    for _ in range(sizes.rounds):
        for fn, out in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(sizes.steps):
                fn()
            _sync(device)
            out.append((time.perf_counter() - t0) / sizes.steps)
    return times


def _row(name, names, unit, times, sizes, per_step: float | None) -> GpuRow:
    """``per_step`` converts seconds per step into a rate (images or tokens a step); None reports milliseconds."""
    a, b = times
    ratio = statistics.median(tb / ta for ta, tb in zip(a, b))
    med = [statistics.median(t) for t in times]
    values = [per_step / m if per_step else m * 1e3 for m in med]
    return GpuRow(name, names[0], names[1], unit, values[0], values[1], ratio, sizes.rounds, sizes.steps)


def _vision_model(name: str, device, channels_last: bool = False):
    import timm

    import parameternet.models  # noqa: F401  (registers the models in timm)

    torch.manual_seed(0)
    model = timm.create_model(name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _train_step(model, sizes: _Sizes, device, autocast: bool, channels_last: bool) -> Callable[[], None]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(sizes.batch, 3, sizes.img, sizes.img, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (sizes.batch,), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _peak_memory(name: str, sizes: _Sizes, device) -> float:
    """GiB that an fp32 training step of ``name`` allocates at its peak, model and optimiser state included."""
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = _vision_model(name, device)
    step = _train_step(model, sizes, device, autocast=False, channels_last=False)
    for _ in range(2):
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del model, step
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**30


def _deployed(name: str, sizes: _Sizes, device):
    from parameternet.export.folding import deploy

    model = _vision_model(name, torch.device("cpu")).eval()
    return deploy(model, example_input=(1, 3, sizes.img, sizes.img)).to(device).eval()


def _infer(model, x, autocast: bool) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            model(x)

    return run


def _llama_step(spec: dict, moe: bool, device) -> Callable[[], None]:
    from parameternet.models.llama_moe import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM

    spec = dict(spec)
    batch, seq = spec.pop("batch"), spec.pop("seq")
    torch.manual_seed(0)
    config = ParameterNetLlamaConfig(
        vocab_size=32000 if device.type == "cuda" else 256, max_position_embeddings=seq, num_experts=8,
        moe_projections=["down_proj"] if moe else [], attn_implementation="sdpa", **spec,
    )  # fmt: skip
    model = ParameterNetLlamaForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step


def _inference_rows(rows: tuple[str, ...], sizes: _Sizes, device: torch.device, done: Callable[[GpuRow], None]) -> None:
    """The inference rows among ``rows``: the deployed pair at batch 1 (eager, CUDA graphs) and at the large batch."""
    if not {"infer_b1_eager", "infer_b1_graphs", "infer_b256_bf16"} & set(rows):
        return
    deployed = [_deployed(n, sizes, device) for n in PAIR]
    x1 = torch.randn(1, 3, sizes.img, sizes.img, device=device)
    if "infer_b1_eager" in rows:
        fns = tuple(_infer(m, x1, autocast=False) for m in deployed)
        done(_row("infer_b1_eager", PAIR, "ms", _interleave(fns, sizes, device), sizes, None))
    if "infer_b1_graphs" in rows:
        mode = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="eager")
        compiled = [torch.compile(m, **mode) for m in deployed]
        fns = tuple(_infer(m, x1, autocast=False) for m in compiled)
        done(_row("infer_b1_graphs", PAIR, "ms", _interleave(fns, sizes, device), sizes, None))
        del compiled
    if "infer_b256_bf16" in rows:
        xb = torch.randn(sizes.batch_infer, 3, sizes.img, sizes.img, device=device)
        fns = tuple(_infer(m, xb, autocast=True) for m in deployed)
        done(_row("infer_b256_bf16", PAIR, "img/s", _interleave(fns, sizes, device), sizes, sizes.batch_infer))
    del deployed
    gc.collect()


def run_gpu_benchmark(
    *, smoke: bool = False, rows: tuple[str, ...] | None = None, log: Callable[[str], None] = print
) -> tuple[list[GpuRow], dict]:
    """Measure the rows (all by default) and return them with the run's facts (GPU, torch, CUDA, ...).

    Raises ParameterNetError without a CUDA device unless ``smoke``, and for an unknown row name.
    """
    known = (
        "train_fp32", "memory_fp32", "train_bf16", "train_bf16_cl", "infer_b1_eager", "infer_b1_graphs",
        "infer_b256_bf16", "moe_h512", "moe_h2048",
    )  # fmt: skip
    rows = known if rows is None else tuple(rows)
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise ParameterNetError(f"unknown benchmark row(s) {', '.join(unknown)}; choose from {', '.join(known)}.")
    if not smoke and not torch.cuda.is_available():
        raise ParameterNetError("benchmark gpu needs a CUDA device; --smoke runs the same code on a CPU.")
    device = torch.device("cpu" if smoke else "cuda")
    sizes = _SMOKE if smoke else _FULL
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out: list[GpuRow] = []
    started = time.perf_counter()

    def done(row: GpuRow) -> None:
        out.append(row)
        log(
            f"{row.row:>16}: {row.baseline} {row.baseline_value:,.2f} {row.unit}, {row.candidate} "
            f"{row.candidate_value:,.2f} {row.unit}, {row.ratio:.3f}x  ({time.perf_counter() - started:.0f} s)"
        )

    for name, autocast, cl in (
        ("train_fp32", False, False),
        ("train_bf16", True, False),
        ("train_bf16_cl", True, True),
    ):
        if name not in rows:
            continue
        models = [_vision_model(n, device, channels_last=cl) for n in PAIR]
        fns = tuple(_train_step(m, sizes, device, autocast, cl) for m in models)
        done(_row(name, PAIR, "img/s", _interleave(fns, sizes, device), sizes, sizes.batch))
        del models, fns
        gc.collect()
    if "memory_fp32" in rows:
        if device.type == "cuda":
            peaks = [_peak_memory(n, sizes, device) for n in PAIR]
            done(GpuRow("memory_fp32", *PAIR, "GiB", peaks[0], peaks[1], peaks[1] / peaks[0], 1, 2))
        else:
            log("     memory_fp32: skipped (CUDA memory statistics need a GPU)")

    _inference_rows(rows, sizes, device, done)

    for name, spec in zip(("moe_h512", "moe_h2048"), sizes.llama):
        if name not in rows:
            continue
        fns = (_llama_step(spec, False, device), _llama_step(spec, True, device))
        tokens = spec["batch"] * spec["seq"]
        # Reported as tokens/s; the ratio is candidate time / baseline time like every other row.
        done(
            _row(name, ("llama_dense", "llama_moe8_down_proj"), "tok/s", _interleave(fns, sizes, device), sizes, tokens)
        )
        del fns
        gc.collect()

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "smoke": smoke,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return out, meta


def format_gpu_table(rows: list[GpuRow], meta: dict) -> str:
    """A markdown table of the rows: baseline, candidate, their ratio in time (memory: in bytes)."""
    lines = [
        f"{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda'] or '-'}, commit {meta.get('commit', '?')}"
        + (" (smoke: tiny sizes on a CPU, not a measurement)" if meta["smoke"] else ""),
        "",
        "| row | baseline | candidate | ratio (time; memory) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.row} | {r.baseline} {r.baseline_value:,.2f} {r.unit} | {r.candidate} {r.candidate_value:,.2f} "
            f"{r.unit} | {r.ratio:.2f}x |"
        )
    return "\n".join(lines)


def write_gpu_csv(rows: list[GpuRow], meta: dict, path: str | Path, provenance: dict) -> Path:
    """Append the rows to ``path`` (a CSV with a header), each with the run's facts: device, torch, CUDA, and from
    ``provenance`` (``{"commit", "dirty", "version"}``) the code that made them, and the time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta["commit"] = provenance["commit"]
    extra = {
        "device": meta["device"], "torch": meta["torch"], "cuda": meta["cuda"], "commit": provenance["commit"],
        "dirty": provenance["dirty"], "version": provenance["version"], "smoke": meta["smoke"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    fields = list(GpuRow.__dataclass_fields__) + list(extra)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ParameterNetError(f"{path} has other columns than a GPU benchmark's; give another --output.")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), **extra})
    return path
