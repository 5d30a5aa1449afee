"""A batch-1 ONNX graph that serves any batch: ONNX ``Scan`` runs it on each image in turn.

A graph whose dynamic convs hold blocked kernels (:mod:`parameternet.export.ort_nchwc`) mixes one kernel per image,
so it is exported for one image; :func:`scan_over_batch` wraps it into a graph with a symbolic batch.
"""

from __future__ import annotations

from parameternet.errors import ParameterNetError

__all__ = ["scan_over_batch"]


def scan_over_batch(model):
    """A graph with a symbolic batch that runs ``model``, a graph for one image, on each image in turn (an ONNX
    ``Scan``): how a batch-1 graph, such as one with dynamic convs in blocked kernels, serves any batch size.

    ``model``'s one input and one output must have a leading dimension of 1. Returns a new ``onnx.ModelProto``.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    constants = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ParameterNetError(
            f"scan_over_batch() needs a graph with one input and one output, got {len(inputs)} and {len(graph.output)}."
        )
    (x,), (y,) = inputs, graph.output
    dims = [list(v.type.tensor_type.shape.dim) for v in (x, y)]
    if any(not d or d[0].dim_value != 1 for d in dims):
        raise ParameterNetError(
            "scan_over_batch() needs a graph for one image (input and output batch 1); export it with "
            "dynamic_batch=False, batch_size=1."
        )
    elem = x.type.tensor_type.elem_type
    body = onnx.GraphProto()
    body.CopyFrom(graph)
    body.name = "one_image"
    del body.input[:]
    del body.output[:]
    # Names inside the body may not shadow the outer graph's, which keeps the input's and output's names.
    inner = {x.name: f"{x.name}_batch1", y.name: f"{y.name}_batch1"}
    for node in body.node:
        node.input[:] = [inner.get(n, n) for n in node.input]
        node.output[:] = [inner.get(n, n) for n in node.output]
    image, logits = f"{x.name}_one", f"{y.name}_one"
    body.input.append(helper.make_tensor_value_info(image, elem, [d.dim_value for d in dims[0][1:]]))
    body.output.append(helper.make_tensor_value_info(logits, y.type.tensor_type.elem_type, None))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 9:
        raise ParameterNetError(
            f"scan_over_batch() needs opset 9 or later (ONNX's Scan), got a graph of opset {opset}."
        )
    if opset >= 13:  # the axes are an input from opset 13 on, an attribute before
        axes = f"{x.name}_batch_axis"
        body.initializer.append(helper.make_tensor(axes, onnx.TensorProto.INT64, [1], [0]))
        body.node.insert(0, helper.make_node("Unsqueeze", [image, axes], [inner[x.name]]))
        body.node.append(helper.make_node("Squeeze", [inner[y.name], axes], [logits]))
    else:
        body.node.insert(0, helper.make_node("Unsqueeze", [image], [inner[x.name]], axes=[0]))
        body.node.append(helper.make_node("Squeeze", [inner[y.name]], [logits], axes=[0]))

    batch = "batch"
    outer_x = helper.make_tensor_value_info(x.name, elem, [batch, *[d.dim_value for d in dims[0][1:]]])
    outer_y = helper.make_tensor_value_info(
        y.name, y.type.tensor_type.elem_type, [batch, *[d.dim_value or d.dim_param for d in dims[1][1:]]]
    )
    scan = helper.make_node("Scan", [x.name], [y.name], body=body, num_scan_inputs=1)
    outer = helper.make_graph([scan], graph.name or "parameternet", [outer_x], [outer_y])
    out = helper.make_model(outer, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    return out
