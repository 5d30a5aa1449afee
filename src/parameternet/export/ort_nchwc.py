"""ONNX Runtime's blocked (NCHWc) CPU convolutions for dynamic convs whose kernel is computed in the graph.

ONNX Runtime's CPU provider runs a convolution fastest in its NCHWc layout (channels in blocks of 8 or 16, the
SIMD width), but its graph optimizer moves a ``Conv`` there only when the kernel is a constant, because it
reorders the kernel once, offline. A dynamic conv's kernel is an input, ``alpha @ experts``, so those convs stay in
the generic path, which cannot fuse an activation and is slower for a depthwise conv (``benchmarks/deploy_speed.py
--breakdown`` times each node; the figures are in the documentation's "Deployment and speed" page).

The mixing is linear, so reordering (and zero-padding) every expert once gives the mixed kernel already in the
blocked layout. :func:`optimize_for_onnxruntime` rewrites each ``Conv(x, Reshape(MatMul(alpha, experts)), b)`` of a
batch-1 graph (``export_onnx(..., dynamic_batch=False)``) into ONNX Runtime's own blocked ops,
``com.microsoft.nchwc`` ``ReorderInput`` / ``Conv`` / ``ReorderOutput``, with the experts stored blocked, a
following activation fused into the conv, and consecutive rewritten convs passing the blocked tensor along without a
round trip. ONNX Runtime then optimises the rest of the graph as usual. The result runs only in ONNX Runtime's CPU
provider on a CPU with the same block size, like the optimised models ONNX Runtime itself saves; the portable
graph stays what :func:`~parameternet.export.onnx_export.export_onnx` writes. Outputs match it to float rounding
(``tests/test_ort_nchwc.py``). :func:`~parameternet.export.onnx_scan.scan_over_batch` serves any batch size with
such a one-image graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parameternet.errors import ParameterNetError

__all__ = ["NchwcReport", "nchwc_block_size", "onnxruntime_block_size", "optimize_for_onnxruntime"]

NCHWC = "com.microsoft.nchwc"
# Activations the blocked conv applies itself (ONNX op -> its ``activation`` attribute).
_FUSABLE = {"Relu": "Relu", "HardSwish": "HardSwish"}  # the two the tests run; MLAS has others


@dataclass
class NchwcReport:
    """What :func:`optimize_for_onnxruntime` changed: ``convs`` of ``candidates`` convs moved to the blocked layout
    (``dynamic`` of them with kernels mixed in the graph), the rest ``skipped`` with the reason."""

    block_size: int
    candidates: int = 0
    convs: int = 0
    dynamic: int = 0
    activations_fused: int = 0
    reorders_saved: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        s = (
            f"{self.convs} of {self.candidates} convs ({self.dynamic} dynamic) in ONNX Runtime's "
            f"NCHWc{self.block_size} kernels, {self.activations_fused} activations fused, "
            f"{self.reorders_saved} layout round trips saved"
        )
        if self.skipped:
            s += "; left generic: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return s


@functools.cache
def nchwc_block_size() -> int | None:
    """The channel block of ONNX Runtime's NCHWc kernels on this CPU (8 or 16 on x86), or None where there are
    none (:func:`onnxruntime_block_size`) or where the rewrite fails its check: a small graph with a dense and a
    depthwise dynamic conv, a fused activation and a pooled router input must give what ONNX Runtime gives for
    the graph as exported."""
    block = onnxruntime_block_size()
    try:
        return block if block is not None and _self_check(block) else None
    except Exception:  # a failing rewrite is no rewrite: the graphs stay portable
        return None


@functools.cache
def onnxruntime_block_size() -> int | None:
    """The channel block of ONNX Runtime's NCHWc kernels on this CPU, without checking the rewrite; None where this
    ONNX Runtime build or CPU has none."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC)], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NCHWC, 1)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"])
        return int(session.run(None, {"x": np.ones((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception:  # no NCHWc kernels in this build or on this CPU
        return None


def _quiet_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return options


def _self_check(block: int) -> bool:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    M, c_in, c_mid = 3, 12, 20  # 12 and 20: multiples of 4, not of a block

    def const(value, key):
        return numpy_helper.from_array(np.asarray(value), key)

    inits = [
        const(rng.standard_normal((M, c_mid * c_in * 9)).astype(np.float32), "bank1"),
        const(np.array([-1, c_in, 3, 3], np.int64), "shape1"),
        const(rng.standard_normal(c_mid).astype(np.float32), "bias1"),
        const(rng.standard_normal((M, c_mid * 9)).astype(np.float32), "bank2"),
        const(np.array([-1, 1, 3, 3], np.int64), "shape2"),
        const(np.array([2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("MatMul", ["alpha", "bank1"], ["m1"]),
        helper.make_node("Reshape", ["m1", "shape1"], ["w1"]),
        helper.make_node("Conv", ["x", "w1", "bias1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["a1"]),
        helper.make_node("ReduceMean", ["a1", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["alpha", "bank2"], ["m2"]),
        helper.make_node("Reshape", ["m2", "shape2"], ["w2"]),
        helper.make_node(
            "Conv", ["a1", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2], group=c_mid
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 7, 7]),
        helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [1, M]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "pooled")]
    graph = helper.make_graph(nodes, "check", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewritten, report = _rewrite(type(model).FromString(model.SerializeToString()), block, static_convs=False)
    if report.convs != 2:
        return False
    feed = {"x": rng.standard_normal((1, c_in, 7, 7)).astype(np.float32), "alpha": rng.random((1, M), np.float32)}
    got, want = (
        ort.InferenceSession(m.SerializeToString(), _quiet_options(), providers=["CPUExecutionProvider"]).run(
            None, feed
        )
        for m in (rewritten, model)
    )
    return all(np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()) for a, b in zip(got, want))


def _round_up(n: int, block: int) -> int:
    return (n + block - 1) // block * block


class _Graph:
    """Index of an ONNX graph: producers, consumers and constant values (initializers, Constant nodes, Identity)."""

    def __init__(self, graph, opsets=()):
        from onnx import numpy_helper

        self._opsets = list(opsets)
        self.init = {t.name: t for t in graph.initializer}
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self._numpy = numpy_helper
        self._graph = graph
        self._dims: dict[str, list[int]] | None = None

    def leading_dim(self, name: str) -> int | None:
        """The first dimension of ``name`` as ONNX shape inference sees it (computed once, on first use), or None
        when unknown."""
        if self._dims is None:
            import onnx

            model = onnx.helper.make_model(
                self._graph, opset_imports=self._opsets or [onnx.helper.make_opsetid("", 18)]
            )
            try:
                inferred = onnx.shape_inference.infer_shapes(model).graph
            except Exception:  # a graph shape inference cannot read proves nothing
                inferred = self._graph
            self._dims = {}
            for v in [*inferred.input, *inferred.value_info, *inferred.output]:
                dims = v.type.tensor_type.shape.dim
                self._dims[v.name] = [d.dim_value for d in dims]
        dims = self._dims.get(name)
        return dims[0] if dims and dims[0] > 0 else None

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant, else None."""
        if name in self.init:
            return self._numpy.to_array(self.init[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity" and node.domain == "":
            return self.const(node.input[0])
        if node.op_type == "Constant" and node.domain == "":
            for a in node.attribute:
                if a.name == "value":
                    return self._numpy.to_array(a.t)
        return None


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _block_experts(bank: np.ndarray, shape: tuple[int, ...], depthwise: bool, c_in_pad: int, block: int) -> np.ndarray:
    """Experts ``(M, O*I*kh*kw)`` -> ``(M, Opad*Ipad*kh*kw)`` in the order MLAS reads a blocked kernel."""
    M = bank.shape[0]
    c_out, c_in, kh, kw = shape
    o_pad = _round_up(c_out, block)
    w = bank.reshape(M, c_out, c_in, kh, kw)
    if depthwise:  # OIHWBo: [O/B][kh][kw][B]
        padded = np.zeros((M, o_pad, 1, kh, kw), bank.dtype)
        padded[:, :c_out] = w
        out = padded.reshape(M, o_pad // block, block, kh, kw).transpose(0, 1, 3, 4, 2)
    else:  # OIHWBiBo: [O/B][I/B][kh][kw][Bi][Bo]
        padded = np.zeros((M, o_pad, c_in_pad, kh, kw), bank.dtype)
        padded[:, :c_out, :c_in] = w
        out = padded.reshape(M, o_pad // block, block, c_in_pad // block, block, kh, kw)
        out = out.transpose(0, 1, 3, 5, 6, 4, 2)
    return np.ascontiguousarray(out).reshape(M, -1)


def optimize_for_onnxruntime(model, path: str | Path | None = None, *, static_convs: bool = False):
    """Rewrite the dynamic convs of a batch-1 ONNX graph into ONNX Runtime's NCHWc ops (see the module docstring).

    ``model``: a path or an ``onnx.ModelProto`` (not changed); the blocks are this CPU's
    (:func:`nchwc_block_size`). ``static_convs``: move the convs with constant kernels too, instead of leaving them
    to ONNX Runtime's own NCHWc pass. That keeps the blocked layout through layers whose channel counts ONNX
    Runtime leaves in its generic kernels (not a multiple of 4, as in GhostNet's ghost modules) but gives up some of
    its fusions (a residual add into the conv): ``benchmarks/deploy_speed.py`` and ``parameternet benchmark`` time
    both. Returns ``(onnx.ModelProto, NchwcReport)`` and writes the model to ``path`` if given. A graph with
    nothing to move, or an ONNX Runtime without NCHWc kernels, comes back unchanged.
    """
    import onnx

    if isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ParameterNetError(f"no ONNX file at {str(model)!r}; export one with `parameternet export`.")
        try:
            model = onnx.load(str(model))  # a private copy already
        except Exception as e:
            raise ParameterNetError(f"{str(model)!r} is not a readable ONNX file ({e}); export it again.") from e
    elif isinstance(model, onnx.ModelProto):
        model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as it is
    else:
        raise ParameterNetError(f"optimize_for_onnxruntime() takes a path or an onnx.ModelProto, got {type(model)}.")
    block = nchwc_block_size()
    if block is None:
        report = NchwcReport(0, skipped={"all": "this ONNX Runtime has no (working) NCHWc kernels"})
        return _finish(model, path, report)
    model, report = _rewrite(model, block, static_convs)
    return _finish(model, path, report)


def _rewrite(model, block: int, static_convs: bool):
    """Rewrite ``model`` in place; returns it and the report."""
    from onnx import helper

    report = NchwcReport(block)
    g = _Graph(model.graph, model.opset_import)

    blocked: dict[str, tuple[str, int]] = {}  # NCHW tensor -> (its NCHWc twin, channels)
    new_nodes, removed = [], set()
    fresh = iter(range(1 << 30))

    def name(base: str) -> str:
        return f"{base}_nchwc{next(fresh)}"

    for node in model.graph.node:
        if id(node) in removed:
            continue
        if _is_spatial_mean(g, node) and node.input[0] in blocked:
            new_nodes += _blocked_mean(model, node, *blocked[node.input[0]], block, name)
            report.reorders_saved += 1
            continue
        match = _match_conv(g, node, static_convs) if node.op_type == "Conv" and node.domain == "" else None
        if match is None:
            new_nodes.append(node)
            continue
        report.candidates += 1
        alpha, bank, (c_out, c_in_group, kh, kw), attrs = match
        group = attrs.get("group", 1)
        depthwise = group > 1 and c_in_group == 1 and c_out == group
        c_in = group if depthwise else c_in_group
        x = node.input[0]
        label = node.name or node.output[0]
        why = _not_blockable(group, depthwise, c_in, x in blocked)
        if why is not None:
            report.skipped[label] = why
            new_nodes.append(node)
            continue
        c_in_pad, o_pad = _round_up(c_in, block), _round_up(c_out, block)
        if depthwise:
            o_pad = c_in_pad
        out_name, act = node.output[0], None
        users = g.consumers.get(out_name, [])
        if len(users) == 1 and users[0].domain == "" and users[0].op_type in _FUSABLE and out_name not in g.outputs:
            act = users[0]
            removed.add(id(act))
            out_name = act.output[0]
            report.activations_fused += 1

        stored = _block_experts(bank, (c_out, c_in_group, kh, kw), depthwise, c_in_pad, block)
        kernel = _blocked_kernel(model, new_nodes, alpha, stored, [o_pad, 1 if depthwise else c_in_pad, kh, kw],
                                 label, name)  # fmt: skip
        if x in blocked:
            xb = blocked[x][0]
            report.reorders_saved += 1
        else:
            xb = name(x)
            new_nodes.append(helper.make_node("ReorderInput", [x], [xb], domain=NCHWC))
        inputs = [xb, kernel]
        if len(node.input) > 2 and node.input[2]:
            inputs.append(_padded_bias(g, model, new_nodes, node.input[2], c_out, o_pad, name))
        conv_attrs = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad")}
        conv_attrs.update(kernel_shape=[kh, kw], group=o_pad if depthwise else 1)
        if act is not None:
            conv_attrs["activation"] = _FUSABLE[act.op_type]
        yb = name(out_name)
        new_nodes.append(helper.make_node("Conv", inputs, [yb], domain=NCHWC, name=name(label), **conv_attrs))
        new_nodes.append(helper.make_node("ReorderOutput", [yb], [out_name], domain=NCHWC, channels=c_out))
        blocked[out_name] = (yb, c_out)
        report.convs += 1
        report.dynamic += alpha is not None

    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    if report.convs:
        if not any(op.domain == NCHWC for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(NCHWC, 1))
        _prune(model)
    return model, report


def _not_blockable(group: int, depthwise: bool, c_in: int, input_blocked: bool) -> str | None:
    """Why a conv stays as it is (its report line), or None: grouped but not depthwise, or an NCHW input whose
    channels are not a multiple of 4."""
    if group > 1 and not depthwise:
        return f"group {group} is neither 1 nor depthwise"
    if not input_blocked and c_in % 4:
        return f"{c_in} input channels, not a multiple of 4"
    return None


def _blocked_kernel(model, new_nodes: list, alpha: str | None, stored: np.ndarray, kernel_shape: list[int],
                    label: str, name) -> str:  # fmt: skip
    """The name of the conv's blocked kernel: a constant initializer, or (a dynamic conv) the blocked experts mixed
    by ``alpha`` and reshaped, with the nodes that do it appended to ``new_nodes``."""
    from onnx import helper, numpy_helper

    kernel = name(label + "_kernel")
    if alpha is None:  # a constant kernel, stored blocked
        model.graph.initializer.append(numpy_helper.from_array(stored.reshape(kernel_shape), kernel))
        return kernel
    experts, shape, mixed = name(label + "_experts"), name(label + "_shape"), name(label + "_mixed")
    model.graph.initializer.append(numpy_helper.from_array(stored, experts))
    model.graph.initializer.append(numpy_helper.from_array(np.array(kernel_shape, np.int64), shape))
    new_nodes += [
        helper.make_node("MatMul", [alpha, experts], [mixed]),
        helper.make_node("Reshape", [mixed, shape], [kernel]),
    ]
    return kernel


def _match_conv(g: _Graph, conv, static_convs: bool):
    """``(alpha, experts, kernel shape, attributes)`` if ``conv``'s kernel is ``Reshape(MatMul(alpha, experts))``;
    with ``static_convs`` also ``(None, kernel as one expert, shape, attributes)`` for a constant kernel."""
    if len(conv.input) < 2:
        return None
    if static_convs:
        w = g.const(conv.input[1])
        attrs = _attrs(conv)
        if w is not None and w.ndim == 4 and w.dtype == np.float32 and "auto_pad" not in attrs:
            return None, w.reshape(1, -1), tuple(int(d) for d in w.shape), attrs
    reshape = g.producer.get(conv.input[1])
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "":
        return None
    matmul = g.producer.get(reshape.input[0])
    if matmul is None or matmul.op_type != "MatMul" or matmul.domain != "":
        return None
    bank = g.const(matmul.input[1])
    shape = g.const(reshape.input[1])
    if bank is None or shape is None or bank.ndim != 2 or bank.dtype != np.float32 or shape.size != 4:
        return None
    shape = [int(s) for s in shape.reshape(-1)]
    if -1 in shape and g.leading_dim(matmul.input[0]) != 1:
        # An inferred dimension hides the batch: the kernel of a fixed-batch graph for B images has B * O rows,
        # which a depthwise conv with B * C groups reads the same way as a one-image kernel when B equals the
        # channel multiplier. Only a kernel proven to be for one image (its coefficients have one row) is moved.
        return None
    if shape.count(-1) == 1:  # Reshape's inferred dimension
        rest = -int(np.prod(shape))
        shape[shape.index(-1)] = bank.shape[1] // rest if rest > 0 and bank.shape[1] % rest == 0 else 0
    if any(s <= 0 for s in shape) or int(np.prod(shape)) != bank.shape[1]:
        return None
    attrs = _attrs(conv)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(attrs.get("kernel_shape", [0, 0])) != 2:
        return None
    return matmul.input[0], bank, tuple(shape), attrs


def _is_spatial_mean(g: _Graph, node) -> bool:
    """A ReduceMean over H and W of a 4-d tensor (a router's or an SE module's pooling)."""
    if node.op_type != "ReduceMean" or node.domain != "":
        return False
    attrs = _attrs(node)
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = g.const(node.input[1])
        axes = None if value is None else value.reshape(-1).tolist()
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3] and not attrs.get("noop_with_empty_axes")


def _blocked_mean(model, node, xb: str, channels: int, block: int, name) -> list:
    """The same mean from the blocked tensor: its global average pool is ``(1, Cpad, 1, 1)`` in plain channel
    order (a 1x1 image is the same in both layouts), cut back to ``channels``."""
    from onnx import helper, numpy_helper

    keep = _attrs(node).get("keepdims", 1)
    c_pad = _round_up(channels, block)
    pooled, flat = name(node.output[0] + "_pool"), name(node.output[0] + "_flat")
    shape, starts, ends, axes = (name(node.output[0] + k) for k in ("_shape", "_starts", "_ends", "_axes"))
    for value, key in (
        ([1, c_pad, 1, 1] if keep else [1, c_pad], shape),
        ([0], starts),
        ([channels], ends),
        ([1], axes),
    ):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), key))
    return [
        helper.make_node("GlobalAveragePool", [xb], [pooled], domain=NCHWC),
        helper.make_node("Reshape", [pooled, shape], [flat]),
        helper.make_node("Slice", [flat, starts, ends, axes], [node.output[0]]),
    ]


def _padded_bias(g: _Graph, model, new_nodes: list, bias: str, n: int, n_pad: int, name) -> str:
    from onnx import helper, numpy_helper

    value = g.const(bias)
    out = name(bias + "_padded")
    if value is not None:
        padded = np.zeros(n_pad, np.float32)
        padded[:n] = value.reshape(-1)
        model.graph.initializer.append(numpy_helper.from_array(padded, out))
        return out
    if n_pad == n:
        return bias
    pads = name(bias + "_pads")
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, n_pad - n], np.int64), pads))
    new_nodes.append(helper.make_node("Pad", [bias, pads], [out]))
    return out


def _prune(model) -> None:
    """Drop nodes and initializers nothing uses any more (the replaced kernels, reorders nobody reads)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _finish(model, path, report: NchwcReport):
    if path is not None:
        import onnx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model, report
