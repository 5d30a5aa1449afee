"""Function transforms through every dynamic layer, on both sides of the size thresholds, against the plain
per-sample fp32 references (``reference_conv`` / ``reference_linear`` of ``tests/test_layers.py``, ``reference_moe``
of ``tests/test_llama_moe.py``) run by plain autograd.

Transforms: double backward (a gradient penalty: ``torch.autograd.grad(..., create_graph=True)``, then backward
again), ``torch.func.grad`` and ``torch.func.jvp`` w.r.t. the input, per-sample gradients by
``torch.func.vmap(torch.func.grad(loss))`` with ``torch.func.functional_call``, forward-mode AD
(``torch.autograd.forward_ad``), ``vmap`` over batches, batched gradients (``torch.autograd.grad(...,
is_grads_batched=True)``, the backward run under the legacy ``vmap``) and whole Jacobians (``torch.func.jacrev``,
``torch.autograd.functional.jacobian(vectorize=True)``); then every implementation of the functional core forced on
a conv layer.

Sides: ``small`` keeps the default thresholds (the per-sample kernels are built at once and kept by autograd, the
router's pooling is ``x.mean``); ``chunked`` sets ``KEEP_BYTES`` / ``CHUNK_BYTES`` / ``MEAN_MIN_NUMEL`` so that the
chunked ``_PerSampleMatmul`` (one sample a chunk) and ``_SpatialMean`` run on these tiny layers. The last test runs
the issue's sizes with the real thresholds.
"""

from __future__ import annotations

import pytest
import torch
from torch import func
from torch.autograd import forward_ad

from parameternet import DynamicConv2d, DynamicLinear
from parameternet.layers import TopKMoELinear, functional, kernels, set_implementation
from parameternet.layers import moe as moe_module
from test_layers import reference_conv, reference_linear
from test_llama_moe import reference_moe

TOL = dict(rtol=1e-5, atol=1e-5)


def dense_op(router: str) -> DynamicConv2d:
    """A dense 3x3 layer forced to the custom op ``parameternet::per_sample_conv2d`` (what inductor runs) in eager."""
    layer = DynamicConv2d(4, 6, 3, padding=1, num_experts=3, router=router)
    set_implementation(layer, "grouped_op")
    return layer


# name: (build(router) -> layer, input shape at batch 3, reference)
LAYERS = {
    "conv-pointwise": (lambda r: DynamicConv2d(8, 12, 1, num_experts=3, router=r), (3, 8, 4, 5), reference_conv),
    "conv-depthwise": (
        lambda r: DynamicConv2d(8, 8, 3, padding=1, groups=8, num_experts=3, router=r),
        (3, 8, 4, 5),
        reference_conv,
    ),
    "conv-dense": (lambda r: DynamicConv2d(4, 6, 3, padding=1, num_experts=3, router=r), (3, 4, 4, 5), reference_conv),
    "conv-dense-op": (dense_op, (3, 4, 4, 5), reference_conv),
    "linear": (lambda r: DynamicLinear(8, 12, num_experts=3, router=r), (3, 5, 8), reference_linear),
    "moe-top1": (lambda r: TopKMoELinear(16, 32, bias=True, num_experts=4), (3, 5, 16), reference_moe),
    "moe-top2": (lambda r: TopKMoELinear(16, 32, bias=True, num_experts=4, top_k=2), (3, 5, 16), reference_moe),
    "moe-top2-capacity": (
        lambda r: TopKMoELinear(16, 32, num_experts=4, top_k=2, capacity_factor=0.6),
        (3, 5, 16),
        reference_moe,
    ),
}
CASES = [
    f"{name}:{router}"
    for name in LAYERS
    for router in (("linear-sigmoid", "mlp-softmax") if not name.startswith("moe") else ("top-k",))
]
SIDES = ["small", "chunked"]


def build(case: str):
    name, router = case.split(":")
    make, shape, ref = LAYERS[name]
    torch.manual_seed(0)
    layer = make(router)
    x = torch.randn(shape)
    return layer, x, ref


@pytest.fixture
def ran(monkeypatch):
    """The custom autograd functions and the custom op that ran: a test claiming a path must have reached it."""
    calls = []

    def counted(base, name):
        class Counted(base):
            @staticmethod
            def forward(ctx, *args):
                calls.append(name)
                return base.forward(ctx, *args)

        return Counted

    monkeypatch.setattr(kernels, "_PerSampleMatmul", counted(kernels._PerSampleMatmul, "_PerSampleMatmul"))
    monkeypatch.setattr(kernels, "_SpatialMean", counted(kernels._SpatialMean, "_SpatialMean"))
    monkeypatch.setattr(moe_module, "_PermuteRows", counted(moe_module._PermuteRows, "_PermuteRows"))
    op = functional.per_sample_conv2d
    monkeypatch.setattr(functional, "per_sample_conv2d", lambda *a: calls.append("per_sample_conv2d") or op(*a))
    return calls


@pytest.fixture(params=CASES)
def case(request) -> str:
    return request.param


@pytest.fixture(params=SIDES)
def side(request, monkeypatch) -> str:
    """The side of the size thresholds the test runs on, set for it."""
    if request.param == "chunked":  # the chunked function, one sample a chunk, and the pooling's own backward
        monkeypatch.setattr(kernels, "KEEP_BYTES", 0)
        monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)
        monkeypatch.setattr(kernels, "MEAN_MIN_NUMEL", 0)
    return request.param


@pytest.fixture
def built(case, side):
    """``(layer, x, ref)`` of ``case`` (:func:`build`), to run on ``side`` of the thresholds."""
    return build(case)


def expected_custom(case: str, side: str) -> set[str]:
    """The custom functions the layer's eager forward runs at batch 3 (no transform)."""
    name, router = case.split(":")
    out = set()
    if side == "chunked" and name in ("conv-pointwise", "linear"):
        out.add("_PerSampleMatmul")
    if side == "chunked" and router == "mlp-softmax":  # the linear-sigmoid router folds its pooling into addmm
        out.add("_SpatialMean")
    if name == "conv-dense-op":
        out.add("per_sample_conv2d")
    if name == "moe-top1":  # top-1 dispatch is a permutation of the rows
        out.add("_PermuteRows")
    return out


def penalty_grads(fn, layer, x, w):
    """A gradient penalty ``|d<fn(x), w>/dx|^2`` and its gradient w.r.t. the input and every parameter (double
    backward); also the first-order input gradient."""
    x = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((fn(layer, x) * w).sum(), x, create_graph=True)
    params = list(layer.parameters())
    grads = torch.autograd.grad(gx.square().sum(), [x, *params], allow_unused=True, materialize_grads=True)
    return [gx.detach(), *grads]


def test_double_backward_matches_reference(case, side, built, ran):
    layer, x, ref = built
    w = torch.randn_like(ref(layer, x))
    got = penalty_grads(lambda m, xx: m(xx), layer, x, w)
    assert set(ran) == expected_custom(case, side)  # the custom functions' backwards were differentiated
    want = penalty_grads(ref, layer, x, w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_func_grad_matches_reference(built, ran):
    layer, x, ref = built
    w = torch.randn_like(ref(layer, x))
    got = func.grad(lambda xx: (layer(xx) * w).sum())(x)
    assert ran == []  # under a transform the layers compute plain ops
    xr = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad((ref(layer, xr) * w).sum(), xr)
    torch.testing.assert_close(got, want, **TOL)


def test_func_jvp_matches_reference(built, ran):
    layer, x, ref = built
    v = torch.randn_like(x)
    y, t = func.jvp(layer, (x,), (v,))
    assert ran == []
    y_ref, t_ref = torch.autograd.functional.jvp(lambda xx: ref(layer, xx), x, v)  # by double backward
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(t, t_ref, **TOL)


def test_forward_ad_matches_reference(built, ran):
    layer, x, ref = built
    v = torch.randn_like(x)
    with forward_ad.dual_level():
        t = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, v))).tangent
    assert ran == []
    _, t_ref = torch.autograd.functional.jvp(lambda xx: ref(layer, xx), x, v)
    torch.testing.assert_close(t, t_ref, **TOL)


def test_per_sample_grads_by_vmap_match_a_loop_over_samples(built):
    """``vmap(grad(loss))`` over the samples. Inside the vmapped function a sample has no batch dimension: it is
    fed as a batch of one (the dynamic layers route per sample)."""
    layer, x, ref = built
    target = torch.randn_like(ref(layer, x))
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xb, tb):
        y = func.functional_call(layer, p, (xb.unsqueeze(0),))
        return (y - tb.unsqueeze(0)).square().sum()

    got = func.vmap(func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(x.shape[0]):
        y = ref(layer, x[i : i + 1])
        want = torch.autograd.grad((y - target[i : i + 1]).square().sum(), list(layer.parameters()))
        for (k, g), g_ref in zip(got.items(), want, strict=True):
            torch.testing.assert_close(g[i], g_ref, **TOL, msg=lambda m, k=k, i=i: f"{k}, sample {i}: {m}")


def test_vmap_over_batches_matches_reference(built, ran):
    """``vmap`` over a leading dimension of batches of 3: inside, the layers see a batch past the thresholds."""
    layer, x, ref = built
    xs = torch.stack([x, torch.randn_like(x)])
    got = func.vmap(layer)(xs)
    assert ran == []
    torch.testing.assert_close(got, torch.stack([ref(layer, xb) for xb in xs]).detach(), **TOL)


def test_batched_grads_match_reference(case, side, built, ran):
    """``is_grads_batched=True`` (what ``torch.autograd.functional.jacobian(vectorize=True)`` uses): the forward is
    eager, its backward runs under ``vmap`` and must be batched."""
    layer, x, ref = built
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    assert set(ran) == expected_custom(case, side)
    gs = torch.randn(4, *y.shape)
    got = torch.autograd.grad(y, [xx, *layer.parameters()], gs, is_grads_batched=True, allow_unused=True)
    xr = x.clone().requires_grad_(True)
    y_ref = ref(layer, xr)
    for j in range(gs.shape[0]):
        want = torch.autograd.grad(y_ref, [xr, *layer.parameters()], gs[j], retain_graph=True, allow_unused=True)
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a[j], b, **TOL)


def test_jacobians_match_reference(case, side, built, ran):
    """Whole Jacobians w.r.t. the input: ``torch.func.jacrev`` (vjp under vmap) and
    ``torch.autograd.functional.jacobian(vectorize=True)`` (an eager forward, its backward batched) against the
    reference's Jacobian row by row."""
    layer, x, ref = built
    x = x[:2, :, :2, :3] if x.dim() == 4 else x[:2, :2]  # a small Jacobian
    want = torch.autograd.functional.jacobian(lambda xx: ref(layer, xx), x)
    torch.testing.assert_close(func.jacrev(layer)(x), want, **TOL)
    assert ran == []
    torch.testing.assert_close(torch.autograd.functional.jacobian(layer, x, vectorize=True), want, **TOL)
    if side == "chunked" and case.startswith(("conv-pointwise", "linear")):
        assert "_PerSampleMatmul" in ran


GEOMETRIES = {
    "pointwise": (8, 12, 1, {}),
    "depthwise": (8, 8, 3, dict(padding=1, groups=8)),
    "dense": (4, 6, 3, dict(padding=1)),
}


def forced_conv(geometry: str, impl: str):
    """``(layer, x, w)``: a conv layer of ``geometry`` forced to ``impl``, an input at a batch size ``impl`` computes
    and a random output cotangent; skips the test where ``impl`` does not compute the layer."""
    cin, cout, k, kwargs = GEOMETRIES[geometry]
    torch.manual_seed(0)
    layer = DynamicConv2d(cin, cout, k, num_experts=3, **kwargs)
    batch = 1 if impl == "single" else 3
    if not functional.applies(impl, layer.geometry, batch):
        pytest.skip(f"{impl} does not compute a {geometry} layer")  # the functional core's fixed rule
    set_implementation(layer, impl)
    x = torch.randn(batch, cin, 5, 6)
    return layer, x, torch.randn_like(reference_conv(layer, x))


@pytest.mark.parametrize("impl", functional.NAMES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_every_conv_implementation_under_transforms(geometry, impl, ran):
    """Each implementation of the functional core forced on the layer (``set_implementation``: what a graph context
    runs, or a user's choice) under ``torch.func.grad``, ``torch.func.jvp`` and ``vmap`` over batches. The custom
    ops (``grouped_op``'s, ``triton``'s) step aside for ``grouped``; ``bmm`` and ``per_sample_matmul`` do not ask
    vmap for a memory format."""
    layer, x, w = forced_conv(geometry, impl)
    got = func.grad(lambda xx: (layer(xx) * w).sum())(x)
    xr = x.clone().requires_grad_(True)
    torch.testing.assert_close(got, torch.autograd.grad((reference_conv(layer, xr) * w).sum(), xr)[0], **TOL)
    v = torch.randn_like(x)
    _, t = func.jvp(layer, (x,), (v,))
    torch.testing.assert_close(t, torch.autograd.functional.jvp(lambda xx: reference_conv(layer, xx), x, v)[1], **TOL)
    xs = torch.stack([x, torch.randn_like(x)])
    want = torch.stack([reference_conv(layer, xb) for xb in xs]).detach()
    torch.testing.assert_close(func.vmap(layer)(xs), want, **TOL)
    assert ran == []


# Not "triton": its backward is the custom op parameternet::per_sample_depthwise_backward of
# layers/triton_depthwise.py, which registers no autograd formula of its own (no double backward there).
@pytest.mark.parametrize("impl", [name for name in functional.NAMES if name != "triton"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_every_conv_implementation_double_backward(geometry, impl):
    layer, x, w = forced_conv(geometry, impl)
    got = penalty_grads(lambda m, xx: m(xx), layer, x, w)
    for a, b in zip(got, penalty_grads(reference_conv, layer, x, w), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_transforms_active_only_under_a_transform():
    assert not kernels.transforms_active()
    seen = []
    func.grad(lambda x: seen.append(kernels.transforms_active()) or x.sum())(torch.randn(2))
    func.vmap(lambda x: seen.append(kernels.transforms_active()) or x)(torch.randn(2, 3))
    func.jvp(lambda x: seen.append(kernels.transforms_active()) or x, (torch.randn(2),), (torch.randn(2),))
    with forward_ad.dual_level():
        seen.append(kernels.transforms_active())
    assert seen == [True] * 4 and not kernels.transforms_active()


@pytest.mark.parametrize(
    "make, shape, ref",
    [
        (lambda: DynamicLinear(512, 512), (5, 6, 512), reference_linear),
        (lambda: DynamicConv2d(512, 512, 1, router="mlp-softmax"), (5, 512, 16, 16), reference_conv),
    ],
    ids=["linear-512", "conv1x1-512"],
)
def test_the_issue_case_at_the_real_thresholds(make, shape, ref, ran):
    """The issue's sizes with no monkeypatching: 5 MB of per-sample kernels (past KEEP_BYTES, so the chunked function
    runs) and, for the conv, 655k input elements (past MEAN_MIN_NUMEL). The gradient penalty raised ``bmm(): functions
    with out=... arguments don't support automatic differentiation``, ``torch.func`` a missing ``setup_context``.

    In float64 (the same code paths, kernels of 10 MB): in float32 the router's penalty gradient sums 262k products
    of one expert-sized matmul, whose rounding (about 2e-5 of the largest entry here, the chunked function's own
    first-order formula) is not that of the reference's per-sample sums; the tiny layers above check float32."""
    torch.manual_seed(0)
    layer, x = make().double(), torch.randn(shape, dtype=torch.float64)
    assert x.shape[0] * 512 * 512 * 4 > kernels.KEEP_BYTES
    w = torch.randn_like(ref(layer, x))
    for a, b in zip(penalty_grads(lambda m, xx: m(xx), layer, x, w), penalty_grads(ref, layer, x, w), strict=True):
        torch.testing.assert_close(a, b)
    want = {"_PerSampleMatmul"} | ({"_SpatialMean"} if isinstance(layer, DynamicConv2d) else set())
    assert set(ran) == want
    ran.clear()
    got = func.grad(lambda xx: (layer(xx) * w).sum())(x)
    _, t = func.jvp(layer, (x,), (x,))
    assert ran == []
    xr = x.clone().requires_grad_(True)
    torch.testing.assert_close(got, torch.autograd.grad((ref(layer, xr) * w).sum(), xr)[0])
    torch.testing.assert_close(t, torch.autograd.functional.jvp(lambda xx: ref(layer, xx), x, x)[1])
