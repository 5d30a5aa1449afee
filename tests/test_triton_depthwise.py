"""The Triton per-sample depthwise kernels against a float64 per-sample ``F.conv2d``: the output and the three
gradients, over odd channel counts and map sizes, strides, dilations, asymmetric padding, both memory formats and
both precisions. Without a GPU they run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), which
also executes the kernels' alignment hints as arithmetic: a false hint gives a wrong answer here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parameternet.layers import triton_depthwise as tdw

pytestmark = pytest.mark.skipif(
    not tdw.available(torch.empty(0)) and not torch.cuda.is_available(),
    reason="needs Triton, and a GPU or TRITON_INTERPRET=1",
)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference(x, weight, bias, stride, pad, dilation):
    """``y[b] = conv2d(pad(x[b]), weight[b], bias[b], groups=C)`` in float64, one sample at a time."""
    C = x.shape[1]
    xp = F.pad(x, pad)  # (left, right, top, bottom)
    ys = [
        F.conv2d(xp[b : b + 1], weight[b].unsqueeze(1), None if bias is None else bias[b], stride, 0, dilation, C)
        for b in range(x.shape[0])
    ]
    return torch.cat(ys)


def _check(B, C, H, W, k, stride, pad, dilation, channels_last, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    kh, kw = k
    x64 = torch.randn(B, C, H, W, dtype=torch.float64)
    w64 = torch.randn(B, C, kh, kw, dtype=torch.float64)
    b64 = torch.randn(B, C, dtype=torch.float64) if bias else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dev = _device()
    x = x64.to(dev, dtype).contiguous(memory_format=fmt).requires_grad_(True)
    w = w64.to(dev, dtype).requires_grad_(True)
    b = b64.to(dev, dtype).requires_grad_(True) if bias else None
    y = tdw.per_sample_depthwise(x, w, b, stride, pad, dilation)
    assert y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    g = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g.to(dev, dtype).contiguous(memory_format=fmt))
    assert grads[0].shape == x.shape and grads[0].dtype == dtype
    if channels_last:
        assert grads[0].is_contiguous(memory_format=torch.channels_last)

    # The reference sees the operands as the kernels do (rounded to dtype), in float64.
    xr = x.detach().cpu().double().requires_grad_(True)
    wr = w.detach().cpu().double().requires_grad_(True)
    br = b.detach().cpu().double().requires_grad_(True) if bias else None
    ref = _reference(xr, wr, br, stride, pad, dilation)
    gr = g.to(dtype).double()
    ref_grads = torch.autograd.grad(ref, [xr, wr] + ([br] if bias else []), gr)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.detach().cpu().double(), ref.detach(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        # the kernel gradient sums over every position: its scale grows with sqrt(H * W)
        scale = want.abs().max().clamp_min(1.0).item() if dtype != torch.float32 else 1.0
        torch.testing.assert_close(got.detach().cpu().double() / scale, want / scale, **tol)


GEOMETRIES = {
    # name: (k, stride, pad (left, right, top, bottom), dilation)
    "3x3": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "5x5-s2": ((5, 5), (2, 2), (2, 2, 2, 2), (1, 1)),
    "3x3-d2": ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "3x3-s2-asym": ((3, 3), (2, 2), (0, 1, 0, 1), (1, 1)),
    "5x3-s21-d12": ((5, 3), (2, 1), (3, 0, 1, 2), (1, 2)),
}


F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    # (B, C, H, W, geometry, channels_last, dtype): C not a power of two, odd maps, batch 1 to 3
    (2, 22, 4, 7, "3x3", False, F32),
    (1, 22, 5, 7, "3x3", True, F32),
    (3, 5, 5, 5, "5x5-s2", False, F32),
    (1, 5, 6, 7, "5x5-s2", True, F32),
    (1, 46, 5, 5, "3x3-d2", False, F32),
    (1, 46, 5, 5, "3x3-d2", True, F32),
    (1, 22, 5, 6, "3x3-s2-asym", False, F32),
    (1, 22, 5, 6, "3x3-s2-asym", True, F32),
    (1, 7, 6, 5, "5x3-s21-d12", False, F32),
    (1, 7, 6, 5, "5x3-s21-d12", True, F32),
    (1, 130, 3, 4, "3x3", False, F32),  # several channel blocks
    (1, 130, 3, 4, "3x3", True, F32),
    (2, 16, 5, 6, "3x3", True, BF16),
    (1, 16, 6, 5, "5x5-s2", False, BF16),
    (1, 46, 5, 5, "3x3-s2-asym", True, BF16),
]


@pytest.mark.parametrize(
    "B,C,H,W,geo,channels_last,dtype",
    CASES,
    ids=[f"{c[4]}-{'nhwc' if c[5] else 'nchw'}-{str(c[6])[6:]}-B{c[0]}C{c[1]}H{c[2]}W{c[3]}" for c in CASES],
)
def test_matches_a_float64_reference(B, C, H, W, geo, channels_last, dtype):
    """The output and the gradients of the input, the kernels and the bias; bf16 against the float64 conv of the
    bf16-rounded operands (the kernels accumulate in float32), with a bf16-sized tolerance."""
    k, stride, pad, dilation = GEOMETRIES[geo]
    _check(B, C, H, W, k, stride, pad, dilation, channels_last, dtype, bias=(B + C) % 2 == 0, seed=B * C)


def test_small_tiles_several_rows_and_wide_offsets(monkeypatch):
    """Tiles much smaller than the map, several rows a program (a last block of rows cut short), several column
    and channel blocks, and the int64 tile offsets: the loops the cases above run once."""
    monkeypatch.setattr(tdw, "_TILE", 16)
    monkeypatch.setattr(tdw, "_ACC_BUDGET", 2)
    monkeypatch.setattr(tdw, "_PROGRAMS", 4)
    monkeypatch.setattr(tdw, "_PARTIAL_BYTES", 1)
    monkeypatch.setattr(tdw, "_ROW_TILES", 1)
    _check(1, 19, 5, 6, (3, 3), (2, 2), (0, 1, 2, 1), (1, 1), True, F32)
    monkeypatch.setattr(tdw, "_wide", lambda *args: True)
    _check(1, 10, 5, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), False, F32, bias=False, seed=1)


def test_the_speed_benchmark_runs_a_smoke_case(tmp_path):
    """benchmarks/triton_depthwise_speed.py with ``--device cpu --smoke``: one tiny case through the interpreter."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_depthwise_speed.py"
    spec = importlib.util.spec_from_file_location("triton_depthwise_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert len(bench.geometries(bench.GEOMETRIES_CSV)) >= 10  # ParameterNet-600M's depthwise layers
    if torch.cuda.is_available():
        pytest.skip("the smoke case is the CPU one")
    rows = bench.main(["--device", "cpu", "--smoke", "--csv", str(tmp_path / "speed.csv")])
    assert [r["layout"] for r in rows] == ["nchw", "nhwc"]
    assert (tmp_path / "speed.csv").read_text().count("\n") == 3


def test_only_the_needed_gradients_and_empty_outputs():
    torch.manual_seed(0)
    dev = _device()
    x = torch.randn(2, 6, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 6, 3, 3, device=dev, requires_grad=True)
    (gw,) = torch.autograd.grad(tdw.per_sample_depthwise(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1)).sum(), [w])
    ref = torch.autograd.grad(_reference(x.double(), w.double(), None, (1, 1), (1, 1, 1, 1), (1, 1)).sum(), [w])[0]
    torch.testing.assert_close(gw, ref.float(), rtol=1e-5, atol=1e-5)
    # a 5x5 kernel on a 4x4 map with no padding: an empty output, and zero gradients
    x = torch.randn(2, 6, 4, 4, device=dev, requires_grad=True)
    w = torch.randn(2, 6, 5, 5, device=dev, requires_grad=True)
    y = tdw.per_sample_depthwise(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1))
    assert y.shape == (2, 6, 0, 0)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    assert not gx.any() and not gw.any()
