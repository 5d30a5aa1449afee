"""ONNX export of a model's inference graph, checked in ONNX Runtime (ParameterNet, arXiv 2306.14525, sec. 5.2:
the paper times its models with ONNX on one CPU thread).

``export_onnx(model, path)`` exports :func:`parameternet.deploy`'s graph (BatchNorms folded into the experts,
RepConv merged) with a symbolic batch dimension. Public dynamic convs fold the batch into the channels and call a
conv with ``groups=batch``, which an ONNX graph can only hold as a constant; :class:`~parameternet.DynamicConv2d`
switches to formulations that hold no batch size while it is exported (see its module docstring). With
``dynamic_batch=False`` the graph is for one batch size only and may use the faster per-sample conv; for a batch of
one that is a plain conv whose kernel is mixed in the graph.

Two exporters: ``"torchscript"`` (the default here: the faster of the two to run on these models, and what
``parameternet benchmark`` uses) and ``"dynamo"`` (``torch.export``; PyTorch's default since 2.9 and the one that
stays when the TorchScript exporter is removed). Both give graphs that match PyTorch; the export is checked in
ONNX Runtime at batch 1 and a larger batch (or at the fixed batch size) against the model as given.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parameternet.errors import ParameterNetError
from parameternet.layers.kernels import fixed_batch_trace
from parameternet.toolkit import eval_mode, first_line, image_input_shape, model_name

__all__ = ["EXPORTERS", "RUNTIMES", "ExportReport", "export_onnx", "onnx_session"]

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")
# The opsets each exporter writes for these graphs (torch 2.14: the TorchScript exporter stops at 20, torch.export's
# starts at 18); below 11 the one-image graph's body does not load in ONNX Runtime's Scan (tested from 11 on).
OPSETS = {"torchscript": (11, 20), "dynamo": (18, 23)}
# "any": a portable ONNX graph; "onnxruntime-cpu": for ONNX Runtime's CPU provider on this CPU (NCHWc kernels).
RUNTIMES = ("any", "onnxruntime-cpu")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote; ``max_rel_error`` maps a batch size to ``max|ort - torch| / max|torch|``."""

    path: str
    model: str
    input_shape: list[int | str]
    dynamic_batch: bool
    opset: int
    exporter: str
    deployed: bool
    max_rel_error: dict[int, float]
    export_seconds: float
    size_mb: float
    runtime: str = "any"
    # a symbolic batch served by the one-image graph in a Scan over the images
    per_image: bool = False
    # runtime="onnxruntime-cpu": what moved to ONNX Runtime's NCHWc kernels (an NchwcReport's summary)
    nchwc: str | None = None
    # Checked too: the graph with its dynamic convs in ONNX Runtime's NCHWc kernels (a batch-1 graph on a CPU
    # that has them), as ``onnx_session`` and ``parameternet benchmark`` run it; None when not applicable.
    nchwc_rel_error: float | None = None
    # the images' and the graph's dtype: the model's ("float32", "float16" or "bfloat16")
    dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape)) + ("" if self.dtype == "float32" else f" {self.dtype}")
        checked = ", ".join(f"batch {b}: {e:.1e}" for b, e in self.max_rel_error.items()) or "not checked"
        return (
            f"{self.path}: {self.model}, input {shape}{' (image by image)' if self.per_image else ''}, "
            f"opset {self.opset}, {self.exporter} exporter, "
            f"{'deploy() graph' if self.deployed else 'graph as given'}, {self.size_mb:.1f} MB, "
            f"{self.export_seconds:.1f} s\n"
            + ("" if self.nchwc is None else f"for ONNX Runtime's CPU provider: {self.nchwc}\n")
            + f"onnxruntime vs PyTorch, max relative error: {checked}"
            + ("" if self.nchwc_rel_error is None else f"; with NCHWc kernels: {self.nchwc_rel_error:.1e}")
        )


def onnx_session(path, threads: int | None = None, *, nchwc: bool = True):
    """An ONNX Runtime CPU session for ``path`` (a file or an ``onnx.ModelProto``).

    ``threads`` fixes intra- and inter-op threads (None: ONNX Runtime's choice). With ``nchwc`` (the default) the
    dynamic convs of a batch-1 graph run in ONNX Runtime's blocked CPU kernels
    (:func:`~parameternet.export.ort_nchwc.optimize_for_onnxruntime`); the file is not changed.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ParameterNetError(
            "onnxruntime is not installed; install it with `pip install parameternet[onnx]`."
        ) from e
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = str(path) if isinstance(path, (str, Path)) else path.SerializeToString()
    if nchwc:
        from parameternet.export.ort_nchwc import optimize_for_onnxruntime

        model, report = optimize_for_onnxruntime(path)
        if report.convs:
            source = model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run_export(model, x, path, *, dynamic_batch, opset, exporter) -> None:
    names = dict(input_names=["images"], output_names=["logits"])
    # The exporters warn about traced shapes and their own deprecation: the check below is what counts.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, dynamic_axes=axes, **names)
        else:
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            program = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=opset, dynamic_shapes=shapes, verbose=False, **names
            )
            program.save(str(path), external_data=False)


def _image_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the images a model takes: its first floating-point parameter's (float32 without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_bfloat16_graph(path: Path, opset: int, exporter: str) -> None:
    """Raise ``ParameterNetError`` unless ``onnx.checker`` (with shape inference) accepts the bfloat16 graph."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # the checker names the node and its type: one line of it is enough
        raise ParameterNetError(
            f"the bfloat16 graph ({exporter} exporter, opset {opset}) is not valid ONNX: {first_line(e)[:200]}; "
            "ONNX's Conv takes bfloat16 from opset 22, which only the dynamo exporter writes (exporter='dynamo', "
            "opset=22)."
        ) from e


def _mode(dynamic_batch: bool, batch_size: int, runtime: str) -> str:
    batch = "symbolic batch" if dynamic_batch else f"batch {batch_size}"
    return batch if runtime == "any" else f"{batch}, runtime {runtime}"


def _declare_batch(path: Path, batch: int) -> None:
    """Give a fixed-batch graph's outputs their batch size where shape inference lost it (after a reflect pad,
    say): :func:`~parameternet.export.onnx_scan.scan_over_batch` needs to see a one-image graph."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) and not dims[0].dim_value:
            dims[0].dim_value = batch
            changed = True
    if changed:
        onnx.save(model, str(path))


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    opset: int = 18,
    deploy: bool = True,
    img_size: int | tuple[int, int] | None = None,
    exporter: str = "torchscript",
    check: bool = True,
    rtol: float | None = None,
    runtime: str = "any",
    in_chans: int | None = None,
    per_image: bool | None = None,
) -> ExportReport:
    """Write ``model``'s inference graph to ``path`` as ONNX and check it in ONNX Runtime.

    ``dynamic_batch``: a symbolic batch dimension (``batch_size`` is then only the traced example's); otherwise the
    graph takes exactly ``batch_size`` images. ``deploy``: export :func:`parameternet.deploy`'s graph (the default)
    rather than the model as given. ``img_size`` defaults to timm's ``pretrained_cfg["input_size"]``. With
    ``check`` the ONNX outputs must match the model's (eval mode) within ``rtol`` relative to the largest output, at
    batch 1 and 3 (dynamic) or ``batch_size``; a larger error raises ``RuntimeError``. ``rtol`` defaults to 1e-4,
    1e-2 for a float16 model (ten of its rounding steps: the graph's formulations round intermediate results to
    float16 at other points than eager PyTorch does; a static conv's graph matches exactly). The model is not
    changed.

    ``runtime="onnxruntime-cpu"`` writes the graph for ONNX Runtime's CPU provider on this CPU rather than a portable
    one: the graph for one image with its dynamic convs in ONNX Runtime's NCHWc kernels
    (:func:`~parameternet.export.ort_nchwc.optimize_for_onnxruntime`), for a symbolic batch run on each image in
    turn (:func:`~parameternet.export.onnx_scan.scan_over_batch`).

    ``per_image``: with a symbolic batch, the graph for one image run on each image in turn (an ONNX ``Scan``,
    :func:`~parameternet.export.onnx_scan.scan_over_batch`) rather than the batch-agnostic formulations. Still
    standard ONNX; in ONNX Runtime on a CPU it is the faster portable graph (``parameternet benchmark modes``
    measures both; the figures are in the documentation's "Deployment and speed" page), because a one-image graph
    mixes each dynamic conv's kernel once and runs one plain conv, where the batch-agnostic depthwise conv runs one
    conv per expert; a runtime that batches images across a device (a GPU) loses that
    parallelism. Default: ``True`` for ``runtime="onnxruntime-cpu"`` (whose graph is always per image), else
    ``False``. A per-image graph takes batches of one image or more: ONNX Runtime's ``Scan`` refuses an empty one,
    which the batch-agnostic graph returns as an empty output.

    ``in_chans``: the input's channel count, for a model that does not say (timm models have ``in_chans``; default
    3). The input is ``(batch, in_chans, H, W)`` in the model's dtype (its first floating-point parameter's: a model
    cast by ``.half()`` takes and returns float16); the graph's output is the model's first output.

    A bfloat16 model: ONNX's ``Conv`` takes bfloat16 from opset 22 on, which only the dynamo exporter writes, and
    ONNX Runtime's CPU provider has no bfloat16 kernels (``Conv``, ``ReduceMean``; a plain ``nn.Conv2d``'s graph fails
    to load as well), so such a graph is written with ``check=False`` and ``exporter="dynamo"``, ``opset`` >= 22,
    checked by ``onnx.checker`` only (a graph ONNX does not accept raises ``ParameterNetError``).

    Raises ``ParameterNetError`` (one sentence) for bad arguments and for a model the exporter cannot trace;
    ``RuntimeError`` when ONNX Runtime's output differs from PyTorch's by more than ``rtol``.
    """
    if not isinstance(model, nn.Module):
        raise ParameterNetError(f"export_onnx() takes an nn.Module, got {type(model).__name__}.")
    if exporter not in EXPORTERS:
        raise ParameterNetError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ParameterNetError(f"batch_size must be a positive integer, got {batch_size!r}.")
    low, high = OPSETS[exporter]
    if not isinstance(opset, int) or isinstance(opset, bool) or not low <= opset <= high:
        raise ParameterNetError(
            f"opset must be an integer from {low} to {high} for the {exporter} exporter, got {opset!r}."
        )
    if runtime not in RUNTIMES:
        raise ParameterNetError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
    if per_image not in (None, True, False):
        raise ParameterNetError(f"per_image must be True, False or None (the runtime's default), got {per_image!r}.")
    if runtime == "onnxruntime-cpu" and per_image is False:
        raise ParameterNetError(
            "an onnxruntime-cpu graph always runs image by image; leave per_image unset or use runtime='any'."
        )
    per_image = runtime == "onnxruntime-cpu" or bool(per_image)
    if per_image and not dynamic_batch and batch_size != 1:
        what = "an onnxruntime-cpu graph" if runtime == "onnxruntime-cpu" else "a per-image graph"
        raise ParameterNetError(
            f"{what} takes one image or any batch, not batch_size={batch_size}; use batch_size=1 or dynamic_batch=True."
        )
    if rtol is not None and not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol > 0):
        raise ParameterNetError(f"rtol must be a positive number or None (the dtype's default), got {rtol!r}.")
    if check and _image_dtype(model) == torch.bfloat16:
        raise ParameterNetError(
            "ONNX Runtime's CPU provider has no bfloat16 kernels (a plain nn.Conv2d's bfloat16 graph does not load "
            "either), so a bfloat16 graph cannot be checked; pass check=False with exporter='dynamo' and opset=22 "
            "(ONNX's Conv takes bfloat16 from opset 22), or export the model in float32 or float16."
        )
    path = Path(path)
    if path.suffix != ".onnx":
        raise ParameterNetError(f"the output path must end in .onnx, got {str(path)!r}.")
    from parameternet.runs import atomic_path

    # written and checked under a temporary name, then renamed: a full disk or a failed check leaves no .onnx
    with atomic_path(path, keep_suffix=True) as tmp:
        report = _export_to(model, Path(tmp), dynamic_batch, batch_size, opset, deploy, img_size, exporter, check,
                            rtol, runtime, per_image, in_chans)  # fmt: skip
    report.path = str(path)
    log.debug("%s", report)
    return report


def _export_to(model, path, dynamic_batch, batch_size, opset, deploy, img_size, exporter, check, rtol, runtime,
               per_image, in_chans) -> ExportReport:  # fmt: skip
    chans, height, width = image_input_shape(model, img_size, in_chans)
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = _image_dtype(model)
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, chans, height, width, generator=generator).to(device, dtype)

    # torch.export would fix a symbolic size traced at 1, so a dynamic graph is traced at batch 2.
    example = images(1 if per_image else max(batch_size, 2) if dynamic_batch else batch_size)
    if deploy:
        from parameternet.export.folding import deploy as deploy_model

        graph = deploy_model(model, example_input=example[:1])
    else:
        graph = copy.deepcopy(model).eval()
    start = time.perf_counter()
    moved = _write_graph(model, graph, example, path, dynamic_batch, batch_size, opset, exporter, runtime, per_image)
    seconds = time.perf_counter() - start
    if rtol is None:
        rtol = 1e-2 if dtype == torch.float16 else 1e-4
    errors, nchwc_error = {}, None
    if check:
        errors, nchwc_error = _check_in_onnxruntime(model, path, images, dynamic_batch, batch_size, opset, runtime,
                                                    rtol)  # fmt: skip
    report = ExportReport(
        path=str(path),
        model=model_name(model),
        input_shape=["batch" if dynamic_batch else batch_size, chans, height, width],
        runtime=runtime,
        nchwc=None if moved is None else str(moved),
        per_image=per_image,
        dynamic_batch=dynamic_batch,
        opset=opset,
        exporter=exporter,
        deployed=deploy,
        max_rel_error=errors,
        export_seconds=seconds,
        size_mb=path.stat().st_size / 2**20,
        nchwc_rel_error=nchwc_error,
        dtype=str(dtype).removeprefix("torch."),
    )
    return report


def _write_graph(model, graph, example, path, dynamic_batch, batch_size, opset, exporter, runtime,
                 per_image) -> Path | None:  # fmt: skip
    """Export ``graph`` (``model`` deployed or copied) traced on ``example`` to ``path``: a fixed batch declared in
    the graph, a per-image graph wrapped in a Scan over the batch (rewritten for ONNX Runtime's NCHWc kernels with
    ``runtime="onnxruntime-cpu"``: what moved is returned, else None). An exporter's failure is ParameterNetError in
    one line."""
    (chans, height, width), dtype = example.shape[1:], example.dtype
    fixed_batch = 1 if per_image else None if dynamic_batch else batch_size
    try:
        with contextlib.nullcontext() if fixed_batch is None else fixed_batch_trace(fixed_batch):
            _run_export(graph, example, path, dynamic_batch=fixed_batch is None, opset=opset, exporter=exporter)
    except Exception as e:  # the exporters' messages can hold a whole IR dump: one line is what a user can act on
        first = first_line(e)[:200]
        raise ParameterNetError(
            f"ONNX export of {model_name(model)} ({_mode(dynamic_batch, batch_size, runtime)}, input "
            f"{chans}x{height}x{width}) failed: {type(e).__name__}: {first}"
        ) from e
    if dtype == torch.bfloat16:  # never loaded by ONNX Runtime here: ONNX's own checker says whether it is ONNX
        _check_bfloat16_graph(path, opset, exporter)
    if per_image or not dynamic_batch:
        _declare_batch(path, 1 if per_image else batch_size)
    moved = None
    if per_image:
        import onnx

        from parameternet.export.onnx_scan import scan_over_batch
        from parameternet.export.ort_nchwc import optimize_for_onnxruntime

        if runtime == "onnxruntime-cpu":
            one_image, moved = optimize_for_onnxruntime(path)
        else:
            one_image = onnx.load(str(path))
        onnx.save(scan_over_batch(one_image) if dynamic_batch else one_image, str(path))
    return moved


def _check_in_onnxruntime(model, path, images, dynamic_batch, batch_size, opset, runtime,
                          rtol) -> tuple[dict[int, float], float | None]:  # fmt: skip
    """Load ``path`` in ONNX Runtime and compare it with ``model`` on ``images(n)`` (batches of 1 and 3 for a
    symbolic batch, else the fixed one; the NCHWc rewrite too for a fixed batch not already rewritten): the largest
    relative error per batch size and the NCHWc graph's (None when not run). ParameterNetError when ONNX Runtime
    cannot load it or it takes no input; RuntimeError when an error exceeds ``rtol``."""
    errors: dict[int, float] = {}
    nchwc_error = None
    try:
        session = onnx_session(path, nchwc=False)
    except ParameterNetError:
        raise
    except Exception as e:  # ONNX Runtime's message can quote the whole node: its first line is enough
        raise ParameterNetError(
            f"ONNX Runtime cannot load the graph exported for {model_name(model)} at opset {opset}: "
            f"{first_line(e)[:300]}; "
            "export at the default opset 18, or please report this model."
        ) from e
    nchwc_session = None
    if not dynamic_batch and runtime != "onnxruntime-cpu":
        from parameternet.export.ort_nchwc import optimize_for_onnxruntime

        rewritten, nchwc = optimize_for_onnxruntime(path)
        nchwc_session = onnx_session(rewritten, nchwc=False) if nchwc.convs else None
    if not session.get_inputs():
        raise ParameterNetError(
            f"the ONNX graph of {model_name(model)} takes no input: its output does not depend on the images "
            "as traced (a tensor left the graph through numpy or Python); keep the forward in torch ops."
        )
    input_name = session.get_inputs()[0].name

    def rel_error(got, expected) -> float:
        scale = expected.abs().max().double().clamp_min(1e-12)
        return ((torch.from_numpy(got).double() - expected.double()).abs().max() / scale).item()

    with eval_mode(model):
        for n in (1, 3) if dynamic_batch else (batch_size,):
            x = images(n)
            expected = model(x).float().cpu()
            feed = {input_name: x.cpu().numpy()}
            errors[n] = rel_error(session.run(None, feed)[0], expected)
            if nchwc_session is not None:
                nchwc_error = rel_error(nchwc_session.run(None, feed)[0], expected)
    worst = max(errors.values())
    if nchwc_error is not None and nchwc_error > rtol:
        raise RuntimeError(
            f"ONNX Runtime's NCHWc kernels give outputs of {model_name(model)} that differ from PyTorch by "
            f"{nchwc_error:.2e} (relative), more than rtol={rtol:g}; please report this model."
        )
    if worst > rtol:
        raise RuntimeError(
            f"the ONNX graph of {model_name(model)} differs from PyTorch by {worst:.2e} (relative) in "
            f"onnxruntime, more than rtol={rtol:g}; please report this model."
        )
    return errors, nchwc_error
