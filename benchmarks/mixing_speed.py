"""Kernel mixing, ``alpha @ experts`` for every dynamic conv of a deployed ParameterNet at batch 1, in the precisions
one could store the experts in: is any of them faster to mix than fp32 on this CPU?

Mixing reads every expert once per image, so its time is memory traffic; fewer bytes per expert would only pay if
the runtime mixes them at the same speed per byte. One thread, medians of interleaved rounds:

- ONNX Runtime: fp32 ``MatMul``; fp16 experts (``Cast`` of alpha, fp16 ``MatMul``, ``Cast`` back); int8 experts
  (``MatMulInteger`` of alpha scaled to uint8, ``Cast`` back). Each layer's product is reduced to one number so that
  the graph's outputs cost nothing. Numbers, not accuracy: the int8 experts are not calibrated.
- PyTorch: ``torch.mm`` in fp32 and bf16, and other fp32 formulations of the same product (``mv`` of the
  transposed bank, a broadcast multiply and sum, one scaled add per expert): is any faster than ``mm``?

    python benchmarks/mixing_speed.py [--model parameternet_600m] [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

import parameternet
import parameternet.models  # noqa: F401  (registers the models in timm)
from parameternet.layers import DynamicConv2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import interleaved  # noqa: E402


def banks(name: str) -> list[np.ndarray]:
    torch.manual_seed(0)
    model = parameternet.deploy(timm.create_model(name).eval(), example_input=(1, 3, 224, 224))
    return [
        m.weight.detach().reshape(m.num_experts, -1).numpy() for m in model.modules() if isinstance(m, DynamicConv2d)
    ]


def onnx_mixing(experts: list[np.ndarray], precision: str) -> ort.InferenceSession:
    M = experts[0].shape[0]
    nodes, inits, reduced = [], [], []
    if precision == "fp16":
        nodes.append(helper.make_node("Cast", ["alpha"], ["a"], to=TensorProto.FLOAT16))
    elif precision == "int8":
        inits.append(numpy_helper.from_array(np.array(255.0, np.float32), "scale"))
        nodes += [
            helper.make_node("Mul", ["alpha", "scale"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["a"], to=TensorProto.UINT8),
        ]
    for i, bank in enumerate(experts):
        if precision == "fp32":
            inits.append(numpy_helper.from_array(bank, f"e{i}"))
            nodes.append(helper.make_node("MatMul", ["alpha", f"e{i}"], [f"k{i}"]))
        else:
            if precision == "fp16":
                stored, op = bank.astype(np.float16), "MatMul"
            else:
                step = np.abs(bank).max() / 127 or 1.0
                stored, op = np.clip(np.round(bank / step), -127, 127).astype(np.int8), "MatMulInteger"
            inits.append(numpy_helper.from_array(stored, f"e{i}"))
            nodes += [
                helper.make_node(op, ["a", f"e{i}"], [f"m{i}"]),
                helper.make_node("Cast", [f"m{i}"], [f"k{i}"], to=TensorProto.FLOAT),
            ]
        nodes.append(helper.make_node("ReduceMax", [f"k{i}"], [f"r{i}"], keepdims=0))
        reduced.append(f"r{i}")
    nodes.append(helper.make_node("Sum", reduced, ["out"]))
    graph = helper.make_graph(
        nodes,
        "mixing",
        [helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [1, M])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])],
        inits,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="parameternet_600m")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    experts = banks(args.model)
    mb = sum(b.nbytes for b in experts) / 2**20
    alpha = np.random.default_rng(0).random((1, experts[0].shape[0]), np.float32)
    feed = {"alpha": alpha}
    fns = {}
    for precision in ("fp32", "fp16", "int8"):
        session = onnx_mixing(experts, precision)
        fns[f"ONNX Runtime {precision}"] = lambda s=session: s.run(None, feed)
    a32 = torch.from_numpy(alpha)
    t32 = [torch.from_numpy(b) for b in experts]
    t16 = [b.bfloat16() for b in t32]
    a16 = a32.bfloat16()

    def torch_mix(banks, a):
        with torch.inference_mode():
            for b in banks:
                a @ b

    def each(banks, formula):
        with torch.inference_mode():
            for b in banks:
                formula(b)

    a_vec, a_col, a_list = a32[0], a32.view(-1, 1), a32[0].tolist()

    def scaled_adds(b):
        out = b[0] * a_list[0]
        for i in range(1, len(a_list)):
            out.add_(b[i], alpha=a_list[i])
        return out

    fns["PyTorch fp32"] = lambda: torch_mix(t32, a32)
    fns["PyTorch bf16"] = lambda: torch_mix(t16, a16)
    fns["PyTorch fp32 mv(bank.T, alpha)"] = lambda: each(t32, lambda b: torch.mv(b.t(), a_vec))
    fns["PyTorch fp32 (alpha.T * bank).sum(0)"] = lambda: each(t32, lambda b: (a_col * b).sum(0))
    fns["PyTorch fp32 scaled adds"] = lambda: each(t32, scaled_adds)
    times = interleaved(fns, args.rounds, warmup=5)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"{args.model}: {len(experts)} dynamic convs, {mb:.0f} MB of fp32 experts; mixing at batch 1, 1 thread")
    print(f"  load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for runtime in ("ONNX Runtime", "PyTorch"):
        base = med[f"{runtime} fp32"]
        for key in (k for k in med if k.startswith(runtime)):
            print(f"  {key}: {med[key]:.2f} ms ({med[key] / base:.2f}x fp32)")


if __name__ == "__main__":
    main()
