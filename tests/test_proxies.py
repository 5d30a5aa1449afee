"""CPU proxies for the GPU costs of a ParameterNet (docs/deployment.md, "GPU costs, measured on a CPU"): ATen ops a
batch-1 forward dispatches against GhostNet's, and the bytes of per-sample kernels a large batch materialises. The
third proxy, layout copies for a channels_last input, is in test_layers.py (next to the implementations it
checks)."""

import timm
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import parameternet.models  # noqa: F401  (registers the models)
from parameternet.export.folding import deploy
from parameternet.layers import DynamicConv2d, kernels

# Measured: 1.69x (GhostNet-600M 1,523 ATen ops, ParameterNet-600M 2,579, 12 per dynamic layer). A ceiling, so a change
# that adds an op to every dynamic layer fails here; the goal (1.5x) needs fewer kernels around each layer.
OPS_RATIO_CEILING = 1.72


def aten_ops(name: str) -> int:
    torch.manual_seed(0)
    model = deploy(timm.create_model(name).eval(), example_input=(1, 3, 224, 224))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return sum(e.name.startswith("aten::") for e in prof.events())


def test_aten_ops_of_a_batch_1_forward_against_ghostnet():
    """Each ATen op is at least one kernel launch on a GPU: at batch 1 their count is what CUDA graphs cannot hide."""
    ghost, pnet = aten_ops("ghostnet_600m"), aten_ops("parameternet_600m")
    assert pnet / ghost <= OPS_RATIO_CEILING, (ghost, pnet)


class _LargestMix(TorchDispatchMode):
    """The largest tensor a matrix product makes inside the dynamic layers: the mixed per-sample kernels."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and isinstance(out, torch.Tensor):
            self.largest = max(self.largest, out.numel() * out.element_size())
        return out


def test_no_whole_batch_kernel_bank_at_batch_64_on_a_cpu():
    """Eager on a CPU, a 1x1 layer's per-sample kernels ``(B, O, C)`` are built a chunk at a time (``CHUNK_BYTES``)
    once the batch's would pass ``KEEP_BYTES``: at batch 64 no mixing product is larger than a chunk, though the
    widest layer's whole bank would be many times that."""
    torch.manual_seed(0)
    model = timm.create_model("parameternet_600m").train()
    x = torch.randn(64, 3, 32, 32)
    widest = max(m.weight[0].numel() for m in model.modules() if isinstance(m, DynamicConv2d))
    with _LargestMix() as mode:
        model(x).sum().backward()
    assert 64 * widest * 4 > 8 * kernels.CHUNK_BYTES  # the bank the chunking avoids
    assert mode.largest <= max(kernels.CHUNK_BYTES, kernels.KEEP_BYTES)
